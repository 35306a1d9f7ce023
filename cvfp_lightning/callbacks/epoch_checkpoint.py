"""``EpochCheckpoint``: Lightning's ``ModelCheckpoint`` with ``last.ckpt`` written after every epoch.

Since Lightning 2.6, ``ModelCheckpoint(monitor=..., save_top_k=1, save_last=True)`` writes
``last.ckpt`` only in a step where it also wrote a top-k checkpoint, i.e. when the monitored
value improved: a run stopped ten epochs after its best resumes ten epochs back. This class
writes ``last.ckpt`` at every epoch end as well (after the top-k check, with the same
``_save_last_checkpoint``), and keeps ``ModelCheckpoint``'s state key, so checkpoints of
either class restore into the other. ``cvfp``'s ``checkpoint`` section builds this class.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class EpochCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) whose ``save_last`` writes ``last.ckpt`` after every epoch."""

    @property
    def state_key(self) -> str:
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def _save_last_if_not_saved(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # skipped when saved this step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_not_saved(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_not_saved(trainer)
