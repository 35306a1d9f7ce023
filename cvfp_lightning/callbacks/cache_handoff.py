"""``ContextCacheHandoff``: at the end of Phase 1, write the contexts Phase 2 will train on."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cvfp_lightning.context_cache import CACHE_FILENAME, ContextSource, save_context_cache
from cvfp_lightning.errors import check_positive


class ContextCacheHandoff(L.Callback):
    """Write the context cache (:mod:`cvfp_lightning.context_cache`) when Phase 1 ends.

    After the last epoch (when ``last.ckpt`` holds the final weights) it runs one
    sequential pass over the train and validation tokens with the final weights and saves
    every layer's contexts, the embeddings and their fingerprint to ``path`` (default:
    ``context_cache.pt`` in the checkpoint folder, next to ``last.ckpt``; nothing without
    a checkpoint folder or in ``fast_dev_run``). Phase 2
    (``Phase2LM``) looks there for the cache of its ``phase1_checkpoint``, checks the
    fingerprint and says "cache hit", or why it rebuilds (``cache: require`` refuses).

    Args:
        path: where to write the cache; default ``<checkpoint dir>/context_cache.pt``.
        batch_size: sequences per batch of the sequential pass.
    """

    def __init__(self, path: str | None = None, batch_size: int = 256):
        check_positive("ContextCacheHandoff.batch_size", batch_size)
        self.path, self.batch_size = path, batch_size
        self.written: Path | None = None

    def cache_path(self, trainer: L.Trainer) -> Path | None:
        """``path``, else next to the checkpoints; None when the run saves no checkpoints."""
        if self.path:
            return Path(self.path)
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder) / CACHE_FILENAME if folder else None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.status == TrainerStatus.INTERRUPTED or trainer.sanity_checking or trainer.fast_dev_run:
            return
        path = self.cache_path(trainer)
        if path is None:
            rank_zero_warn("ContextCacheHandoff: no checkpoint folder and no path given; no context cache written.")
            return
        dm = getattr(trainer, "datamodule", None)
        hp = pl_module.hparams
        if not (hasattr(pl_module, "updater") and hasattr(pl_module, "embedding") and "context" in hp
                and getattr(dm, "train_sequences", None) is not None):
            rank_zero_warn("ContextCacheHandoff: the model is not a Phase 1 model with a TokenDataModule; "
                           "no context cache written.")
            return
        cache = ContextSource(pl_module.embedding, pl_module.updater, dm, hp).compute(trainer, self.batch_size)
        if trainer.is_global_zero:
            save_context_cache(cache, path)
            rank_zero_info(f"context cache for Phase 2 written to {path} ({dm.train_sequences.num_tokens} train + "
                           f"{dm.val_sequences.num_tokens} val positions, {len(cache.layer_dims)} layers, "
                           f"{cache.seconds:.1f}s)")
        trainer.strategy.barrier("ContextCacheHandoff")
        self.written = path
