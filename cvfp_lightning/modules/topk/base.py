"""What both Top-K schedules share (seed document: topk-evaluation).

Trains :class:`~cvfp_lightning.modules.repetition.RepetitionCVFPT`'s objective on K
single-token sequences served by :class:`~cvfp_lightning.data.topk.TopKRoundRobinDataModule`
and measures, per token k:

- ``initial_loss``: cyclic loss of token k's sequence under the weights it starts from,
- ``final_loss``: the same under the weights it ends with,
- ``improvement_pct = 100 * (initial - final) / initial``, ``converged = final < converged_below``
  (0.01 as in the seed document), ``seconds``: wall time of token k's training steps.

The schedule (when initial and final are taken, whether weights are shared) is the
subclass's: :class:`~cvfp_lightning.modules.topk.round_robin.TopKRoundRobin` (fair) or
:class:`~cvfp_lightning.modules.topk.sequential.TopKSequential` (biased). Scalars logged at
every epoch end: ``topk/convergence_rate`` (share converged), ``topk/mean_improvement``
(percent), ``topk/mean_initial_loss``, ``topk/mean_final_loss``, and the global-attractor
check ``diag/attractor_distance`` / ``diag/attractor_cosine`` (mean pairwise L2 distance /
cosine between the tokens' final contexts, the context after the last repetition) next to
``diag/attractor_distance_init`` (the same before training). A distance that collapses to
~0 means every token ends at one shared point: the loss is met without telling tokens
apart (the seed document's fair "100% converged" turned out to be this). The table itself
(CSV, JSON, Markdown, TensorBoard text) is written by
:class:`~cvfp_lightning.callbacks.TopKReport` from :meth:`TopKBase.rows` and :meth:`TopKBase.summary`.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from cvfp_lightning.data.topk import TopKRoundRobinDataModule
from cvfp_lightning.diagnostics import attractor_stats
from cvfp_lightning.errors import CVFPUserError, check_positive
from cvfp_lightning.losses import cycle_end_contexts, cycle_stats
from cvfp_lightning.models.context import ContextConfig
from cvfp_lightning.models.embedding import EmbeddingConfig
from cvfp_lightning.modules.repetition import RepetitionCVFPT

STATE_KEY = "cvfp_topk_state"


class TopKBase(RepetitionCVFPT):
    """Top-K evaluation over a schedule (see the module docstring). Needs a ``TopKRoundRobinDataModule``.

    Args:
        converged_below: a token counts as converged when its final loss is below this (seed 0.01).
        init_seed: the sequential schedule draws token k's weights with RNG seed ``init_seed + k``.
        **others**: see :class:`~cvfp_lightning.modules.repetition.RepetitionCVFPT`.
    """

    log_stages = False
    SCHEDULE: str = ""

    def __init__(self, vocab_size: int = 0, context: ContextConfig | dict | None = None,
                 embedding: EmbeddingConfig | dict | None = None, convergence_weight: float = 1.0,
                 token_weight: float = 0.0, lr: float = 1e-3, grad_clip: float = 1.0,
                 converged_below: float = 0.01, init_seed: int = 0):
        super().__init__(vocab_size, context, embedding, convergence_weight, token_weight, lr, grad_clip)
        check_positive("model.converged_below", converged_below)
        self.save_hyperparameters({**self.hparams, "converged_below": converged_below, "init_seed": int(init_seed)})
        self._t0 = 0.0
        self.records: dict[str, list] = {}

    # ---- data -----------------------------------------------------------------------------
    @property
    def topk_data(self) -> TopKRoundRobinDataModule:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, TopKRoundRobinDataModule):
            raise CVFPUserError(f"{type(self).__name__} needs data: class_path: "
                                f"cvfp_lightning.data.TopKRoundRobinDataModule (got {type(dm).__name__}).")
        return dm

    @property
    def schedule(self) -> str:
        return self.SCHEDULE

    def setup(self, stage: str) -> None:
        super().setup(stage)  # private metric states
        self.topk_data.connect(schedule=self.schedule)  # the batch order this schedule trains on

    @torch.no_grad()
    def evaluate_token(self, k: int) -> tuple[float, Tensor]:
        """``(cyclic loss, context after the last repetition (D,))`` of token k under the current weights."""
        batch = self.transfer_batch_to_device(self.topk_data.token_batch(k), self.device, 0)
        contexts = self(batch["input_ids"]).float()
        stats = cycle_stats(contexts, batch["cycle_length"], batch["mask"])
        end = cycle_end_contexts(contexts, batch["cycle_length"], batch["mask"])[0]
        return float(stats.conv_loss), end.cpu()

    def start_records(self) -> bool:
        """Empty records for this run's tokens; False when resumed (the checkpoint's records are kept)."""
        K = self.topk_data.num_tokens
        if self.records.get("token_id") == self.topk_data.token_ids:
            return False
        self.records = {"token_id": list(self.topk_data.token_ids), "initial_loss": [float("nan")] * K,
                        "final_loss": [float("nan")] * K, "seconds": [0.0] * K,
                        "init_ends": [None] * K, "final_ends": [None] * K}
        return True

    def record_initial(self, k: int) -> None:
        self.records["initial_loss"][k], self.records["init_ends"][k] = self.evaluate_token(k)

    def record_final(self, k: int) -> None:
        self.records["final_loss"][k], self.records["final_ends"][k] = self.evaluate_token(k)

    # ---- hooks ----------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.records["seconds"][int(batch["index"][0])] += time.perf_counter() - self._t0

    def log_summary(self) -> None:
        """The epoch's ``topk/*`` and ``diag/*`` scalars (after the schedule recorded the final losses)."""
        summary = self.summary()
        for name in ("convergence_rate", "mean_improvement", "mean_initial_loss", "mean_final_loss"):
            self.log(f"topk/{name}", summary[name])
        for name in ("attractor_distance", "attractor_cosine", "attractor_distance_init"):
            self.log(f"diag/{name}", summary[name])

    # ---- the table ------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One dict per token: token_id, token_text, initial_loss, final_loss, improvement_pct, converged, seconds."""
        out = []
        texts = self.topk_data.token_texts
        for k, token_id in enumerate(self.records["token_id"]):
            init, final = self.records["initial_loss"][k], self.records["final_loss"][k]
            out.append({"token_id": token_id, "token_text": texts[k], "initial_loss": init, "final_loss": final,
                        "improvement_pct": 100.0 * (init - final) / init if init > 0 else 0.0,
                        "converged": bool(final < self.hparams.converged_below),
                        "seconds": self.records["seconds"][k]})
        return out

    def summary(self) -> dict:
        rows = self.rows()
        n = len(rows)
        final = attractor_stats(torch.stack(self.records["final_ends"]))
        init = attractor_stats(torch.stack(self.records["init_ends"]))
        return {"schedule": self.schedule, "tokens": n, "converged": sum(r["converged"] for r in rows),
                "convergence_rate": sum(r["converged"] for r in rows) / n,
                "mean_improvement": sum(r["improvement_pct"] for r in rows) / n,
                "mean_initial_loss": sum(r["initial_loss"] for r in rows) / n,
                "mean_final_loss": sum(r["final_loss"] for r in rows) / n,
                "max_final_loss": max(r["final_loss"] for r in rows),
                "seconds": sum(r["seconds"] for r in rows),
                "attractor_distance": final["attractor_distance"], "attractor_cosine": final["attractor_cosine"],
                "attractor_distance_init": init["attractor_distance"],
                "attractor_cosine_init": init["attractor_cosine"],
                "context_norm": float(torch.stack(self.records["final_ends"]).norm(dim=-1).mean())}

    # ---- checkpoint -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[STATE_KEY] = {k: v for k, v in self.records.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.records = dict(checkpoint.get(STATE_KEY, {}))
