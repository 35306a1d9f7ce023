"""Progressive token-count scaling of Phase 1 (seed: phase1-final-results).

For every token count n (10, 20, ..., 100) and both gated architectures (``sequential``
and ``layerwise`` stacking, 2 layers, 256 dims, hidden 256), train
:class:`~cvfp_lightning.modules.Phase1FixedPoint` in ``tokenwise`` mode on the token ids
0..n-1 (the seed's "sequential token IDs") for 3 epochs at lr 1e-4 with a Lightning
``Trainer``, then read the validation pass on the same ids: the fixed point of each token
solved from ``c = 0`` with the trained weights (tolerance: per-dimension MSE < 0.01, at most
50 iterations, no warmup). Reported per count: convergence rate and mean iterations.

    python -m cvfp_lightning.experiments.token_scaling               # the seed's table
    python -m cvfp_lightning.experiments.token_scaling --counts 10 50 --epochs 1

Prints the seed's table layout and writes ``<out>/token_scaling.csv`` (one row per run, with
wall seconds).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from cvfp_lightning.data.text import SyntheticTokensDataModule
from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.io import atomic_write_text
from cvfp_lightning.modules.phase1 import Phase1FixedPoint
from cvfp_lightning.runtime import tune_cpu_allocator

ARCHITECTURES = ("sequential", "layerwise")
COLUMNS = ["tokens", "architecture", "convergence_rate", "mean_iterations", "train_convergence_rate", "seconds"]


class TokenRangeDataModule(SyntheticTokensDataModule):
    """The ids ``0 .. n-1`` once each, as training data and (the same ids) as validation data."""

    def __init__(self, num_tokens: int = 10, **kwargs):
        super().__init__(vocab_size=num_tokens, num_tokens=num_tokens, val_tokens=num_tokens, **kwargs)

    def describe(self) -> str:
        return f"token ids 0..{self.num_tokens - 1}"

    def load_tokens(self) -> dict:
        n = self.num_tokens
        return {"ids": torch.arange(n).repeat(2), "lengths": torch.tensor([n, n]),
                "nbytes": torch.zeros(2, dtype=torch.long)}


def run_one(num_tokens: int, stacking: str, args: argparse.Namespace) -> dict:
    """Train one architecture on ``num_tokens`` ids; return the row of the table."""
    L.seed_everything(args.seed, verbose=False)
    data = TokenRangeDataModule(num_tokens=num_tokens, chunk_size=max(num_tokens, 1))
    model = Phase1FixedPoint(
        vocab_size=num_tokens, mode="tokenwise",
        context={"updater": "gated", "stacking": stacking, "context_dim": args.context_dim,
                 "hidden_dim": args.hidden_dim, "num_layers": args.layers},
        embedding={"embed_dim": args.context_dim, "freeze": True},
        convergence_threshold=args.threshold, max_inner_iterations=args.max_iterations, warmup_iterations=0,
        lr=args.lr, grad_clip=1.0)
    trainer = L.Trainer(accelerator=args.accelerator, devices=1, max_epochs=args.epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    m = trainer.callback_metrics
    return {"tokens": num_tokens, "architecture": stacking, "convergence_rate": float(m["val/convergence_rate"]),
            "mean_iterations": float(m["val/mean_iterations"]),
            "train_convergence_rate": float(m["train/convergence_rate"]), "seconds": seconds}


def table(rows: list[dict]) -> str:
    """The seed's layout: one line per token count, both architectures side by side."""
    by = {(r["tokens"], r["architecture"]): r for r in rows}
    counts = sorted({r["tokens"] for r in rows})

    def rate(r):
        return f"{'✅' if r['convergence_rate'] >= 1.0 else '❌'} {100 * r['convergence_rate']:.0f}%" if r else "-"

    def iters(r):
        return f"{r['mean_iterations']:.1f}" if r else "-"

    lines = ["| Token Count | Sequential | Layer-wise | Seq Avg Iters | Layer Avg Iters |",
             "|-------------|------------|------------|---------------|-----------------|"]
    for n in counts:
        s, w = by.get((n, "sequential")), by.get((n, "layerwise"))
        lines.append(f"| {n} | {rate(s)} | {rate(w)} | {iters(s)} | {iters(w)} |")
    lines.append("")
    for arch in ARCHITECTURES:
        secs = [r["seconds"] for r in rows if r["architecture"] == arch]
        if secs:
            lines.append(f"{arch}: {len(secs)} runs, {sum(secs):.1f} s wall in all")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cvfp_lightning.experiments.token_scaling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--counts", type=int, nargs="+", default=list(range(10, 101, 10)), help="token counts")
    p.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), help="gated stackings to compare")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--context-dim", type=int, default=256)
    p.add_argument("--hidden-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.01, help="per-dimension MSE below which a token converged")
    p.add_argument("--max-iterations", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--out", default="lightning_logs/token_scaling", help="folder of token_scaling.csv")
    args = p.parse_args(argv)
    check(all(n >= 1 for n in args.counts), f"--counts {args.counts} is invalid: every count must be >= 1.")
    bad = [a for a in args.architectures if a not in ARCHITECTURES]
    check(not bad, f"--architectures {bad} is unknown: expected some of {list(ARCHITECTURES)}.")
    check(args.epochs >= 1, f"--epochs {args.epochs} is invalid: expected >= 1.")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    tune_cpu_allocator()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    rows = []
    for n in args.counts:
        for arch in args.architectures:
            rows.append(run_one(n, arch, args))
            r = rows[-1]
            print(f"{n:4d} tokens  {arch:10s}  converged {100 * r['convergence_rate']:5.1f}%  "
                  f"mean iterations {r['mean_iterations']:5.2f}  ({r['seconds']:.1f} s)", flush=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = atomic_write_text(buf.getvalue(), Path(args.out) / "token_scaling.csv")
    print()
    print(table(rows))
    print(f"\nwritten: {path}")
    return rows


if __name__ == "__main__":
    import sys

    try:
        main()
    except CVFPUserError as exc:
        print(f"token_scaling: error: {exc}", file=sys.stderr)
        sys.exit(2)
