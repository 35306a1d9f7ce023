"""LightningModules, one training objective each."""

from cvfp_lightning.modules.phase1 import Phase1FixedPoint
from cvfp_lightning.modules.repetition import RepetitionCVFPT
from cvfp_lightning.modules.topk import TopKCVFPT

__all__ = ["Phase1FixedPoint"]
__all__ += ["RepetitionCVFPT", "TopKCVFPT"]
