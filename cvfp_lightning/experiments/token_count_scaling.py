"""Progressive token-count scaling of Phase 1 (seed document: phase1-final-results).

For every token count n (10, 20, ..., 100) and both gated architectures (``sequential``
and ``layerwise`` stacking, 2 layers, 256 dims, hidden 256), train
:class:`~cvfp_lightning.modules.Phase1Tokenwise` on the token ids 0..n-1 (the seed
document's "sequential token IDs") for 3 epochs at lr 1e-4 with a Lightning ``Trainer``,
then read the validation pass on the same ids: the fixed point of each token solved from
``c = 0`` with the trained weights (tolerance: per-dimension MSE < 0.01, at most 50
iterations, no warmup). Reported per count: convergence rate and mean iterations.

    cvfp token-scaling                                   # the seed document's table
    cvfp token-scaling --counts '[10, 50]' --epochs 1
    cvfp token-scaling --print_config                    # every option

Prints the seed document's table layout and writes ``<out>/token_scaling.csv`` (one row per
run, with wall seconds). ``--out`` is checked before the runs: an existing ``token_scaling.csv``
there is replaced only when it is an earlier one of this command (its header), any other file
is refused and kept. A progress bar over the runs (ETA from the mean time per run so far)
shows on stderr; ``--progress false`` hides it.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from cvfp_lightning import progress
from cvfp_lightning.data.text import SyntheticTokensDataModule
from cvfp_lightning.errors import check
from cvfp_lightning.io import check_output_file, csv_text, read_text_upto, write_output
from cvfp_lightning.lightning_cli import CVFPArgumentParser
from cvfp_lightning.modules.phase1 import Phase1Tokenwise

ARCHITECTURES = ("sequential", "layerwise")
COLUMNS = ["tokens", "architecture", "convergence_rate", "mean_iterations", "train_convergence_rate", "seconds"]
CSV_NAME = "token_scaling.csv"
EARLIER = "an earlier cvfp token-scaling table (its header: " + ", ".join(COLUMNS) + ")"


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


def run_one(num_tokens: int, stacking: str, args) -> dict:
    """Train one architecture on ``num_tokens`` ids; return the row of the table."""
    L.seed_everything(args.seed, verbose=False)
    data = TokenRangeDataModule(num_tokens=num_tokens, chunk_size=max(num_tokens, 1))
    model = Phase1Tokenwise(
        vocab_size=num_tokens,
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
    """The seed document's layout: one line per token count, both architectures side by side."""
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


def build_parser() -> CVFPArgumentParser:
    from jsonargparse import ActionConfigFile

    parser = CVFPArgumentParser(prog="cvfp token-scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with these options")
    parser.add_argument("--counts", type=list[int], default=list(range(10, 101, 10)), help="token counts")
    parser.add_argument("--architectures", type=list[str], default=list(ARCHITECTURES),
                        help="gated stackings to compare (sequential, layerwise)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--context_dim", type=int, default=256)
    parser.add_argument("--hidden_dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threshold", type=float, default=0.01, help="per-dimension MSE below which a token converged")
    parser.add_argument("--max_iterations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42, help="the RNG seed of every run")
    parser.add_argument("--accelerator", type=str, default="cpu")
    parser.add_argument("--out", type=str, default="lightning_logs/token_scaling", help="folder of token_scaling.csv")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar over the runs")
    return parser


def parse_args(argv: list[str]):
    args = build_parser().parse_args(list(argv))
    check(len(args.counts) > 0 and all(n >= 1 for n in args.counts),
          f"--counts {args.counts} is invalid: every count must be >= 1.")
    bad = [a for a in args.architectures if a not in ARCHITECTURES]
    check(not bad, f"--architectures {bad} is unknown: expected some of {list(ARCHITECTURES)}.")
    check(len(args.architectures) > 0, "--architectures [] is empty: give some of "
                                       f"{list(ARCHITECTURES)}.")
    check(args.epochs >= 1, f"--epochs {args.epochs} is invalid: expected >= 1.")
    from lightning.pytorch.accelerators import AcceleratorRegistry

    names = sorted(set(AcceleratorRegistry.available_accelerators()) | {"auto", "gpu"})
    check(args.accelerator in names, f"--accelerator {args.accelerator!r} is unknown: expected one of {', '.join(names)}.")
    check_output_file(Path(args.out) / CSV_NAME, "--out", is_token_scaling_csv, EARLIER)  # before the runs
    return args


def is_token_scaling_csv(path: Path) -> bool:
    """Whether ``path`` is an earlier ``token_scaling.csv`` (its header is :data:`COLUMNS`): what may be replaced."""
    text = read_text_upto(path, 64 << 20)
    return text is not None and text.split("\n", 1)[0].strip() == ",".join(COLUMNS)


def main(argv: list[str]) -> list[dict]:
    """``cvfp token-scaling ARGS`` (see the module docstring)."""
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    rows = []
    runs = [(n, arch) for n in args.counts for arch in args.architectures]
    with progress.switched(args.progress), progress.task("cvfp token-scaling", total=len(runs), unit="runs") as bar:
        for n, arch in runs:
            rows.append(run_one(n, arch, args))
            r = rows[-1]
            print(f"{n:4d} tokens  {arch:10s}  converged {100 * r['convergence_rate']:5.1f}%  "
                  f"mean iterations {r['mean_iterations']:5.2f}  ({r['seconds']:.1f} s)", flush=True)
            bar.advance(1)
    path = write_output(csv_text(rows, COLUMNS), Path(args.out) / CSV_NAME, "--out", is_token_scaling_csv, EARLIER,
                        note="; the table is printed below")
    print()
    print(table(rows))
    print(f"\nwritten: {path}")
    return rows
