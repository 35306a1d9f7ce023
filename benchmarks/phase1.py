"""Phase 1 benchmark on the seed code's reference workload, through the real Phase1Parallel.

Workload (DESIGN.md "Reference figures"): 6400 token ids uniform in [0, 50257) with seed 42
(validation: 1280 more), frozen random 768-dim embedding, ``residual`` updater 6 x 768,
dist_reg_weight 0.8, noise 0.1, Adam 2e-3, threshold 0.03, min 5 / max 40 iterations.

Modes: ``stream`` (one concatenated sequence, fp32: the seed's numerics), ``samples``
(50 sequences x 128 tokens, batched sequential pass), ``bf16`` (samples + bf16 autocast).
Each run is a fresh subprocess (so peak RSS is the run's own); the table reports medians.

    python benchmarks/phase1.py                       # all modes, both token_input_all_layers, 3 runs
    python benchmarks/phase1.py --modes stream --all-layers true --runs 1

Bounds measured in the same process: ``torch.matmul`` GFLOP/s at the parallel iteration's
GEMM shapes (fp32 and bf16; iteration FLOPs counted as 3 x forward), and read bandwidth
for the sequential step, whose weight bytes per step are what a batch-1 step must read:
from L3 (a 32 MB tensor; the weights, 14 to 57 MB, stay in this CPU's 260 MB L3) and from
DRAM (512 MB). The compute bound of a batched sequential pass is matmul GFLOP/s over the
forward FLOPs per token.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import write_report

SEED = {"fp32 stream": {"false": {"iter0_s": 28.0, "total_s": 267.0, "iterations": 40, "iter_s": 7.0},
                        "true": {"total_s": 16.1, "iterations": 5}}}


def one_run(mode: str, all_layers: bool, max_iterations: int, num_tokens: int = 6400) -> dict:
    import lightning as L
    import torch

    from cvfp_lightning.callbacks import ConvergenceEarlyStopping
    from cvfp_lightning.data import SyntheticTokensDataModule
    from cvfp_lightning.modules import Phase1Parallel
    from cvfp_lightning.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # off with CVFP_MALLOC_TUNING=0
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    L.seed_everything(42, verbose=False)
    samples = mode in ("samples", "bf16")
    dm = SyntheticTokensDataModule(vocab_size=50257, num_tokens=num_tokens, val_tokens=1280, seed=42,
                                   sequences="samples" if samples else "stream",
                                   max_seq_len=128 if samples else None,
                                   chunk_size=int(os.environ.get("BENCH_CHUNK", "1600")))
    model = Phase1Parallel(vocab_size=50257,
                             context={"updater": "residual", "context_dim": 768, "num_layers": 6,
                                      "token_input_all_layers": all_layers},
                             embedding={"embed_dim": 768, "freeze": True}, dist_reg_weight=0.8, noise_std=0.1,
                             convergence_threshold=0.03, lr=2e-3)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            times.append(time.perf_counter() - self.t)

    stop = ConvergenceEarlyStopping(threshold=0.95, min_iterations=5)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_iterations, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        precision="bf16-mixed" if mode == "bf16" else "32-true", callbacks=[stop, Timer()])
    start = time.perf_counter()
    trainer.fit(model, dm)
    total = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # time steps of iteration 0: train and validation sequences in one pass, longest first, in batches
    lengths = torch.cat([dm.train_sequences.lengths, dm.val_sequences.lengths]).sort(descending=True).values
    steps = int(lengths[::model.hparams.seq_batch_size].sum())
    iterations = len(times)
    return {"mode": mode, "token_input_all_layers": all_layers, "iter0_s": model._iteration0_seconds,
            "iter_s_median": statistics.median(times) if times else None, "iterations": iterations,
            "stopped_early": stop.stopped_at_iteration is not None, "total_s": total, "peak_rss_mb": rss_mb,
            "num_tokens": num_tokens, "train_tokens_per_s": num_tokens * iterations / sum(times) if times else None,
            "seq_tokens_per_s": model._iteration0_tokens / model._iteration0_seconds,
            "seq_step_ms": 1e3 * model._iteration0_seconds / steps,
            "final_rate": float(trainer.callback_metrics["train/convergence_rate"])}


def bounds(all_layers: bool) -> dict:
    """matmul GFLOP/s at the iteration's GEMM shape, bandwidth, and the model's FLOPs/bytes."""
    import torch

    from cvfp_lightning.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # as in the runs (off with CVFP_MALLOC_TUNING=0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    D, E, L, N = 768, 768, 6, 6400

    def gflops(dtype, k: int) -> float:
        a, b = torch.randn(N, k, dtype=dtype), torch.randn(k, D, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(10))
        return 2 * N * k * D / best / 1e9

    def read_gbs(mb: int) -> float:
        x = torch.randn(mb * 1024 * 1024 // 4)
        x.sum()
        return x.numel() * 4 / min(_timed(x.sum) for _ in range(10)) / 1e9

    bw_dram, bw_cache = read_gbs(512), read_gbs(32)  # 32 MB stays in this CPU's L3, like the weights
    if all_layers:
        shapes = [(D + E, D)] * L  # Linear over [x; e]
        step_weights = [(D, D)] * L  # a step reads only W_x (the token's share is precomputed)
    else:
        w = [round(D + E + (D - D - E) * l / L) for l in range(L + 1)]
        # every layer has a Linear and, its widths differing, a bias-free residual Linear of the same shape
        shapes = [(w[l], w[l + 1]) for l in range(L)] * 2
        step_weights = [(D, w[1])] * 2 + [(w[l], w[l + 1]) for l in range(1, L)] * 2
    fwd_flops_per_token = sum(2 * i * o for i, o in shapes)
    step_bytes = sum(4 * i * o for i, o in step_weights)
    # the bound: the faster of the layer's GEMM over [x; e] (K = D + E) and its halves (K = D)
    return {"matmul_gflops_fp32": max(gflops(torch.float32, D + E), gflops(torch.float32, D)),
            "matmul_gflops_bf16": max(gflops(torch.bfloat16, D + E), gflops(torch.bfloat16, D)),
            "fwd_flops_per_token": fwd_flops_per_token,
            "read_bandwidth_gbs": bw_dram, "read_bandwidth_cache_gbs": bw_cache,
            "train_flops_per_iteration": 3 * fwd_flops_per_token * N, "step_weight_bytes": step_bytes,
            "step_bound_ms": step_bytes / (bw_cache * 1e9) * 1e3, "step_bound_dram_ms": step_bytes / (bw_dram * 1e9) * 1e3}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="stream,samples,bf16")
    parser.add_argument("--all-layers", default="true,false")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-iterations", type=int, default=40)
    parser.add_argument("--scaling", default="", help="token counts, e.g. 6400,64000,640000: seconds per "
                        "iteration (samples mode, 2 iterations) against data size")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(args.one[0], args.one[1] == "true", args.max_iterations, int(args.one[2]))))
        return
    import torch

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off"}
    if args.scaling:
        rows = []
        for n in [int(x) for x in args.scaling.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--one", "samples", "true", str(n),
                                  "--max-iterations", "2"], capture_output=True, text=True, env=env)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{n:8d} tokens: iteration 0 {row['iter0_s']:.2f}s, parallel iteration {row['iter_s_median']:.2f}s "
                  f"({row['iter_s_median'] / n * 1e6:.1f} us/token), peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        write_report("phase1_scaling", {"torch": torch.__version__, "threads": int(env.get("BENCH_THREADS", "2")),
                                        "rows": rows})
        return
    report = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "threads": int(env.get("BENCH_THREADS", "2")), "torch": torch.__version__,
              "loadavg_start": os.getloadavg(), "results": []}
    for flag in args.all_layers.split(","):
        b = bounds(flag == "true")
        for mode in args.modes.split(","):
            runs = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, __file__, "--one", mode, flag, "6400", "--max-iterations",
                                      str(args.max_iterations)], capture_output=True, text=True, env=env)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]
                   if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool)}
            achieved = b["train_flops_per_iteration"] / med["iter_s_median"] / 1e9
            bound = b["matmul_gflops_bf16" if mode == "bf16" else "matmul_gflops_fp32"]
            seq_ms = med["seq_step_ms"]
            seq_bound_tps = bound * 1e9 / b["fwd_flops_per_token"]  # compute bound of a batched pass
            row = {"mode": mode, "token_input_all_layers": flag == "true", "runs": runs, "median": med,
                   "iteration_gflops": achieved, "matmul_gflops": bound, "iteration_pct_of_matmul": 100 * achieved / bound,
                   "seq_step_ms": seq_ms, "seq_step_bound_ms": b["step_bound_ms"],
                   "seq_tokens_per_s_compute_bound": seq_bound_tps, "bounds": b}
            report["results"].append(row)
            print(f"{mode:8s} all_layers={flag:5s} iter0 {med['iter0_s']:.2f}s  iter {med['iter_s_median']:.2f}s "
                  f"x{med['iterations']:.0f}  total {med['total_s']:.1f}s  rss {med['peak_rss_mb']:.0f}MB  "
                  f"iteration {achieved:.0f} GFLOP/s = {100 * achieved / bound:.0f}% of matmul {bound:.0f}  "
                  f"seq step {seq_ms:.2f} ms (bound {b['step_bound_ms']:.2f} ms at batch 1), "
                  f"{med['seq_tokens_per_s']:.0f} tokens/s (compute bound {seq_bound_tps:.0f})", flush=True)
    report["loadavg_end"] = os.getloadavg()
    write_report("phase1", report)


if __name__ == "__main__":
    main()
