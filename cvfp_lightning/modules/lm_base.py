"""``NextTokenModule``: what every next-token LightningModule shares (Phase 2, baselines).

One objective, one set of metrics, so CVFP and the baselines are compared on equal terms:

- loss: cross-entropy of the next id, ``nll_sum / count`` over the predicted positions
  (targets -100 do not count);
- ``{split}/loss`` (nats per token), ``{split}/ppl = exp(loss)``, ``{split}/acc`` (top-1),
  ``{split}/bpb = sum CE / (ln 2 * UTF-8 bytes of the split's text)`` for ``val`` and
  ``test`` (torchmetrics sums, so DDP gives the same values as one process);
  ``{split}/tokens``: the number of predicted tokens (each counted once over all ranks);
  ``train/loss`` per step, ``train/ppl``, ``train/acc`` and ``train/tokens`` per epoch;
  ``time/epoch_s``;
- Adam (``lr``) on the trainable parameters, gradient norm clipped to ``grad_clip``;
- the best weights and ``summary.json``: :class:`~cvfp_lightning.callbacks.RunSummary`
  (added by ``cvfp`` to every next-token model) reads :meth:`num_trainable_parameters` and
  :meth:`summary_extra`;
- ``cvfp test`` / ``predict`` / ``validate`` need trained weights: ``--ckpt_path
  <run>/checkpoints/best.ckpt``; without one they stop with a clear error.

Subclasses set ``data_layout`` (the batch layout they ask for in the data handshake,
:meth:`NextTokenModule.data_request`) and implement :meth:`logits_targets`.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.metrics import NextTokenMetric, next_token_stats, private_metric_states
from cvfp_lightning.models.legacy import upgrade_checkpoint
from cvfp_lightning.modules.checkpoint_fit import check_checkpoint_fits
from cvfp_lightning.optim import clip_gradients, configure_adam

SPLIT_OUTPUTS = {"train": ("ppl", "acc", "tokens"), "val": NextTokenMetric.OUTPUTS, "test": NextTokenMetric.OUTPUTS}


class NextTokenModule(L.LightningModule):
    """Base class of next-token language models (see the module docstring).

    Subclasses call ``save_hyperparameters`` with ``lr`` and ``grad_clip`` among them.
    """

    data_layout = "positions"

    def __init__(self):
        super().__init__()
        self.train_lm = nn.ModuleDict({o: NextTokenMetric(o) for o in SPLIT_OUTPUTS["train"]})
        self.val_lm = nn.ModuleDict({o: NextTokenMetric(o) for o in SPLIT_OUTPUTS["val"]})
        self.test_lm = nn.ModuleDict({o: NextTokenMetric(o) for o in SPLIT_OUTPUTS["test"]})
        self._epoch_start: float | None = None
        self._has_weights = False  # trained in this process or loaded from a checkpoint

    # ---- for subclasses ------------------------------------------------------------------
    def logits_targets(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        """``(logits (..., V), targets (...))`` of a batch of ``split`` (train, val or test)."""
        raise NotImplementedError

    def summary_extra(self) -> dict:
        """More entries for ``summary.json`` (:class:`~cvfp_lightning.callbacks.RunSummary`)."""
        return {}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- steps -----------------------------------------------------------------------------
    def _sequences(self, split: str):
        dm = getattr(self.trainer, "datamodule", None)
        seqs = getattr(dm, f"{split}_sequences", None)
        if split == "test" and seqs is None:  # no test split: the data module tests on the validation split
            seqs = getattr(dm, "val_sequences", None)
        return seqs

    def _num_bytes(self, split: str) -> int:
        return int(getattr(self._sequences(split), "num_bytes", 0) or 0)

    def _require_targets(self, split: str) -> None:
        """A split whose sequences are all one token long has nothing to predict: its loss would
        read 0 and its perplexity 1. Refused as one line."""
        seqs = self._sequences(split)
        if seqs is None or not hasattr(seqs, "num_sequences"):
            return
        check(seqs.num_tokens > seqs.num_sequences,
              f"the {split} split has no token to predict: its {seqs.num_sequences:,} sequences are one token "
              f"each (a token is predicted from the ones before it in its sequence); raise data.max_seq_len or "
              "give longer samples.")

    def _step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        """Update the split's metrics; returns ``(nll_sum, count)`` of the batch."""
        logits, targets = self.logits_targets(batch, split)
        nll_sum, correct, count = next_token_stats(logits, targets)
        metrics = getattr(self, f"{split}_lm")
        for name, metric in metrics.items():
            metric.update(nll_sum, correct, count)
            if split != "train":
                self.log(f"{split}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name in ("loss", "ppl"))
        return nll_sum, count

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """The mean cross-entropy over the predicted tokens of the global batch (all ranks).

        DDP averages the ranks' gradients, so rank r returns ``nll_sum_r * W / count``
        with ``count`` summed over ranks: the gradient is that of one process on the W
        ranks' batches together, whatever the ranks' token counts. ``train/loss`` is that
        global mean.
        """
        nll_sum, count = self._step(batch, "train")
        world = self.trainer.world_size
        totals = torch.stack([nll_sum.detach(), count.to(nll_sum.dtype)])
        if world > 1:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        total_count = totals[1].clamp_min(1)
        self.log("train/loss", totals[0] / total_count, on_step=True, on_epoch=False, prog_bar=True)
        for name, metric in self.train_lm.items():
            self.log(f"train/{name}", metric, on_step=False, on_epoch=True)
        return nll_sum * world / total_count

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def data_request(self) -> dict:
        """What this module asks of the data module (:meth:`TokenDataModule.connect`)."""
        return {"layout": self.data_layout}

    def setup(self, stage: str) -> None:
        private_metric_states(self)
        connect = getattr(getattr(self._trainer, "datamodule", None), "connect", None)
        if connect is not None:
            connect(**self.data_request())

    def configure_optimizers(self):
        return configure_adam(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- hooks -------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._require_targets("train")
        rank_zero_info(f"{type(self).__name__}: {self.num_trainable_parameters():,} trainable parameters")

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if self._epoch_start is not None:  # None: the epoch's training ran before a resume (no time to log)
            seconds = time.perf_counter() - self._epoch_start  # training and the epoch's validation
            self.log("time/epoch_s", seconds, on_step=False, on_epoch=True)
        self._epoch_start = None

    def on_validation_epoch_start(self) -> None:
        self._require_targets("val")
        self.val_lm["bpb"].num_bytes = self._num_bytes("val")
        if self.trainer.state.fn == "validate":
            self._require_weights("validate")

    def on_test_epoch_start(self) -> None:
        self._require_targets("test")
        self.test_lm["bpb"].num_bytes = self._num_bytes("test")
        self._require_weights("test")

    def on_predict_start(self) -> None:
        self._require_weights("predict")

    def _require_weights(self, what: str) -> None:
        if not self._has_weights:
            raise CVFPUserError(f"cvfp {what} needs trained weights: pass --ckpt_path with the best checkpoint of a "
                                "fit run, e.g. lightning_logs/<name>/version_N/checkpoints/best.ckpt.")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(self, checkpoint)
        self.check_checkpoint_fits(checkpoint)
        self._has_weights = True

    def check_checkpoint_fits(self, checkpoint: dict) -> None:
        """Refuse, as one line, a checkpoint whose weights do not fit (before Lightning loads them)."""
        check_checkpoint_fits(self, checkpoint)

    def on_fit_end(self) -> None:
        self._has_weights = True
