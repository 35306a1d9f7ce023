"""Parallel Phase 1 (the research code's latest algorithm): one Lightning epoch = one iteration.

Iteration 0 (before the first epoch) is a sequential pass ``c_i = f(c_{i-1}, e_i)`` from
``c = 0`` without gradients; it gives ``prev (N, D)``. Each later iteration, for every
position i (in chunks, gradients accumulated):

    input_i = prev[i-1] (the initial context 0 where a sequence starts) + N(0, noise_std^2)
    out_i   = f(input_i, e_i)
    loss    = (1 - w) * mean_i per_dim_mse(out_i, prev_i) + w * div(out)

with ``div(X) = -||X - mean(X)||_F / n`` (``diversity_center``: ``global`` over all N
positions, via :func:`~cvfp_lightning.losses.diversity_surrogate`; ``chunk``: per
chunk, weighted by chunk size) and ``w = dist_reg_weight``. One optimizer step per
iteration (clip ``grad_clip``), then ``prev <- out``. Convergence rate = share of
positions with ``per_dim_mse(out_i, prev_i) < convergence_threshold``. Validation runs
the same iteration on the validation tokens without noise and without training.

The carried state (``prev`` of train and validation, and the global diversity statistics)
is saved in every checkpoint, so ``--ckpt_path`` resumes exactly where the run stopped.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.errors import check, check_fraction, check_positive
from cvfp_lightning.losses import diversity_loss, diversity_surrogate, spread
from cvfp_lightning.models.context import ContextConfig
from cvfp_lightning.models.embedding import EmbeddingConfig
from cvfp_lightning.modules.phase1.base import Phase1Base
from cvfp_lightning.sequential_pass import sequential_pass, shifted_inputs
from cvfp_lightning.solvers import per_dim_mse

log = logging.getLogger(__name__)


class Phase1Parallel(Phase1Base):
    """Parallel fixed-point learning (see the module docstring).

    Args:
        dist_reg_weight: w, weight of the diversity loss in ``[0, 1]`` (research code 0.8).
        diversity_center: ``global`` (the seed documents) or ``chunk`` (the research code's batches).
        noise_std: std of the Gaussian noise added to input contexts.
        convergence_threshold: per-dimension MSE below which a position counts as converged (0.03).
        seq_batch_size: sequences per batch in the sequential pass (samples mode).
        **others**: see :class:`~cvfp_lightning.modules.phase1.base.Phase1Base`.
    """

    STATE_FIELDS = ("train_prev", "val_prev", "center", "spread", "noise_seed")

    def __init__(self, vocab_size: int = 0, context: ContextConfig | None = None,
                 embedding: EmbeddingConfig | None = None, dist_reg_weight: float = 0.8,
                 diversity_center: Literal["global", "chunk"] = "global", noise_std: float = 0.1,
                 convergence_threshold: float = 0.03, lr: float = 2e-3, grad_clip: float = 1.0,
                 seq_batch_size: int = 256, effective_rank_rows: int = 10_000):
        check(diversity_center in ("global", "chunk"),
              f"model.diversity_center={diversity_center!r} is unknown: expected global or chunk.")
        check_fraction("model.dist_reg_weight", dist_reg_weight)
        check_positive("model.noise_std", noise_std, allow_zero=True)
        check_positive("model.seq_batch_size", seq_batch_size)
        # the rank of the full (already summed) context matrix: the same on every rank, no gather
        super().__init__(vocab_size, context, embedding, convergence_threshold, lr, grad_clip, effective_rank_rows,
                         {"dist_reg_weight": dist_reg_weight, "diversity_center": diversity_center,
                          "noise_std": noise_std, "seq_batch_size": seq_batch_size}, sync_effective_rank=False)
        self.train_div = MeanMetric()  # chunk centring: size-weighted mean of chunk values
        self._new: dict[str, Tensor | None] = {"train": None, "val": None}
        self._iteration0_seconds = 0.0  # wall time of the sequential pass (0 when resumed)
        self._iteration0_tokens = 0  # tokens of that pass (train, and validation when this fit validates)

    # ---- iteration 0 ---------------------------------------------------------------------
    def _sequential(self, seqs, description: str = "iteration 0: sequential pass") -> tuple[Tensor, float]:
        """Iteration 0: the sequential pass, split over DDP ranks by sequence, then summed."""
        self._iteration0_tokens = seqs.num_tokens
        start = time.perf_counter()
        with self.trainer.precision_plugin.forward_context():
            ctx = sequential_pass(self.updater, self.embedding, seqs, self.hparams.seq_batch_size,
                                  rank=self.global_rank, world_size=self.trainer.world_size, description=description)
        ctx = self._sum_over_ranks(ctx)
        log.info("sequential pass over %d tokens in %.2fs", seqs.num_tokens, time.perf_counter() - start)
        return ctx, time.perf_counter() - start

    def _sum_over_ranks(self, t: Tensor) -> Tensor:
        if self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t, reduce_op="sum")
        return t

    def _set_global_stats(self, prev: Tensor) -> None:
        center = prev.mean(dim=0)
        self._state["center"], self._state["spread"] = center, spread(prev, center)

    def _chunk_noise(self, like: Tensor, first_position: int) -> Tensor:
        """Noise of one chunk, a function of (RNG seed, iteration, first position) only.

        So a resumed run, a DDP run and a single-process run draw the same noise for the
        same position, whatever rank or restart computes it.
        """
        g = torch.Generator(device="cpu")
        g.manual_seed((int(self._state["noise_seed"]) * 1_000_003 + self.current_epoch * 7_919_113
                       + first_position) % (2**63 - 1))
        return torch.randn(like.shape, generator=g).to(device=like.device, dtype=like.dtype)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        seqs = self.sequences("train")
        prev = self._state["train_prev"]
        if prev is not None:
            check(prev.shape[0] == seqs.num_tokens,
                  f"the checkpoint carries contexts for {prev.shape[0]} train tokens but the data has "
                  f"{seqs.num_tokens}: resume with the same data settings.")
            for key in ("train_prev", "val_prev", "center", "spread"):  # noise_seed is a plain int
                if self._state[key] is not None:
                    self._state[key] = self._state[key].to(self.device)
            return
        val = self._validation_sequences_of_fit()
        if val is None:
            prev, seconds = self._sequential(seqs)
        else:  # one pass over train and validation sequences together: their steps share the products
            both, seconds = self._sequential(TokenSequences.concat([seqs, val]))
            prev, self._state["val_prev"] = both[:seqs.num_tokens].clone(), both[seqs.num_tokens:].clone()
        self._state["train_prev"] = prev
        self._set_global_stats(prev)
        for logger in self.loggers:
            logger.log_metrics({"time/iteration0_s": seconds}, step=0)
        self._iteration0_seconds = seconds

    def _validation_sequences_of_fit(self):
        """The validation sequences when this fit validates and has no validation contexts yet."""
        if self._state["val_prev"] is not None or not self.trainer.limit_val_batches:
            return None
        seqs = getattr(getattr(self.trainer, "datamodule", None), "val_sequences", None)
        return seqs if seqs is not None and seqs.num_tokens else None

    # ---- one iteration ---------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._new["train"] = torch.zeros_like(self._state["train_prev"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        hp = self.hparams
        prev = self._state["train_prev"]
        pos, ids, is_start = batch["positions"], batch["ids"], batch["is_start"]
        N, W = prev.shape[0], self.trainer.world_size
        inp = shifted_inputs(prev, pos, is_start)
        if hp.noise_std > 0 and pos.numel():
            inp = inp + hp.noise_std * self._chunk_noise(inp, int(pos[0]))
        out = self.updater.update_context_one_step(inp, self.embedding(ids)).float()
        res = per_dim_mse(out, prev[pos])  # (n,)
        if hp.diversity_center == "global":
            div = diversity_surrogate(out, self._state["center"], self._state["spread"], N)
        else:
            chunk_div = diversity_loss(out)
            div = chunk_div * out.shape[0] / N
            if out.shape[0]:
                self.train_div.update(chunk_div.detach(), weight=out.shape[0])
        loss = (1 - hp.dist_reg_weight) * res.sum() / N + hp.dist_reg_weight * div
        self.manual_backward(loss * W)  # DDP averages gradients over ranks; we want their sum
        self._new["train"][pos] = out.detach()
        self.train_residuals.update(res.detach())  # every step, empty too: the same update count on every rank
        if res.numel():
            self.train_rate.update(res)
            self.train_cvfp.update(res.detach())
        self._mid_iteration = batch_idx + 1 < self.trainer.num_training_batches
        if not self._mid_iteration:
            self._end_iteration()

    def _end_iteration(self) -> None:
        hp = self.hparams
        self.optimizer_step_clipped()
        new = self._sum_over_ranks(self._new["train"])
        self._new["train"] = None
        self._state["train_prev"] = new
        self._set_global_stats(new)
        if hp.diversity_center == "global":  # diversity_loss(new), from the statistics just computed
            div = -self._state["spread"] / max(new.shape[0], 1)
        else:
            div = self.train_div.compute()
            self.train_div.reset()
        cvfp = self.train_cvfp.compute()
        self.log("train/cvfp_loss", self.train_cvfp, on_step=False, on_epoch=True)
        self.log("train/diversity_loss", div, on_step=False, on_epoch=True, sync_dist=False)
        self.log("train/loss", (1 - hp.dist_reg_weight) * cvfp + hp.dist_reg_weight * div,
                 on_step=False, on_epoch=True)
        self.log("train/convergence_rate", self.train_rate, on_step=False, on_epoch=True, prog_bar=True)
        self.train_erank.update(new)
        self.log("train/effective_rank_pct", self.train_erank.compute(), on_step=False, on_epoch=True, prog_bar=True)
        self.train_erank.reset()
        self.log("train/iteration", float(self.current_epoch + 1), on_step=False, on_epoch=True)
        self.log("time/iteration_s", time.perf_counter() - self._iter_start, on_step=False, on_epoch=True)

    # ---- validation ------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.trainer.sanity_checking:
            return
        if self._state["val_prev"] is None:
            self._state["val_prev"], _ = self._sequential(self.sequences("val"), "validation: sequential pass")
        self._new["val"] = torch.zeros_like(self._state["val_prev"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            return
        prev = self._state["val_prev"]
        pos = batch["positions"]
        out = self.updater.update_context_one_step(shifted_inputs(prev, pos, batch["is_start"]),
                                                   self.embedding(batch["ids"])).float()
        res = per_dim_mse(out, prev[pos])
        self._new["val"][pos] = out
        self.val_residuals.update(res)
        if res.numel():
            self.val_rate.update(res)
            self.val_cvfp.update(res)
        self.log("val/convergence_rate", self.val_rate, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/cvfp_loss", self.val_cvfp, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        new = self._sum_over_ranks(self._new["val"])
        self._new["val"] = None
        self._state["val_prev"] = new
        self.val_erank.update(new)
        if self.val_erank.rows:
            self.log("val/effective_rank_pct", self.val_erank.compute())
        self.val_erank.reset()
