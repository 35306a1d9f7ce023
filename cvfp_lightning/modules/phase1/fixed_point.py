"""``Phase1FixedPoint``: the former one-class-two-modes name, kept so old configs and checkpoints load.

Deprecated: name the algorithm instead (``class_path:
cvfp_lightning.modules.Phase1Parallel`` or ``cvfp_lightning.modules.Phase1Tokenwise``).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Literal

from cvfp_lightning.errors import check
from cvfp_lightning.models.context import ContextConfig
from cvfp_lightning.models.embedding import EmbeddingConfig
from cvfp_lightning.modules.phase1.base import Phase1Base
from cvfp_lightning.modules.phase1.parallel import Phase1Parallel
from cvfp_lightning.modules.phase1.tokenwise import Phase1Tokenwise

ALGORITHMS = {"parallel": Phase1Parallel, "tokenwise": Phase1Tokenwise}


class Phase1FixedPoint(Phase1Base):
    """Deprecated alias: builds a :class:`Phase1Parallel` (``mode: parallel``) or a
    :class:`Phase1Tokenwise` (``mode: tokenwise``) from the former arguments, with the former
    defaults (threshold 0.03 and lr 2e-3 in both modes). Options of the other mode are
    accepted and ignored, as before."""

    def __new__(cls, vocab_size: int = 0, context: ContextConfig | None = None,
                embedding: EmbeddingConfig | None = None, mode: Literal["parallel", "tokenwise"] = "parallel",
                dist_reg_weight: float = 0.8, diversity_center: Literal["global", "chunk"] = "global",
                noise_std: float = 0.1, convergence_threshold: float = 0.03, lr: float = 2e-3,
                grad_clip: float = 1.0, max_inner_iterations: int = 200, warmup_iterations: int = 0,
                seq_batch_size: int = 256, effective_rank_rows: int = 10_000):
        options = {k: v for k, v in locals().items() if k not in ("cls", "mode")}
        check(mode in ALGORITHMS, f"model.mode={mode!r} is unknown: expected parallel or tokenwise.")
        target = ALGORITHMS[mode]
        warnings.warn(f"Phase1FixedPoint is deprecated: use class_path cvfp_lightning.modules.{target.__name__} "
                      "(without mode).", DeprecationWarning, stacklevel=2)
        accepted = inspect.signature(target.__init__).parameters
        return target(**{k: v for k, v in options.items() if k in accepted})

    def __init__(self, *args, **kwargs):
        """Never runs: ``__new__`` (whose signature is the former one, for jsonargparse and
        ``load_from_checkpoint``) returns an instance of another class."""
