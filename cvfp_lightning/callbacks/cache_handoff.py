"""``ContextCacheHandoff``: at the end of Phase 1, write the contexts Phase 2 will train on."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cvfp_lightning.context_cache import CACHE_DIRNAME, ContextSource
from cvfp_lightning.context_store import DTYPES
from cvfp_lightning.errors import check, check_positive


class ContextCacheHandoff(L.Callback):
    """Write the context cache (:mod:`cvfp_lightning.context_cache`) when Phase 1 ends.

    After the last epoch (when ``last.ckpt`` holds the final weights) every rank runs the
    sharded sequential pass over its shards of the train, validation and test tokens with
    the final weights and writes their final contexts, with the fingerprint of what they
    depend on, to ``path`` (default: ``context_cache/`` in the checkpoint folder, next to
    ``last.ckpt``; nothing without a checkpoint folder or in ``fast_dev_run``). Phase 2
    (``Phase2LM``) looks there for the cache of its ``phase1_checkpoint``, checks the
    fingerprint and says "cache hit", or why it rebuilds (``cache: require`` refuses).

    Args:
        path: the cache folder; default ``<checkpoint dir>/context_cache``.
        batch_size: sequences per batch of the sequential pass.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` of the stored contexts (4 D or 2 D
            bytes per position); default: the Phase 1 module's ``context_dtype``, else float32.
    """

    def __init__(self, path: str | None = None, batch_size: int = 256, dtype: str | None = None):
        check_positive("ContextCacheHandoff.batch_size", batch_size)
        check(dtype is None or dtype in DTYPES,
              f"ContextCacheHandoff.dtype={dtype!r} is unknown: expected one of {', '.join(DTYPES)} or null.")
        self.path, self.batch_size, self.dtype = path, batch_size, dtype
        self.written: Path | None = None

    def cache_path(self, trainer: L.Trainer) -> Path | None:
        """``path``, else next to the checkpoints; None when the run saves no checkpoints."""
        if self.path:
            return Path(self.path)
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder) / CACHE_DIRNAME if folder else None

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
        dtype = self.dtype or getattr(pl_module, "context_dtype", "float32")
        source = ContextSource(pl_module.embedding, pl_module.updater, dm, hp)
        cache = source.write(path, trainer, self.batch_size, dtype)
        counts = ", ".join(f"{n} {split}" for split, n in source.num_tokens.items())
        rank_zero_info(f"context cache for Phase 2 written to {path} ({counts} positions, {dtype}, "
                       f"{cache.meta['seconds']:.1f}s)")
        self.written = path
