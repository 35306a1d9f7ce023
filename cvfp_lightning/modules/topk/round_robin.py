"""Top-K, fair schedule: one shared model trained on tokens 0..K-1 in turn, one batch each per epoch.

``initial_loss`` is every token's loss under the shared initial model (before any step);
``final_loss`` is under the shared model after each epoch, so the table of the last epoch
is the final one.
"""

from __future__ import annotations

from cvfp_lightning.modules.topk.base import TopKBase


class TopKRoundRobin(TopKBase):
    """The round-robin (fair) Top-K evaluation (see the module docstring and :class:`TopKBase`)."""

    SCHEDULE = "round_robin"

    def on_train_start(self) -> None:
        if self.start_records():
            for k in range(self.topk_data.num_tokens):
                self.record_initial(k)

    def on_train_epoch_end(self) -> None:
        for k in range(self.topk_data.num_tokens):
            self.record_final(k)
        self.log_summary()
