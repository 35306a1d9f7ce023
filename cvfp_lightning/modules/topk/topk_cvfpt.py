"""``TopKCVFPT``: the former one-class name whose schedule came from ``data.schedule``.

Deprecated: name the schedule instead (``class_path: cvfp_lightning.modules.TopKRoundRobin``
or ``cvfp_lightning.modules.TopKSequential``); this alias keeps old configs and checkpoints
loading by running the hooks of the class that ``data.schedule`` names.
"""

from __future__ import annotations

import warnings

from torch import Tensor

from cvfp_lightning.modules.topk.round_robin import TopKRoundRobin
from cvfp_lightning.modules.topk.sequential import TopKSequential

ALGORITHMS = {"round_robin": TopKRoundRobin, "sequential": TopKSequential}


class TopKCVFPT(TopKSequential, TopKRoundRobin):
    """Deprecated alias (see the module docstring); the arguments are :class:`TopKBase`'s."""

    def setup(self, stage: str) -> None:
        warnings.warn(f"TopKCVFPT is deprecated: use class_path cvfp_lightning.modules.{self._algorithm().__name__} "
                      "(the schedule is then the class's).", DeprecationWarning, stacklevel=2)
        super().setup(stage)

    @property
    def schedule(self) -> str:
        return self.topk_data.schedule or "round_robin"

    def _algorithm(self) -> type:
        return ALGORITHMS[self.schedule]

    def on_train_start(self) -> None:
        self._algorithm().on_train_start(self)

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._algorithm().on_train_batch_start(self, batch, batch_idx)

    def on_train_epoch_end(self) -> None:
        self._algorithm().on_train_epoch_end(self)
