"""Top-K, fair schedule: one shared model trained on tokens 0..K-1 in turn, one batch each per epoch.

``initial_loss`` is every token's loss under the shared initial model (before any step);
``final_loss`` is under the shared model after each epoch, so the table of the last epoch
is the final one. Both loops over the K tokens show their progress
(:func:`cvfp_lightning.progress.track`).
"""

from __future__ import annotations

from cvfp_lightning.modules.topk.base import TopKBase
from cvfp_lightning.progress import track


class TopKRoundRobin(TopKBase):
    """The round-robin (fair) Top-K evaluation (see the module docstring and :class:`TopKBase`)."""

    SCHEDULE = "round_robin"

    def on_train_start(self) -> None:
        if self.start_records():
            for k in track(range(self.topk_data.num_tokens), description="top-k: initial losses", unit="tokens"):
                self.record_initial(k)

    def on_train_epoch_end(self) -> None:
        for k in track(range(self.topk_data.num_tokens), description=f"top-k: losses after epoch {self.current_epoch}",
                       unit="tokens"):
            self.record_final(k)
        self.log_summary()
