"""``RunSummary``: when a next-token fit ends, load its best weights back and write ``summary.json``."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from cvfp_lightning.callbacks.figures import curve_figure, log_figure, wants_figures
from cvfp_lightning.io import atomic_write_json, safe_torch_load


class RunSummary(L.Callback):
    """Record every validation epoch; at the end of fit restore the best weights and summarise.

    The best epoch is the one of the best checkpoint (the ``ModelCheckpoint`` monitor,
    ``val/loss`` in the shipped configs): its weights are loaded back into the module on
    every rank, and ``summary.json`` in the run folder (rank 0) records that epoch's
    ``val/*`` metrics, the model's trainable parameter count, the data's token counts,
    the median epoch time and the module's ``summary_extra()``. Without a monitored
    checkpoint the best epoch is the one with the lowest ``val/loss``. After every validation
    epoch the TensorBoard figure ``figures/val_curve`` (val PPL, log y, and val bpb against
    epoch, the best so far marked) is redrawn, at step = the epoch. ``cvfp`` adds this
    callback to every next-token model (Phase 2, baselines); nothing is written in
    ``fast_dev_run`` or without a logger. A test run that follows the fit on the same trainer
    (``cvfp fit`` does one when the data has a test split) adds its ``test/*`` metrics to
    ``summary.json``.

    The validation history is part of the callback's checkpoint state, so a run resumed with
    ``--ckpt_path`` reports its best epoch (and draws the curve) over the whole training, as
    the uninterrupted run does; ``epochs_run`` counts the epochs of the whole training,
    ``epochs_this_run`` (and ``median_epoch_s``) those trained in this process.
    """

    def __init__(self):
        self.history: list[dict[str, float]] = []
        self.epoch_seconds: list[float] = []
        self.summary: dict = {}
        self._epoch_start: float | None = None

    def state_dict(self) -> dict:
        return {"history": [dict(record) for record in self.history]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [dict(record) for record in state_dict.get("history", [])]

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_start is not None:  # None: the epoch's training ran before a resume
            self.epoch_seconds.append(time.perf_counter() - self._epoch_start)  # training and the epoch's validation
        self._epoch_start = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        record = {"epoch": int(trainer.current_epoch)}
        record.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        self.history.append(record)
        if wants_figures(trainer) and "val/ppl" in record:
            best = min(self.history, key=lambda r: r.get("val/loss", float("inf")))["epoch"]
            title = f"{type(pl_module).__name__}: validation after each epoch (best so far: epoch {best})"
            log_figure(trainer, "figures/val_curve", curve_figure(self.history, best, title), trainer.current_epoch)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best_path, best_epoch = self._restore_best(trainer, pl_module)
        self.summary = self._summary(trainer, pl_module, best_path, best_epoch)
        log_dir = self._write(trainer)
        if log_dir:
            shown = {k: round(v, 4) for k, v in self.summary.items() if k.startswith("val/") and isinstance(v, float)}
            rank_zero_info(f"{type(pl_module).__name__}: best epoch {best_epoch}: {shown} "
                           f"(summary: {Path(log_dir) / 'summary.json'})")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.summary:  # no fit before this test on this trainer
            return
        tested = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        self.summary.update(tested)
        self.summary["test_tokens"] = getattr(getattr(trainer.datamodule, "test_sequences", None), "num_tokens", None)
        if self._write(trainer):
            shown = {k: round(v, 4) for k, v in tested.items()}
            rank_zero_info(f"{type(pl_module).__name__}: test split with the best weights: {shown}")

    def _write(self, trainer: L.Trainer) -> Path | None:
        """Write ``summary.json`` into the run folder (rank 0, with a logger, not ``fast_dev_run``); the folder or None."""
        log_dir = trainer.log_dir if trainer.loggers and not trainer.fast_dev_run else None
        if not (trainer.is_global_zero and log_dir):
            return None
        atomic_write_json(self.summary, Path(log_dir) / "summary.json")
        return Path(log_dir)

    def _restore_best(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[str | None, int | None]:
        """Load the best checkpoint's weights back into the module (all ranks)."""
        ckpt = trainer.checkpoint_callback
        monitor = getattr(ckpt, "monitor", None)
        path = getattr(ckpt, "best_model_path", "") if monitor else ""
        if path and Path(path).is_file():
            state = safe_torch_load(path)
            pl_module.load_state_dict(state["state_dict"])
            rank_zero_info(f"{type(pl_module).__name__}: restored the best weights ({monitor} = "
                           f"{float(ckpt.best_model_score):.4f}) from {path}")
            return path, int(state.get("epoch", -1))
        if self.history:  # no monitored checkpoint: the best epoch is still reported
            return None, min(self.history, key=lambda r: r.get("val/loss", float("inf")))["epoch"]
        return None, None

    def _summary(self, trainer: L.Trainer, pl_module, best_path: str | None, best_epoch: int | None) -> dict:
        best = next((r for r in self.history if r["epoch"] == best_epoch), {})
        dm = getattr(trainer, "datamodule", None)
        out = {"model": type(pl_module).__name__, "best_epoch": best_epoch, "best_model_path": best_path,
               "epochs_run": int(trainer.current_epoch),
               "epochs_this_run": len(self.epoch_seconds), "trainable_params": pl_module.num_trainable_parameters(),
               "median_epoch_s": statistics.median(self.epoch_seconds) if self.epoch_seconds else None,
               "train_tokens": getattr(getattr(dm, "train_sequences", None), "num_tokens", None),
               "val_tokens": getattr(getattr(dm, "val_sequences", None), "num_tokens", None)}
        out.update({k: v for k, v in best.items() if k != "epoch"})
        out.update(pl_module.summary_extra())
        return out
