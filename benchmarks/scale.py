"""Peak memory against data size: what every position costs, per stage and per process.

The pipeline, through the real CLI (each stage a fresh ``cvfp fit`` subprocess, run in a
temporary folder with its own token cache):

1. ``phase1``: Phase 1 on synthetic ids (``SyntheticTokensDataModule``, ``sequences:
   samples``, ``max_seq_len`` 512), iteration 0 plus 2 parallel iterations
   (``max_epochs: 2``), with ``EffectiveRankMonitor``, ``CVFPDiagnostics`` and
   ``ContextCacheHandoff`` (the context cache is written at the end of this stage);
2. ``phase2``: one Phase 2 epoch on that checkpoint and its cache (the seed's Phase 2
   settings: head tied to the frozen embedding; a zero-initialised head with ``--demo``),
   with its validation.

For every size (``--sizes``: training positions; ``--val_tokens`` validation positions at
every size) it records the wall time, the child's ``ru_maxrss`` (``os.wait4``) and, by
sampling ``/proc/<pid>/status`` of the process tree every ``--interval`` seconds, each
process's peak ``VmRSS`` and peak ``RssAnon`` (anonymous memory: what a memory-mapped file
in the page cache does not count in). The slope of a least-squares line through the sizes
is the cost of one more training position, in KB per token, per stage and metric.

``--stage data`` measures the data layer alone instead: ``prepare_data`` + ``setup`` + one
epoch of every loader layout (Phase 1 chunks, Phase 2 shuffled positions, baseline
windows; train and validation) over the same synthetic ids, in a fresh process per size.

    python benchmarks/scale.py                                   # 768 x 6, token_input_all_layers true
    python benchmarks/scale.py --token_input_all_layers false
    python benchmarks/scale.py --demo --sizes 1000000,4000000     # the demo's shape (128 x 3), large N
    python benchmarks/scale.py --devices 2                       # 2 DDP CPU processes, per-process peaks
    python benchmarks/scale.py --stage data --sizes 1000000,10000000
    python benchmarks/scale.py --pythonpath /path/to/other/checkout   # measure another version of the code

Writes ``benchmarks/results/scale_<date>.json`` (every run, the slopes, load averages before
and after, the machine) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from report import write_report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STATUS_FIELDS = ("VmRSS", "RssAnon", "VmHWM")


# ---- memory of a process tree -------------------------------------------------------------
def _status_kb(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon``, ``VmHWM`` of ``pid`` in KB ({} once it has exited)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in STATUS_FIELDS:
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (parents read from ``/proc/<pid>/stat``)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        tree += frontier
    return tree


class TreeSampler(threading.Thread):
    """Polls the memory of a process tree; ``peaks[pid] = {"VmRSS", "RssAnon", "VmHWM"}`` maxima."""

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peaks: dict[int, dict[str, int]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for pid in _descendants(self.root):
                for key, value in _status_kb(pid).items():
                    peak = self.peaks.setdefault(pid, {})
                    peak[key] = max(peak.get(key, 0), value)
            self.done.wait(self.interval)


def measure(cmd: list[str], cwd: Path, env: dict, interval: float, log: Path) -> dict:
    """Run ``cmd``; wall seconds, ``ru_maxrss`` of the child and the sampled per-process peaks (KB)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.done.set()
        sampler.join()
    procs = [{"pid": pid, "peak_rss_kb": p.get("VmRSS", 0), "peak_anon_kb": p.get("RssAnon", 0),
              "hwm_kb": p.get("VmHWM", 0)} for pid, p in sorted(sampler.peaks.items())
             if p.get("VmRSS", 0) > 50_000]  # the Python processes, not shell wrappers
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - start, 2),
            "ru_maxrss_kb": usage.ru_maxrss,
            "peak_rss_kb": max([p["hwm_kb"] for p in procs] + [p["peak_rss_kb"] for p in procs] + [0]),
            "peak_anon_kb": max([p["peak_anon_kb"] for p in procs] + [0]), "processes": procs}


# ---- the configs ----------------------------------------------------------------------------
def data_block(args, size: int, chunk_size: int) -> dict:
    return {"class_path": "cvfp_lightning.data.SyntheticTokensDataModule",
            "init_args": {"vocab_size": args.vocab_size, "num_tokens": size, "val_tokens": args.val_tokens,
                          "seed": 42, "sequences": "samples", "max_seq_len": args.max_seq_len,
                          "chunk_size": chunk_size}}


