"""Phase 1: learn weights whose context updates settle at fixed points (one class per algorithm)."""

from cvfp_lightning.modules.phase1.base import STATE_KEY, Phase1Base
from cvfp_lightning.modules.phase1.fixed_point import Phase1FixedPoint
from cvfp_lightning.modules.phase1.parallel import Phase1Parallel
from cvfp_lightning.modules.phase1.tokenwise import Phase1Tokenwise

__all__ = ["STATE_KEY", "Phase1Base", "Phase1FixedPoint", "Phase1Parallel", "Phase1Tokenwise"]
