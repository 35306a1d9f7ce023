"""EMA of the trained weights that leaves frozen ones bit-identical: ``EMAWeights(decay=0.99)``.

After every optimizer step ``k`` (from ``update_starting_at_step``) the averaged copy of the
module is updated as

    w_avg <- lerp(w_avg, w, 1 - decay) = w_avg + (1 - decay) (w - w_avg),      w_avg = w at the first update

(``torch.optim.swa_utils.get_ema_multi_avg_fn``); validation, the checkpoints'
``state_dict`` and the weights after ``fit`` are the averaged ones (Lightning's
:class:`~lightning.pytorch.callbacks.WeightAveraging`; a checkpoint written during training
keeps the raw weights as ``current_model_state``, from which ``--ckpt_path`` resumes).

Why not Lightning's ``EMAWeightAveraging`` as it is: its update ``decay * w_avg + (1 - decay) * w``
is not exact for a parameter that does not change, so a frozen Phase 1 context block drifts (by
up to 1e-6 in 629 steps of the recipe, measured) and is then no longer the block the context
cache was computed with (Phase 2 refuses such a checkpoint). ``lerp`` of equal values returns
them exactly: a frozen block, a frozen embedding and every buffer stay bit-identical.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from cvfp_lightning.errors import check


class EMAWeights(EMAWeightAveraging):
    """Lightning's EMA weight averaging with an update that is exact for frozen weights.

    Args:
        decay: EMA decay per optimizer step, in (0, 1): the average spans about ``1 / (1 - decay)`` steps.
        update_every_n_steps, update_starting_at_step, update_starting_at_epoch: when to update
            (as ``EMAWeightAveraging``).
        device: where the averaged copy lives (default: the module's device).
    """

    def __init__(self, decay: float = 0.99, update_every_n_steps: int = 1, update_starting_at_step: int | None = None,
                 update_starting_at_epoch: int | None = None, device: str | None = None, **kwargs: Any):
        check(isinstance(decay, float | int) and not isinstance(decay, bool) and 0.0 < decay < 1.0,
              f"EMAWeights.decay={decay!r} is invalid: expected a number in (0, 1), e.g. 0.99.")
        check(isinstance(update_every_n_steps, int) and update_every_n_steps >= 1,
              f"EMAWeights.update_every_n_steps={update_every_n_steps!r} is invalid: expected an integer >= 1.")
        super().__init__(device=device, decay=float(decay), update_every_n_steps=update_every_n_steps,
                         update_starting_at_step=update_starting_at_step,
                         update_starting_at_epoch=update_starting_at_epoch, **kwargs)
        self.decay = float(decay)
        self._kwargs.pop("avg_fn")
        self._kwargs["multi_avg_fn"] = get_ema_multi_avg_fn(self.decay)
