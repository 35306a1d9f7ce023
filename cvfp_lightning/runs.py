"""Runs as plain functions: ``fit(args) -> FitResult`` and the Lightning subcommands of ``cvfp``.

``fit`` is ``cvfp fit ARGS`` in this process (the same :class:`CVFPCLI`, no second training
loop) and returns what the run produced, typed, so callers (the scaling law, tests,
sweeps) need not reach into the trainer (lightning-hydra-template's ``train(cfg)``).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cvfp_lightning.callbacks import ContextCacheHandoff, ConvergenceEarlyStopping, RunSummary
from cvfp_lightning.lightning_cli import CVFPCLI, check_config_files


@dataclass(frozen=True)
class FitResult:
    """What one ``cvfp fit`` produced.

    Attributes:
        log_dir: the run folder (``lightning_logs/<name>/version_N``), None without a logger.
        last_checkpoint / best_checkpoint: ``last.ckpt`` and the monitored best (None when absent).
        context_cache: the cache a ``ContextCacheHandoff`` wrote (Phase 1), else None.
        epochs: epochs run (Phase 1: parallel iterations).
        converged: a ``ConvergenceEarlyStopping`` stopped the run at its target.
        metrics: the trainer's final ``callback_metrics`` as floats.
        summary: the best epoch's ``summary.json`` content (next-token models), else ``{}``.
        tokens: token counts of the data splits (``train``, ``val``, ``test`` when present).
    """

    log_dir: Path | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    context_cache: Path | None
    epochs: int
    converged: bool
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def program_argv():
    """LightningCLI warns when it gets ``args`` while ``sys.argv`` has arguments too: hide ours meanwhile."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def _path(value) -> Path | None:
    return Path(value) if value else None


def result_of(cli: CVFPCLI) -> FitResult:
    """The :class:`FitResult` of a finished ``fit`` of ``cli``."""
    trainer = cli.trainer
    callbacks = trainer.callbacks
    handoff = next((c for c in callbacks if isinstance(c, ContextCacheHandoff)), None)
    stopper = next((c for c in callbacks if isinstance(c, ConvergenceEarlyStopping)), None)
    summary = next((c for c in callbacks if isinstance(c, RunSummary)), None)
    ckpt = trainer.checkpoint_callback
    dm = trainer.datamodule
    tokens = {split: int(seqs.num_tokens) for split in ("train", "val", "test")
              if (seqs := getattr(dm, f"{split}_sequences", None)) is not None}
    return FitResult(log_dir=_path(trainer.log_dir) if trainer.loggers else None,
                     last_checkpoint=_path(getattr(ckpt, "last_model_path", None)),
                     best_checkpoint=_path(getattr(ckpt, "best_model_path", None)),
                     context_cache=handoff.written if handoff is not None else None,
                     epochs=int(trainer.current_epoch),
                     converged=bool(stopper is not None and stopper.stopped_at_iteration is not None),
                     metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
                     summary=dict(summary.summary) if summary is not None else {}, tokens=tokens)


def fit(args: list[str]) -> FitResult:
    """``cvfp fit ARGS`` in this process; what it produced."""
    check_config_files(args)
    with program_argv():
        cli = CVFPCLI(args=["fit", *args])
    return result_of(cli)


def lightning_main(argv: list[str]) -> None:
    """``cvfp fit|validate|test|predict ARGS`` (LightningCLI parses ``argv``, subcommand first)."""
    check_config_files(argv)
    # LightningCLI reads sys.argv itself; pass args only when they differ (in-process calls)
    CVFPCLI(args=None if argv == sys.argv[1:] else argv)
