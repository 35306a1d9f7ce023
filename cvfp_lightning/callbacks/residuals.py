"""``ResidualMonitor``: the distribution of Phase 1's residuals against the convergence threshold."""

from __future__ import annotations

import lightning as L

from cvfp_lightning.callbacks.figures import log_figure, residual_figure, wants_figures


class ResidualMonitor(L.Callback):
    """Draw each epoch's residual histogram as the TensorBoard figure ``figures/residuals_{split}``.

    Reads the module's ``train_residuals`` / ``val_residuals``
    (:class:`~cvfp_lightning.metrics.ResidualHistogram`: per position for ``Phase1Parallel``,
    per token for ``Phase1Tokenwise``, summed over DDP ranks) after every ``every_n_epochs``-th
    iteration, at step = the epoch. The red line is the convergence threshold: the share left
    of it is the convergence rate. ``cvfp`` adds this callback to every Phase 1 model.
    """

    def __init__(self, every_n_epochs: int = 1):
        self.every_n_epochs = max(1, int(every_n_epochs))

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        metric = getattr(pl_module, f"{split}_residuals", None)
        if (metric is None or trainer.sanity_checking or not metric.update_count
                or (trainer.current_epoch + 1) % self.every_n_epochs):
            return
        counts = metric.compute()  # on every rank: the DDP sum is a collective
        if not wants_figures(trainer):
            return
        title = f"{split} residuals, iteration {trainer.current_epoch + 1}"
        log_figure(trainer, f"figures/residuals_{split}",
                   residual_figure(counts, metric.edges, metric.threshold, title), trainer.current_epoch)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module, "val")
