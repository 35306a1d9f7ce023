"""Effective-rank monitor: absolute rank and the singular-value spectrum of the contexts."""

from __future__ import annotations

import lightning as L

from cvfp_lightning.callbacks.figures import log_figure, spectrum_figure, wants_figures
from cvfp_lightning.metrics import effective_rank, sample_rows, spectrum_rank


class EffectiveRankMonitor(L.Callback):
    """Log ``{split}/effective_rank`` and the singular-value spectrum of train and val contexts.

    Reads the spectrum the module's ``train_erank`` / ``val_erank`` metrics computed this
    epoch when there is one (no second SVD); otherwise computes it from
    ``pl_module.contexts(split)`` on at most ``max_rows`` rows. The spectrum goes to
    TensorBoard as a histogram of ``s / sum(s)`` (``spectrum/{split}``), as the figure
    ``figures/spectrum_{split}`` (``s_i / sum(s)`` against the index i, log y, one image per
    iteration: which singular value is which), plus the share of the largest singular value
    (``{split}/top_singular_share``).
    """

    def __init__(self, every_n_epochs: int = 1, max_rows: int = 10_000):
        self.every_n_epochs, self.max_rows = max(1, every_n_epochs), max_rows
        self.history: list[dict] = []

    def _spectrum(self, pl_module, split: str):
        metric = getattr(pl_module, f"{split}_erank", None)
        s = getattr(metric, "last_singular_values", None)
        if s is None and hasattr(pl_module, "contexts"):
            ctx = pl_module.contexts(split)
            if ctx is None or ctx.shape[0] == 0:
                return None
            _, s = effective_rank(sample_rows(ctx, self.max_rows).cpu())
        return s

    def _log(self, trainer: L.Trainer, pl_module, split: str) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        s = self._spectrum(pl_module, split)
        if s is None or s.sum() <= 0:
            return
        p = (s / s.sum()).double()
        row = {f"{split}/effective_rank": spectrum_rank(s).item(), f"{split}/top_singular_share": p[0].item()}
        self.history.append({"epoch": trainer.current_epoch, **row})
        for logger in trainer.loggers:
            logger.log_metrics(row, step=trainer.global_step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):
                experiment.add_histogram(f"spectrum/{split}", p.float(), global_step=trainer.current_epoch)
        if wants_figures(trainer):
            title = (f"{split} context spectrum, iteration {trainer.current_epoch + 1}: effective rank "
                     f"{row[f'{split}/effective_rank']:.1f} of {len(s)}")
            log_figure(trainer, f"figures/spectrum_{split}", spectrum_figure(s, title), trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "val")
