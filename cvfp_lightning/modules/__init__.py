"""LightningModules, one training objective each."""

from cvfp_lightning.modules.phase1 import Phase1Base, Phase1FixedPoint, Phase1Parallel, Phase1Tokenwise
from cvfp_lightning.modules.repetition import RepetitionCVFPT
from cvfp_lightning.modules.topk import TopKBase, TopKCVFPT, TopKRoundRobin, TopKSequential
from cvfp_lightning.modules.baseline import BaselineLM
from cvfp_lightning.modules.phase2 import Phase2LM
from cvfp_lightning.modules.phase2_end_to_end import Phase2EndToEnd

__all__ = ["Phase1Base", "Phase1Parallel", "Phase1Tokenwise", "Phase1FixedPoint"]
__all__ += ["RepetitionCVFPT", "TopKBase", "TopKRoundRobin", "TopKSequential", "TopKCVFPT"]
__all__ += ["Phase2LM", "Phase2EndToEnd", "BaselineLM"]
