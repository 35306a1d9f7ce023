"""Lightning callbacks of CVFP training."""

from cvfp_lightning.callbacks.diagnostics import CVFPDiagnostics
from cvfp_lightning.callbacks.early_stopping import ConvergenceEarlyStopping
from cvfp_lightning.callbacks.effective_rank import EffectiveRankMonitor
from cvfp_lightning.callbacks.guard import NonFiniteGuard, TrainingDiverged
from cvfp_lightning.callbacks.cache import ContextCacheHandoff

__all__ = ["ConvergenceEarlyStopping", "EffectiveRankMonitor", "CVFPDiagnostics", "NonFiniteGuard", "TrainingDiverged"]
__all__ += ["ContextCacheHandoff"]
