"""cvfp_lightning: PyTorch Lightning training system for CVFP language models.

CVFP (Context Vector Fixed-Point Property) models keep one context vector per position
and learn an update ``context_new = f(context, token)`` whose iterations settle at fixed
points. See ``README.md`` for the walk-through and ``../shared/DESIGN.md`` for the design.
"""

from cvfp_lightning.errors import CVFPUserError

__all__ = ["CVFPUserError"]
__version__ = "0.1.0"
