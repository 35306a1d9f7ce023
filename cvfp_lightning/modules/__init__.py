"""LightningModules, one training objective each."""

from cvfp_lightning.modules.phase1 import Phase1FixedPoint

__all__ = ["Phase1FixedPoint"]
