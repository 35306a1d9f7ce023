"""Top-K token evaluation: one class per schedule (fair round-robin, biased sequential)."""

from cvfp_lightning.modules.topk.base import STATE_KEY, TopKBase
from cvfp_lightning.modules.topk.round_robin import TopKRoundRobin
from cvfp_lightning.modules.topk.sequential import TopKSequential
from cvfp_lightning.modules.topk.topk_cvfpt import TopKCVFPT

__all__ = ["STATE_KEY", "TopKBase", "TopKRoundRobin", "TopKSequential", "TopKCVFPT"]
