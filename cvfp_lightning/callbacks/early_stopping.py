"""Stop Phase 1 once the convergence rate reaches its target (Lightning's EarlyStopping)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.utilities import rank_zero_info

from cvfp_lightning.errors import check, check_fraction, check_positive


class ConvergenceEarlyStopping(EarlyStopping):
    """Stop when ``monitor >= threshold`` after at least ``min_iterations`` iterations.

    One iteration = one epoch (iteration 0, the sequential pass, is not counted), so the
    earliest stop is after epoch ``min_iterations``. The seed documents' values: 0.95 and 5.
    ``patience`` (epochs without improvement) is off by default; set it to also stop a
    run that stalls.

    Args:
        monitor: the logged rate, ``train/convergence_rate`` or ``val/convergence_rate``.
        threshold: rate in [0, 1] that counts as converged.
        min_iterations: iterations before stopping is allowed.
        patience: epochs without improvement before stopping (None: never).
    """

    def __init__(self, monitor: str = "train/convergence_rate", threshold: float = 0.95, min_iterations: int = 5,
                 patience: int | None = None, verbose: bool = False):
        check_fraction("ConvergenceEarlyStopping.threshold", threshold)
        check_positive("ConvergenceEarlyStopping.min_iterations", min_iterations, allow_zero=True)
        check(patience is None or patience > 0, f"ConvergenceEarlyStopping.patience={patience!r} must be > 0 or null.")
        super().__init__(monitor=monitor, mode="max", stopping_threshold=threshold,
                         patience=patience if patience is not None else 1 << 30, verbose=verbose,
                         check_on_train_epoch_end=monitor.startswith("train/"), strict=True)
        self.threshold, self.min_iterations = threshold, min_iterations
        self.stopped_at_iteration: int | None = None

    def _evaluate_stopping_criteria(self, current: torch.Tensor):
        if torch.isfinite(current) and current >= self.threshold:
            return True, (f"{self.monitor} = {current.item():.4f} >= {self.threshold} after "
                          f"{self._iterations} iterations: converged.")
        return super()._evaluate_stopping_criteria(current)

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        self._iterations = trainer.current_epoch + 1
        if self._iterations < self.min_iterations:
            return
        super()._run_early_stopping_check(trainer)
        if trainer.should_stop and self.stopped_at_iteration is None:
            self.stopped_at_iteration = self._iterations
            if not self.verbose and self.stopping_reason_message:
                rank_zero_info(self.stopping_reason_message)