def trainer_block(args, name: str, epochs: int) -> dict:
    trainer = {"accelerator": "cpu", "max_epochs": epochs, "log_every_n_steps": 1, "num_sanity_val_steps": 0,
               "enable_progress_bar": False, "enable_model_summary": False,
               "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                          "init_args": {"save_dir": "lightning_logs", "name": name}}}
    if args.devices > 1:
        trainer.update({"strategy": "ddp", "devices": args.devices})
    return trainer


def phase1_config(args, size: int) -> dict:
    model = {"context": {"updater": "residual", "context_dim": args.dims, "num_layers": args.layers,
                         "token_input_all_layers": args.token_input_all_layers},
             "embedding": {"embed_dim": args.dims, "freeze": True},
             "dist_reg_weight": 0.8, "diversity_center": "global", "noise_std": 0.1,
             "convergence_threshold": 0.03, "lr": 0.002, "grad_clip": 1.0}
    if args.demo:
        model["context"]["init_std"] = 0.3
    if args.phase1_class.endswith("Phase1FixedPoint"):  # the one-class-two-modes name of older checkouts
        model["mode"] = "parallel"
    for key in ("context_dtype", "context_store"):  # passthrough for options of later Phase 1 versions
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    return {"seed_everything": 42, "trainer": {**trainer_block(args, "phase1", 2), "callbacks": [
        {"class_path": "cvfp_lightning.callbacks.EffectiveRankMonitor"},
        {"class_path": "cvfp_lightning.callbacks.CVFPDiagnostics"},
        {"class_path": "cvfp_lightning.callbacks.ContextCacheHandoff"}]},
        "model": {"class_path": args.phase1_class, "init_args": model},
        "data": data_block(args, size, args.phase1_chunk)}


def phase2_config(args, size: int, phase1_ckpt: Path) -> dict:
    return {"seed_everything": 42, "trainer": trainer_block(args, "phase2", 1),
            "model": {"class_path": "cvfp_lightning.modules.Phase2LM", "init_args": {
                "phase1_checkpoint": str(phase1_ckpt), "weight_tying": args.weight_tying, "freeze_embedding": True,
                "lr": 0.001, "grad_clip": 1.0, "cache": "auto"}},
            "data": data_block(args, size, args.phase2_chunk)}


DATA_STAGE = textwrap.dedent("""
    import sys, types
    from cvfp_lightning.data import SyntheticTokensDataModule
    size, val, vocab, max_len = (int(a) for a in sys.argv[1:5])
    dm = SyntheticTokensDataModule(vocab_size=vocab, num_tokens=size, val_tokens=val, seed=42, sequences="samples",
                                   max_seq_len=max_len, chunk_size=4096, batch_size=16, seq_len=max_len)
    dm.prepare_data()
    dm.setup()
    batches = 0
    for layout in ("position_chunks", "positions", "windows"):
        if hasattr(dm, "connect"):
            dm.connect(layout)
        else:  # checkouts from before the connect handshake read the module's data_layout
            dm.trainer = types.SimpleNamespace(lightning_module=types.SimpleNamespace(data_layout=layout), world_size=1)
        for seqs, train in ((dm.train_sequences, True), (dm.val_sequences, False)):
            for batch in dm._loader(seqs, train):
                batches += 1
    print("batches", batches)
""")


def cvfp_command() -> list[str]:
    """The ``cvfp`` console script of this interpreter (a real script path, as DDP re-launches argv)."""
    script = Path(sys.executable).parent / "cvfp"
    if not script.exists():
        found = shutil.which("cvfp")
        if found is None:
            sys.exit("benchmarks/scale.py: no `cvfp` script next to this Python or on PATH: pip install -e . first.")
        script = Path(found)
    return [sys.executable, str(script)]


def write_yaml(obj: dict, path: Path) -> Path:
    path.write_text(json.dumps(obj, indent=1))  # JSON is YAML
    return path


def run_size(args, size: int, work: Path, env: dict) -> list[dict]:
    folder = work / f"size_{size}"
    folder.mkdir()
    rows = []

    def record(stage: str, cmd: list[str]) -> dict:
        row = {"size": size, "positions": size + args.val_tokens, "stage": stage,
               **measure(cmd, folder, env, args.interval, folder / f"{stage}.log")}
        rows.append(row)
        print(f"  {stage:7s} N={size:>9,d}  {row['wall_s']:8.1f} s  ru_maxrss {row['ru_maxrss_kb'] / 1024:8.1f} MB  "
              f"peak RssAnon {row['peak_anon_kb'] / 1024:8.1f} MB  rc {row['rc']}", flush=True)
        if row["rc"] != 0:
            print((folder / f"{stage}.log").read_text()[-3000:], file=sys.stderr)
        return row

    if args.stage == "data":
        record("data", [sys.executable, "-c", DATA_STAGE, str(size), str(args.val_tokens), str(args.vocab_size),
                        str(args.max_seq_len)])
        return rows
    p1 = write_yaml(phase1_config(args, size), folder / "phase1.yaml")
    if record("phase1", [*cvfp_command(), "fit", "--config", str(p1), *args.extra])["rc"] != 0:
        return rows
    ckpt = next(folder.glob("lightning_logs/phase1/version_*/checkpoints/last.ckpt"))
    p2 = write_yaml(phase2_config(args, size, ckpt), folder / "phase2.yaml")
    record("phase2", [*cvfp_command(), "fit", "--config", str(p2)])
    log = (folder / "phase2.log").read_text()
    rows[-1]["context_cache_hit"] = "cache hit" in log
    return rows


def slopes(rows: list[dict]) -> dict:
    """KB per training position (``<metric>_per_token``): least-squares slope over the sizes, per stage."""
    import numpy as np

    out = {}
    for stage in sorted({r["stage"] for r in rows}):
        ok = [r for r in rows if r["stage"] == stage and r["rc"] == 0]
        if len({r["size"] for r in ok}) < 2:
            continue
        x = np.array([r["size"] for r in ok], dtype=float)
        out[stage] = {f"{m}_per_token": float(np.polyfit(x, [r[f"{m}_kb"] for r in ok], 1)[0])
                      for m in ("ru_maxrss", "peak_rss", "peak_anon")}
        out[stage]["wall_s_per_1k_tokens"] = float(np.polyfit(x, [r["wall_s"] for r in ok], 1)[0] * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("pipeline", "data"), default="pipeline")
    parser.add_argument("--sizes", default="44000,176000", help="training positions, comma separated (at least 2)")
    parser.add_argument("--val_tokens", type=int, default=4096, help="validation positions at every size")
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--token_input_all_layers", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--demo", action="store_true", help="the demo's shape: 128 dims, 3 layers, init_std 0.3")
    parser.add_argument("--vocab_size", type=int, default=50257)
    parser.add_argument("--weight_tying", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                        help="Phase 2 head tied to the frozen embedding (default: true, the seed's; false with --demo, "
                             "whose small random embedding gives overflowing logits when tied)")
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--phase1_chunk", type=int, default=4096, help="Phase 1 positions per chunk")
    parser.add_argument("--phase2_chunk", type=int, default=1024, help="Phase 2 positions per batch")
    parser.add_argument("--devices", type=int, default=1, help="> 1: DDP over that many CPU processes")
    parser.add_argument("--context_dtype", default=None, help="passed to Phase 1 as model.init_args.context_dtype")
    parser.add_argument("--context_store", default=None, help="passed to Phase 1 as model.init_args.context_store")
    parser.add_argument("--phase1_class", default="cvfp_lightning.modules.Phase1Parallel",
                        help="Phase 1 class_path (cvfp_lightning.modules.Phase1FixedPoint for checkouts from before "
                             "the one-class-per-algorithm redesign, which know no context_dtype / context_store)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each process (1: steady on a shared machine; memory barely depends on it)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between /proc samples")
    parser.add_argument("--pythonpath", default=str(ROOT), help="the checkout whose cvfp_lightning is measured")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    parser.add_argument("extra", nargs="*", help="more `cvfp fit` arguments for Phase 1 (after --)")
    args = parser.parse_args()
    if args.demo:
        args.dims, args.layers = 128, 3
    if args.weight_tying is None:
        args.weight_tying = not args.demo
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 2 or sorted(set(sizes)) != sizes:
        sys.exit("benchmarks/scale.py: --sizes needs at least 2 strictly increasing sizes")
    work = Path(tempfile.mkdtemp(prefix="cvfp_scale_"))
    env = {**os.environ, "PYTHONPATH": args.pythonpath, "CVFP_CACHE_DIR": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    shape = f"{args.dims} x {args.layers}, token_input_all_layers {str(args.token_input_all_layers).lower()}"
    print(f"{args.stage}: sizes {sizes}, {shape}, devices {args.devices}, code {args.pythonpath}, "
          f"load {os.getloadavg()}", flush=True)
    load_before = os.getloadavg()
    rows = []
    try:
        for size in sizes:
            rows += run_size(args, size, work, env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "stage": args.stage, "shape": shape,
              "args": {k: v for k, v in vars(args).items()}, "python": platform.python_version(),
              "machine": {"cpus": os.cpu_count(), "processor": _cpu_model()},
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "runs": rows, "slopes": slopes(rows)}
    try:
        import torch

        report["torch"] = torch.__version__
    except ImportError:
        pass
    for stage, s in report["slopes"].items():
        print(f"slope {stage:7s}: ru_maxrss {s['ru_maxrss_per_token'] * 1024:9.1f} B/token, peak RssAnon "
              f"{s['peak_anon_per_token'] * 1024:9.1f} B/token, {s['wall_s_per_1k_tokens']:.3f} s per 1k tokens")
    write_report("scale", report)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
