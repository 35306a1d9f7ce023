"""Top-K token evaluation of repetition CVFP training (seed: topk-evaluation).

Trains :class:`~cvfp_lightning.modules.repetition.RepetitionCVFPT`'s objective on K
single-token sequences served by :class:`~cvfp_lightning.data.topk.TopKRoundRobinDataModule`
and reports, per token k:

- ``initial_loss``: cyclic loss of token k's sequence under the weights it starts from
  (round_robin: the shared initial model, before any step; sequential: its own fresh
  initialisation),
- ``final_loss``: the same under the weights it ends with (round_robin: the shared model
  after each epoch, so the table of the last epoch is the final one; sequential: its own
  model after its E steps),
- ``improvement_pct = 100 * (initial - final) / initial``, ``converged = final < converged_below``
  (0.01 as in the seed), ``seconds``: wall time of token k's training steps.

The table is written (atomically) to ``<trainer.log_dir>/topk_results.csv``, with a summary
in ``topk_summary.json``, and logged to TensorBoard as text ``topk/results``. Scalars:
``topk/convergence_rate`` (share converged), ``topk/mean_improvement`` (percent),
``topk/mean_initial_loss``, ``topk/mean_final_loss``, and the global-attractor check
``diag/attractor_distance`` / ``diag/attractor_cosine`` (mean pairwise L2 distance / cosine
between the tokens' final contexts, the context after the last repetition) next to
``diag/attractor_distance_init`` (the same before training). A distance that collapses to
~0 means every token ends at one shared point: the loss is met without telling tokens
apart (the seed's fair "100% converged" turned out to be this). Under the sequential
schedule each token's context comes from its own model, so there the distance compares
K independently trained models rather than testing one model for a shared fixed point.

``sequential`` schedule: when a token's block starts, every weight is re-drawn with the
seed ``init_seed + k`` and the optimizer's state (Adam moments, step counts) is cleared,
so each token trains from its own initialisation as the seed's biased script did. All
blocks run in the first epoch; the run stops after it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from cvfp_lightning.data.topk import TopKRoundRobinDataModule
from cvfp_lightning.diagnostics import attractor_stats
from cvfp_lightning.errors import CVFPUserError, check_positive
from cvfp_lightning.io import atomic_write_text
from cvfp_lightning.models.context import ContextConfig
from cvfp_lightning.models.embedding import EmbeddingConfig
from cvfp_lightning.modules.repetition import RepetitionCVFPT, cycle_end_contexts, cycle_stats

log = logging.getLogger(__name__)

COLUMNS = ["token_id", "token_text", "initial_loss", "final_loss", "improvement_pct", "converged", "seconds"]
STATE_KEY = "cvfp_topk_state"


class TopKCVFPT(RepetitionCVFPT):
    """Top-K evaluation (see the module docstring). Needs a ``TopKRoundRobinDataModule``.

    Args:
        converged_below: a token counts as converged when its final loss is below this (seed 0.01).
        init_seed: sequential schedule: token k's weights are drawn with seed ``init_seed + k``.
        **others: see :class:`~cvfp_lightning.modules.repetition.RepetitionCVFPT`.
    """

    log_stages = False

    def __init__(self, vocab_size: int = 0, context: ContextConfig | dict | None = None,
                 embedding: EmbeddingConfig | dict | None = None, convergence_weight: float = 1.0,
                 token_weight: float = 0.0, lr: float = 1e-3, grad_clip: float = 1.0,
                 converged_below: float = 0.01, init_seed: int = 0):
        super().__init__(vocab_size, context, embedding, convergence_weight, token_weight, lr, grad_clip)
        check_positive("model.converged_below", converged_below)
        self.save_hyperparameters({**self.hparams, "converged_below": converged_below, "init_seed": int(init_seed)})
        self._current: int | None = None  # sequential: the token whose block is running
        self._t0 = 0.0
        self.records: dict[str, list] = {}

    # ---- data -----------------------------------------------------------------------------
    @property
    def topk_data(self) -> TopKRoundRobinDataModule:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, TopKRoundRobinDataModule):
            raise CVFPUserError("TopKCVFPT needs data: class_path: cvfp_lightning.data.TopKRoundRobinDataModule "
                                f"(got {type(dm).__name__}).")
        return dm

    @property
    def schedule(self) -> str:
        return self.topk_data.schedule

    @torch.no_grad()
    def evaluate_token(self, k: int) -> tuple[float, Tensor]:
        """``(cyclic loss, context after the last repetition (D,))`` of token k under the current weights."""
        batch = self.transfer_batch_to_device(self.topk_data.token_batch(k), self.device, 0)
        contexts = self(batch["input_ids"]).float()
        stats = cycle_stats(contexts, batch["cycle_length"], batch["mask"])
        end = cycle_end_contexts(contexts, batch["cycle_length"], batch["mask"])[0]
        return float(stats.conv_loss), end.cpu()

    # ---- fresh initialisation (sequential) ------------------------------------------------
    def reinitialise(self, k: int) -> None:
        """Re-draw every weight with seed ``init_seed + k`` and clear the optimizer state."""
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.init_seed + k)
            fresh = self.build_parts(hp.vocab_size, ContextConfig(**hp.context), EmbeddingConfig(**hp.embedding),
                                     hp.token_weight)
        with torch.no_grad():
            for mine, new in zip((self.embedding, self.updater, self.head), fresh):
                if mine is not None:
                    mine.load_state_dict(new.state_dict())
        for opt in self.trainer.optimizers:
            opt.state.clear()

    # ---- hooks ----------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        K = self.topk_data.num_tokens
        if self.records.get("token_id") == self.topk_data.token_ids:
            return  # resumed: the initial losses come from the checkpoint
        self.records = {"token_id": list(self.topk_data.token_ids), "initial_loss": [float("nan")] * K,
                        "final_loss": [float("nan")] * K, "seconds": [0.0] * K,
                        "init_ends": [None] * K, "final_ends": [None] * K}
        if self.schedule == "round_robin":
            for k in range(K):
                self.records["initial_loss"][k], self.records["init_ends"][k] = self.evaluate_token(k)

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        k = int(batch["index"][0])
        if self.schedule == "sequential" and k != self._current:
            if self._current is not None:
                self._finish_token(self._current)
            self.reinitialise(k)
            self.records["initial_loss"][k], self.records["init_ends"][k] = self.evaluate_token(k)
            self._current = k
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.records["seconds"][int(batch["index"][0])] += time.perf_counter() - self._t0

    def _finish_token(self, k: int) -> None:
        self.records["final_loss"][k], self.records["final_ends"][k] = self.evaluate_token(k)

    def on_train_epoch_end(self) -> None:
        if self.schedule == "sequential":
            if self._current is not None:
                self._finish_token(self._current)
            self.trainer.should_stop = True  # every token had its E batches in this epoch
        else:
            for k in range(self.topk_data.num_tokens):
                self._finish_token(k)
        summary = self.summary()
        for name in ("convergence_rate", "mean_improvement", "mean_initial_loss", "mean_final_loss"):
            self.log(f"topk/{name}", summary[name])
        for name in ("attractor_distance", "attractor_cosine", "attractor_distance_init"):
            self.log(f"diag/{name}", summary[name])
        if self.trainer.is_global_zero:
            self.write_results(summary)

    # ---- the table ------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """One dict per token with :data:`COLUMNS`."""
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

    def write_results(self, summary: dict) -> Path:
        """Write ``topk_results.csv`` and ``topk_summary.json`` into ``trainer.log_dir``; log the text table."""
        rows = self.rows()
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "initial_loss": f"{r['initial_loss']:.6g}", "final_loss": f"{r['final_loss']:.6g}",
                             "improvement_pct": f"{r['improvement_pct']:.2f}", "seconds": f"{r['seconds']:.4f}"})
        path = atomic_write_text(buf.getvalue(), folder / "topk_results.csv")
        atomic_write_text(json.dumps(summary, indent=2) + "\n", folder / "topk_summary.json")
        text = self.markdown(rows, summary)
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("topk/results", text, self.global_step)
        log.info("top-k %s: %d/%d converged, mean final loss %.3g, attractor distance %.3g (init %.3g) -> %s",
                 summary["schedule"], summary["converged"], summary["tokens"], summary["mean_final_loss"],
                 summary["attractor_distance"], summary["attractor_distance_init"], path)
        return path

    @staticmethod
    def markdown(rows: list[dict], summary: dict) -> str:
        lines = ["| token id | token | initial loss | final loss | improvement % | converged | seconds |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            token = repr(r["token_text"]).replace("|", "\\|")
            lines.append(f"| {r['token_id']} | `{token}` | {r['initial_loss']:.6f} | {r['final_loss']:.6f} | "
                         f"{r['improvement_pct']:.1f} | {'yes' if r['converged'] else 'no'} | {r['seconds']:.3f} |")
        lines.append("")
        lines.append(f"**{summary['schedule']}**: {summary['converged']}/{summary['tokens']} converged, mean "
                     f"improvement {summary['mean_improvement']:.1f}%, mean final loss {summary['mean_final_loss']:.3g}. "
                     f"Attractor distance {summary['attractor_distance']:.4g} (before training "
                     f"{summary['attractor_distance_init']:.4g}; mean context norm {summary['context_norm']:.3g}), "
                     f"cosine {summary['attractor_cosine']:.4f}.")
        return "\n".join(lines)

    # ---- checkpoint -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[STATE_KEY] = {k: v for k, v in self.records.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.records = dict(checkpoint.get(STATE_KEY, {}))
