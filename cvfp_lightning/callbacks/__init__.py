"""Lightning callbacks of CVFP training: stopping, monitors, reports and the Phase 1 -> 2 hand-off."""

from cvfp_lightning.callbacks.cache_handoff import ContextCacheHandoff
from cvfp_lightning.callbacks.carry_best import CarryBest
from cvfp_lightning.callbacks.diagnostics import CVFPDiagnostics
from cvfp_lightning.callbacks.early_stopping import ConvergenceEarlyStopping
from cvfp_lightning.callbacks.effective_rank import EffectiveRankMonitor
from cvfp_lightning.callbacks.epoch_checkpoint import EpochCheckpoint
from cvfp_lightning.callbacks.ema import EMAWeights
from cvfp_lightning.callbacks.generation_writer import GenerationWriter
from cvfp_lightning.callbacks.guard import NonFiniteGuard, TrainingDiverged
from cvfp_lightning.callbacks.headline import HeadlineMetric
from cvfp_lightning.callbacks.residuals import ResidualMonitor
from cvfp_lightning.callbacks.run_summary import RunSummary
from cvfp_lightning.callbacks.topk_report import TopKReport

__all__ = ["ConvergenceEarlyStopping", "EffectiveRankMonitor", "CVFPDiagnostics", "NonFiniteGuard", "TrainingDiverged",
           "ContextCacheHandoff", "GenerationWriter", "RunSummary", "TopKReport", "HeadlineMetric", "ResidualMonitor",
           "EMAWeights", "CarryBest", "EpochCheckpoint"]
