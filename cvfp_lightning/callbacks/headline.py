"""``HeadlineMetric``: the run's headline number as TensorBoard's ``hp_metric``."""

from __future__ import annotations

import math

import lightning as L

from cvfp_lightning.modules.lm_base import NextTokenModule
from cvfp_lightning.modules.phase1.base import Phase1Base
from cvfp_lightning.modules.repetition import RepetitionCVFPT
from cvfp_lightning.modules.topk.base import TopKBase

# (kind of module, metric, which value): the first kind that matches decides
HEADLINES: list[tuple[type, str, str]] = [
    (NextTokenModule, "val/bpb", "min"),  # Phase 2 and baselines: the best validation bits per byte
    (Phase1Base, "train/convergence_rate", "last"),  # Phase 1: the final convergence rate
    (TopKBase, "topk/convergence_rate", "last"),
    (RepetitionCVFPT, "train/conv_metric", "last"),
]


def headline_of(pl_module: L.LightningModule) -> tuple[str, str] | None:
    """``(metric, "min" | "max" | "last")`` of ``pl_module``'s kind, None for other modules."""
    return next(((name, mode) for kind, name, mode in HEADLINES if isinstance(pl_module, kind)), None)


class HeadlineMetric(L.Callback):
    """Log the headline of the fit as ``hp_metric`` when fit ends (the HPARAMS tab's metric column).

    Lightning's TensorBoardLogger records ``hp_metric = -1`` with the hyperparameters when fit
    starts (``default_hp_metric``); the HPARAMS tab shows the last value of the ``hp_metric``
    scalar, so this writes the real one at the last step: :data:`HEADLINES` names it per model
    kind (Phase 1: final ``train/convergence_rate``; Phase 2 and baselines: best ``val/bpb``
    over the fit's validation epochs, the best checkpoint's). Nothing is logged when the
    metric never appeared (e.g. a fit without validation); a test pass that follows the fit
    writes it once more. The values seen are in the checkpoints, so a resumed run's best is that
    of the whole training. ``cvfp`` adds it to every run.

    Attributes:
        value: the headline logged (None before the end of fit or when there was none).
    """

    def __init__(self):
        self.value: float | None = None
        self._seen: list[float] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before a resume loads the values seen so far (state_dict)
            self.value, self._seen = None, []

    def state_dict(self) -> dict:
        return {"seen": list(self._seen)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._seen = [float(v) for v in state_dict.get("seen", [])]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        headline = headline_of(pl_module)
        if headline is None or trainer.sanity_checking or headline[1] == "last":
            return
        value = trainer.callback_metrics.get(headline[0])
        if value is not None and math.isfinite(float(value)):
            self._seen.append(float(value))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        headline = headline_of(pl_module)
        if headline is None:
            return
        name, mode = headline
        if mode == "last":
            value = trainer.callback_metrics.get(name)
            value = float(value) if value is not None else None
        else:
            value = (min if mode == "min" else max)(self._seen) if self._seen else None
        if value is None or not math.isfinite(value):
            return
        self.value = value
        self._log(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A test pass after the fit on the same trainer (``cvfp fit`` with a test split) starts with
        Lightning's ``hp_metric = -1`` again: write the fit's headline after it."""
        if self.value is not None:
            self._log(trainer)

    def _log(self, trainer: L.Trainer) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"hp_metric": self.value}, step=trainer.global_step)
