"""``NonFiniteGuard``: stop at the first NaN/inf loss or gradient, before it is saved."""

from __future__ import annotations

import lightning as L
import torch

from cvfp_lightning.errors import CVFPUserError


class TrainingDiverged(CVFPUserError):
    """A loss, metric or gradient became NaN or infinite (printed as one line by the CLI)."""


class NonFiniteGuard(L.Callback):
    """Raise :class:`TrainingDiverged` naming the epoch, step and value that went non-finite.

    Checks every gradient right before each optimizer step (so a NaN never reaches the
    weights), the loss returned by ``training_step``, and the epoch's ``train/*`` losses
    (every logged metric whose name ends in ``loss``) before any checkpoint of that epoch is
    written: the last good ``last.ckpt`` is kept. Quantities derived from a finite loss are
    not judged: a perplexity ``exp(loss)`` beyond float32's range shows as inf, and that is
    no fault.
    The CVFP CLI adds it to every run. For the operation that produced the NaN, run with
    ``--trainer.detect_anomaly true`` (PyTorch's anomaly mode, slow).
    """

    def _fail(self, trainer: L.Trainer, what: str) -> None:
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise TrainingDiverged(f"training stopped: {what} at epoch {trainer.current_epoch}, step "
                               f"{trainer.global_step}; the last good checkpoint is kept ({ckpt}). Lower the learning "
                               "rate or check the data; --trainer.detect_anomaly true finds the operation.")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.float().sum() for g in grads]).sum()):
            bad = next(n for n, p in pl_module.named_parameters() if p.grad is not None
                       and not torch.isfinite(p.grad).all())
            self._fail(trainer, f"the gradient of {bad} is not finite")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            self._fail(trainer, f"the training loss is {loss.item()}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in trainer.callback_metrics.items():
            if (name.startswith("train/") and name.endswith("loss") and isinstance(value, torch.Tensor)
                    and not torch.isfinite(value).all()):
                self._fail(trainer, f"{name} = {value.item()}")
