"""Top-K, biased schedule: a fresh model per token, trained on that token alone.

When token k's block of ``E = trainer.max_epochs`` batches starts, every weight is re-drawn
with the RNG seed ``init_seed + k`` and the optimizer's state (Adam moments, step counts) is
cleared, so each token trains from its own initialisation as the seed document's biased
script did. ``initial_loss`` is under that fresh initialisation, ``final_loss`` under its
own model after its E steps. All blocks run in the first epoch; the run stops after it.
Each token's context comes from its own model, so here the attractor distance compares K
independently trained models rather than testing one model for a shared fixed point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cvfp_lightning.models.context import ContextConfig
from cvfp_lightning.models.embedding import EmbeddingConfig
from cvfp_lightning.modules.topk.base import TopKBase


class TopKSequential(TopKBase):
    """The sequential (biased) Top-K evaluation (see the module docstring and :class:`TopKBase`)."""

    SCHEDULE = "sequential"
    _current: int | None = None  # the token whose block is running (set per instance)

    def reinitialise(self, k: int) -> None:
        """Re-draw every weight with RNG seed ``init_seed + k`` and clear the optimizer state."""
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.init_seed + k)
            fresh = self.build_parts(hp.vocab_size, ContextConfig(**hp.context), EmbeddingConfig(**hp.embedding),
                                     hp.token_weight)
        with torch.no_grad():
            for mine, new in zip((self.embedding, self.updater, self.head), fresh):
                if mine is not None:
                    mine.load_state_dict(new.state_dict())
        for opt in self.trainer.optimizers:
            opt.state.clear()

    def on_train_start(self) -> None:
        self.start_records()

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        k = int(batch["index"][0])
        if k != self._current:
            if self._current is not None:
                self.record_final(self._current)
            self.reinitialise(k)
            self.record_initial(k)
            self._current = k
        super().on_train_batch_start(batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        if self._current is not None:
            self.record_final(self._current)
        self.trainer.should_stop = True  # every token had its E batches in this epoch
        self.log_summary()
