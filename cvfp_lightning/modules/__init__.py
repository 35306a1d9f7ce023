"""LightningModules, one training objective each."""

from cvfp_lightning.modules.phase1 import Phase1FixedPoint
from cvfp_lightning.modules.repetition import RepetitionCVFPT
from cvfp_lightning.modules.topk import TopKCVFPT
from cvfp_lightning.modules.baseline import BaselineLM
from cvfp_lightning.modules.phase2 import Phase2LM

__all__ = ["Phase1FixedPoint"]
__all__ += ["RepetitionCVFPT", "TopKCVFPT"]
__all__ += ["Phase2LM", "BaselineLM"]
