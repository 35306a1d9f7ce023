"""Top-K token data for the CVFPT evaluation (seed document: topk-evaluation).

Token k (k = 0..K-1) is one id ``t_k`` (ids ``start_id .. start_id + K - 1`` of the
tokenizer, the research script's "top K" of GPT-2, or an explicit list) repeated ``repetitions``
times: one sequence ``[t_k] * R`` with cycle length 1. A batch is that one sequence (the
research script's layout, where ``--batch-size`` had no effect because each token's data set holds a
single sequence). Batches use the layout of :func:`~cvfp_lightning.data.repetition.collate_repeated`.

Two schedules fix the order of batches; the module names its schedule through
:meth:`TopKRoundRobinDataModule.connect` (``TopKRoundRobin`` / ``TopKSequential``), and
``E = trainer.max_epochs`` is the research script's ``--epochs`` (batches per token) in both:

``round_robin`` (fair): every epoch yields tokens 0, 1, ..., K-1, one batch each; one
    shared model is trained on all of them in turn.
``sequential`` (biased, for comparison): token 0's E batches, then token 1's E batches,
    ..., all in the first epoch (the module then stops the run); the module gives every
    token a fresh initialisation and fresh optimizer state when its block starts.
"""

from __future__ import annotations

from typing import Literal

from torch.utils.data import DataLoader

from cvfp_lightning.data.repetition import RepeatedIdsDataModule, collate_repeated
from cvfp_lightning.errors import check

Schedule = Literal["round_robin", "sequential"]
SCHEDULES = ("round_robin", "sequential")


class TopKRoundRobinDataModule(RepeatedIdsDataModule):
    """K single-token sequences served in ``round_robin`` or ``sequential`` order.

    Args:
        top_k: K, the number of tokens (ids ``start_id .. start_id + K - 1``).
        token_ids: an explicit list of ids instead (``top_k`` and ``start_id`` are then unused).
        start_id: first id of the range.
        schedule: ``round_robin`` or ``sequential`` (see the module docstring); null (default):
            the schedule of the module, set by :meth:`connect`; a value must agree with it.
        repetitions: times each token is repeated (the research script used 30-50).
        tokenizer, max_length, num_workers, trust_remote_code: see
            :class:`~cvfp_lightning.data.repetition.RepeatedIdsDataModule`.
    """

    def __init__(self, top_k: int = 20, token_ids: list[int] | None = None, start_id: int = 0,
                 schedule: Schedule | None = None, repetitions: int = 30, max_length: int = 512,
                 tokenizer: str | None = None, num_workers: int = 0, trust_remote_code: bool = False):
        check(schedule is None or schedule in SCHEDULES,
              f"data.schedule={schedule!r} is unknown: expected round_robin (fair) or sequential (biased).")
        super().__init__(tokenizer=tokenizer, repetitions=repetitions, max_length=max_length, batch_size=1,
                         num_workers=num_workers, trust_remote_code=trust_remote_code)
        V = self.vocab_size
        if token_ids is None:
            check(isinstance(top_k, int) and top_k >= 1,
                  f"data.top_k={top_k!r} is invalid: expected an integer >= 1.")
            check(isinstance(start_id, int) and start_id >= 0,
                  f"data.start_id={start_id!r} is invalid: expected an integer >= 0.")
            check(start_id + top_k <= V,
                  f"data.top_k={top_k} (from id {start_id}) needs ids up to {start_id + top_k - 1} but the tokenizer "
                  f"has {V} ids: lower top_k to at most {V - start_id} or use a larger vocabulary.")
            token_ids = list(range(start_id, start_id + top_k))
        else:
            token_ids = [int(t) for t in token_ids]
            check(len(token_ids) > 0, "data.token_ids is empty: give at least one id, or null for ids 0..K-1.")
            bad = [t for t in token_ids if not 0 <= t < V]
            check(not bad, f"data.token_ids {bad[:5]} are outside the tokenizer's ids 0..{V - 1}: remove them.")
            check(len(set(token_ids)) == len(token_ids),
                  "data.token_ids has duplicates: list every id once.")
        self.schedule = schedule
        self.token_ids = token_ids
        self.token_texts = [self.tokenizer.decode([t]) for t in token_ids]
        self.items = [self.make_item([t], k, what=f"token {t}") for k, t in enumerate(token_ids)]

    def connect(self, schedule: str) -> None:
        """The handshake with the module: the schedule it trains decides the batch order."""
        check(self.schedule in (None, schedule),
              f"data.schedule={self.schedule!r} but the model trains the {schedule} schedule: drop data.schedule "
              "(the model's class names its schedule: TopKRoundRobin or TopKSequential).")
        self.schedule = schedule

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def token_batch(self, k: int) -> dict:
        """The batch of token k (its one sequence), for evaluation."""
        return collate_repeated([self.items[k]])

    def batch_order(self, epochs: int) -> list[int]:
        """Token index of each batch of one epoch: ``0..K-1`` (round_robin) or each k ``epochs`` times in turn."""
        if self.schedule != "sequential":
            return list(range(self.num_tokens))
        return [k for k in range(self.num_tokens) for _ in range(epochs)]

    def _epochs(self) -> int:
        if self.schedule != "sequential":
            return 1
        epochs = self.trainer.max_epochs if self.trainer is not None else 1
        check(epochs is not None and epochs >= 1,
              f"data.schedule=sequential trains each token for trainer.max_epochs epochs, but max_epochs={epochs}: "
              "set trainer.max_epochs to the epochs per token (the research script used 3).")
        return epochs

    def train_dataloader(self) -> DataLoader:
        order = self.batch_order(self._epochs())
        return DataLoader(self.items, batch_sampler=[[k] for k in order], collate_fn=collate_repeated,
                          num_workers=self.num_workers)
