"""Profile one parallel Phase 1 iteration on the reference workload (torch.profiler).

Runs the real ``Phase1Parallel`` for 5 iterations and profiles the fifth (the first ones
warm up caches and the allocator's heap, which takes 3 iterations), then prints the ops by self CPU time and the minor page
faults of every iteration, and writes the table to ``results/profile_phase1_<time>.txt``.
This is how the before/after figures in ``benchmarks/README.md`` were taken.

    python benchmarks/profile_phase1.py                       # samples, token_input_all_layers true
    python benchmarks/profile_phase1.py --mode stream --all-layers false --shapes
    CVFP_MALLOC_TUNING=0 python benchmarks/profile_phase1.py  # without the allocator settings
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROFILED = 4  # the 0-based epoch (iteration) that is profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["stream", "samples"], default="samples")
    parser.add_argument("--all-layers", choices=["true", "false"], default="true")
    parser.add_argument("--chunk", type=int, default=1600, help="data.chunk_size (positions per step)")
    parser.add_argument("--shapes", action="store_true", help="group the ops by input shapes")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cvfp_lightning.data import SyntheticTokensDataModule
    from cvfp_lightning.modules import Phase1Parallel
    from cvfp_lightning.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # off with CVFP_MALLOC_TUNING=0
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    L.seed_everything(42, verbose=False)
    samples = args.mode == "samples"
    dm = SyntheticTokensDataModule(vocab_size=50257, num_tokens=6400, val_tokens=1280, seed=42,
                                   sequences=args.mode, max_seq_len=128 if samples else None, chunk_size=args.chunk)
    model = Phase1Parallel(vocab_size=50257,
                             context={"updater": "residual", "context_dim": 768, "num_layers": 6,
                                      "token_input_all_layers": args.all_layers == "true"},
                             embedding={"embed_dim": 768, "freeze": True}, dist_reg_weight=0.8, noise_std=0.1,
                             convergence_threshold=0.03, lr=2e-3)
    report: list[str] = []

    class Profiled(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.start = time.perf_counter()
            if trainer.current_epoch == PROFILED:
                self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes)
                self.prof.__enter__()

        def on_train_epoch_end(self, trainer, pl_module):
            seconds = time.perf_counter() - self.start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults
            report.append(f"iteration {trainer.current_epoch + 1}: {seconds:.3f} s, {faults} minor page faults"
                          + (" (profiled)" if trainer.current_epoch == PROFILED else ""))
            if trainer.current_epoch == PROFILED:
                self.prof.__exit__(None, None, None)
                report.append(self.prof.key_averages(group_by_input_shape=args.shapes).table(
                    sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
                    max_shapes_column_width=60))

    trainer = L.Trainer(accelerator="cpu", max_epochs=PROFILED + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Profiled()])
    trainer.fit(model, dm)
    text = (f"mode={args.mode} token_input_all_layers={args.all_layers} chunk={args.chunk} "
            f"threads={torch.get_num_threads()} torch={torch.__version__} "
            f"malloc_tuning={os.environ.get('CVFP_MALLOC_TUNING', '1')}\n"
            f"iteration 0: {model._iteration0_seconds:.3f} s\n" + "\n".join(report))
    print(text)
    out = HERE / "results" / f"profile_phase1_{time.strftime('%Y%m%d_%H%M%S')}.txt"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
