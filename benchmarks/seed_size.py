"""The seeds' own configs at a size of their next step: Phase 1 to its stop, the cache, Phase 2.

``configs/phase1_seed.yaml`` (residual 768 x 6, ``token_input_all_layers: false``, one
``stream``, vocabulary 50257, early stop at 95% convergence after at least 5 iterations)
and ``configs/phase2_seed.yaml`` (tied head over the frozen embedding, cache hand-off), each a
fresh ``cvfp fit`` subprocess in a temporary folder, with only the size changed: the seeds'
500 UltraChat samples are about 625,000 GPT-2 tokens (``--tokens``), synthetic ids here,
laid out as 500 samples of 1,250 ids (``--sequences samples --max_seq_len 1250``, the
default) or as the config's one stream (``--sequences stream``: its iteration 0 and the cache
pass read the stream one token at a time, about 360 tokens/s on one thread here, 2.8 ms per
token at 768 x 6, so 32 minutes per pass at 687,500 train + validation tokens).
Memory is sampled as in ``scale.py`` (peak ``VmRSS`` / ``RssAnon`` per process,
``ru_maxrss``); Phase 1's iterations and last convergence rate and effective rank are read
from its TensorBoard events.

    python benchmarks/seed_size.py                                  # 625,000 tokens (500 x 1,250), 62,500 val
    python benchmarks/seed_size.py --sequences stream               # the config's one stream
    python benchmarks/seed_size.py --tokens 100000 --phase2_epochs 1

Writes ``results/seed_size_<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from report import write_report
from scale import ROOT, cvfp_command, measure

CONFIGS = ROOT / "configs"
SCALARS = ("train/convergence_rate", "val/convergence_rate", "train/effective_rank_pct", "val/effective_rank_pct")


def last_scalars(log_dir: Path) -> dict:
    """The last value and the number of points of each of :data:`SCALARS` in ``log_dir``'s events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    return {tag: {"last": acc.Scalars(tag)[-1].value, "points": len(acc.Scalars(tag))} for tag in SCALARS
            if tag in tags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=625_000, help="training tokens (one stream)")
    parser.add_argument("--val_tokens", type=int, default=62_500)
    parser.add_argument("--sequences", choices=("samples", "stream"), default="samples")
    parser.add_argument("--max_seq_len", type=int, default=1250, help="ids per sample (samples)")
    parser.add_argument("--phase2_epochs", type=int, default=1, help="Phase 2 epochs (the seed config runs up to 10)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between /proc samples")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cvfp_seed_size_"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CVFP_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "OMP_NUM_THREADS": str(args.threads)}
    data = ["--data.init_args.num_tokens", str(args.tokens), "--data.init_args.val_tokens", str(args.val_tokens),
            "--data.init_args.sequences", args.sequences]
    if args.sequences == "samples":
        data += ["--data.init_args.max_seq_len", str(args.max_seq_len)]
    quiet = ["--trainer.enable_progress_bar", "false"]
    report = {"args": vars(args), "loadavg_before": os.getloadavg()}
    try:
        p1 = measure([*cvfp_command(), "fit", "--config", str(CONFIGS / "phase1_seed.yaml"), *data, *quiet],
                     work, env, args.interval, work / "phase1.log")
        print(f"phase1: rc {p1['rc']}, {p1['wall_s']:.0f} s, peak RSS {p1['peak_rss_kb'] / 2**20:.2f} GiB, "
              f"peak RssAnon {p1['peak_anon_kb'] / 2**20:.2f} GiB", flush=True)
        report["phase1"] = p1
        runs = sorted(work.glob("lightning_logs/phase1_seed/version_*"))
        if p1["rc"] == 0 and runs:
            report["phase1"]["scalars"] = last_scalars(runs[-1])
            report["phase1"]["cache_bytes"] = sum(f.stat().st_size for f in (runs[-1] / "checkpoints" /
                                                                             "context_cache").iterdir())
            report["phase1"]["checkpoint_bytes"] = {f.name: f.stat().st_size
                                                    for f in (runs[-1] / "checkpoints").glob("*.ckpt")}
            print(f"phase1: {report['phase1']['scalars']}", flush=True)
            p2 = measure([*cvfp_command(), "fit", "--config", str(CONFIGS / "phase2_seed.yaml"), *data, *quiet,
                          "--trainer.max_epochs", str(args.phase2_epochs), "--model.init_args.phase1_checkpoint",
                          str(runs[-1] / "checkpoints" / "last.ckpt")], work, env, args.interval, work / "phase2.log")
            p2["context_cache_hit"] = "cache hit" in (work / "phase2.log").read_text()
            report["phase2"] = p2
            print(f"phase2: rc {p2['rc']}, {p2['wall_s']:.0f} s, peak RSS {p2['peak_rss_kb'] / 2**20:.2f} GiB, "
                  f"peak RssAnon {p2['peak_anon_kb'] / 2**20:.2f} GiB, cache hit {p2['context_cache_hit']}",
                  flush=True)
        for stage in ("phase1", "phase2"):
            log = work / f"{stage}.log"
            if log.exists():
                report.setdefault(stage, {})["log_tail"] = log.read_text()[-2500:]
    finally:
        report["loadavg_after"] = os.getloadavg()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write_report("seed_size", report)


if __name__ == "__main__":
    main()
