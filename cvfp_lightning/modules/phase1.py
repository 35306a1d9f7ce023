"""Phase 1: learn weights whose context updates settle at fixed points.

Two modes (``mode``):

``parallel`` (default; the 2025-11-29 algorithm). One Lightning epoch = one iteration.
    Iteration 0 (before the first epoch) is a sequential pass ``c_i = f(c_{i-1}, e_i)``
    from ``c = 0`` without gradients; it gives ``prev (N, D)``. Each later iteration, for
    every position i (in chunks, gradients accumulated):

        input_i = prev[i-1] (the initial context 0 where a sequence starts) + N(0, noise_std^2)
        out_i   = f(input_i, e_i)
        loss    = (1 - w) * mean_i per_dim_mse(out_i, prev_i) + w * div(out)

    with ``div(X) = -||X - mean(X)||_F / n`` (``diversity_center``: ``global`` over all N
    positions, via :func:`~cvfp_lightning.losses.diversity_surrogate`; ``chunk``: per
    chunk, weighted by chunk size) and ``w = dist_reg_weight``. One optimizer step per
    iteration (clip ``grad_clip``), then ``prev <- out``. Convergence rate = share of
    positions with ``per_dim_mse(out_i, prev_i) < convergence_threshold``. Validation runs
    the same iteration on the validation tokens without noise and without training.

``tokenwise`` (Phase 1 specification). Every token of a batch starts from ``c = 0`` and
    iterates ``c <- f(c, e)`` with loss ``per_dim_mse(f(c, e), c.detach())`` and one
    optimizer step per inner iteration, until the residual is below
    ``convergence_threshold`` (checked after ``warmup_iterations``) or
    ``max_inner_iterations``. Tokens are independent given the weights, so a batch of
    tokens iterates together; converged tokens drop out of the loss. Validation solves the
    fixed points without training (:func:`~cvfp_lightning.solvers.fixed_point_iter`).

The carried state (``prev`` of train and validation, and the global diversity statistics)
is saved in every checkpoint, so ``--ckpt_path`` resumes exactly where the run stopped.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric, SumMetric

from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.errors import CVFPUserError, check, check_fraction, check_positive
from cvfp_lightning.losses import diversity_loss, diversity_surrogate, spread
from cvfp_lightning.metrics import ConvergenceRate, EffectiveRank, private_metric_states
from cvfp_lightning.models.context import ContextConfig, build_context_updater
from cvfp_lightning.models.embedding import EmbeddingConfig, build_embedding
from cvfp_lightning.models.legacy import upgrade_checkpoint
from cvfp_lightning.optim import configure_adam
from cvfp_lightning.passes import sequential_pass, shifted_inputs
from cvfp_lightning.solvers import fixed_point_iter, per_dim_mse

log = logging.getLogger(__name__)

STATE_KEY = "cvfp_phase1_state"


class Phase1FixedPoint(L.LightningModule):
    """Phase 1 fixed-point learning (see the module docstring for the algorithms).

    Args:
        vocab_size: number of token ids (linked from ``data.vocab_size`` by the CLI).
        context: the context block (:class:`~cvfp_lightning.models.context.ContextConfig`).
        embedding: the token embedding (:class:`~cvfp_lightning.models.embedding.EmbeddingConfig`).
        mode: ``parallel`` or ``tokenwise``.
        dist_reg_weight: w, weight of the diversity loss in ``[0, 1]`` (seed code 0.8).
        diversity_center: ``global`` (the seeds) or ``chunk`` (the seed code's batches).
        noise_std: std of the Gaussian noise added to input contexts (parallel training).
        convergence_threshold: per-dimension MSE below which a position counts as
            converged (parallel 0.03, tokenwise 0.01).
        lr: Adam learning rate.
        grad_clip: max gradient norm per optimizer step (0 disables).
        max_inner_iterations: tokenwise: inner iterations per token at most.
        warmup_iterations: tokenwise: inner iterations before convergence is checked.
        seq_batch_size: sequences per batch in the sequential pass (samples mode).
        effective_rank_rows: rows sampled for the effective rank.
    """

    data_layout = "position_chunks"

    def __init__(self, vocab_size: int = 0, context: ContextConfig | None = None,
                 embedding: EmbeddingConfig | None = None, mode: Literal["parallel", "tokenwise"] = "parallel",
                 dist_reg_weight: float = 0.8, diversity_center: Literal["global", "chunk"] = "global",
                 noise_std: float = 0.1, convergence_threshold: float = 0.03, lr: float = 2e-3,
                 grad_clip: float = 1.0, max_inner_iterations: int = 200, warmup_iterations: int = 0,
                 seq_batch_size: int = 256, effective_rank_rows: int = 10_000):
        super().__init__()
        context, embedding = ContextConfig.coerce(context), EmbeddingConfig.coerce(embedding)
        check(mode in ("parallel", "tokenwise"), f"model.mode={mode!r} is unknown: expected parallel or tokenwise.")
        check(diversity_center in ("global", "chunk"),
              f"model.diversity_center={diversity_center!r} is unknown: expected global or chunk.")
        check(isinstance(vocab_size, int) and vocab_size > 0,
              f"model.vocab_size={vocab_size!r} is invalid: expected a positive integer (the CLI links it from the data).")
        check_fraction("model.dist_reg_weight", dist_reg_weight)
        check_positive("model.noise_std", noise_std, allow_zero=True)
        check_positive("model.convergence_threshold", convergence_threshold)
        check_positive("model.lr", lr)
        check_positive("model.grad_clip", grad_clip, allow_zero=True)
        check_positive("model.max_inner_iterations", max_inner_iterations)
        check_positive("model.warmup_iterations", warmup_iterations, allow_zero=True)
        check(warmup_iterations < max_inner_iterations,
              f"model.warmup_iterations={warmup_iterations} must be < max_inner_iterations={max_inner_iterations}.")
        check_positive("model.seq_batch_size", seq_batch_size)
        check_positive("model.effective_rank_rows", effective_rank_rows)
        self.automatic_optimization = False

        self.embedding = build_embedding(vocab_size, embedding, default_dim=context.context_dim)
        embedding = EmbeddingConfig(**{**embedding.to_dict(), "embed_dim": self.embedding.embed_dim})
        self.updater = build_context_updater(context, self.embedding.embed_dim)
        # plain dicts in the checkpoint (loadable with weights_only), with the resolved embed_dim
        self.save_hyperparameters({"vocab_size": vocab_size, "context": context.to_dict(),
                                   "embedding": embedding.to_dict(), "mode": mode,
                                   "dist_reg_weight": dist_reg_weight, "diversity_center": diversity_center,
                                   "noise_std": noise_std, "convergence_threshold": convergence_threshold,
                                   "lr": lr, "grad_clip": grad_clip, "max_inner_iterations": max_inner_iterations,
                                   "warmup_iterations": warmup_iterations, "seq_batch_size": seq_batch_size,
                                   "effective_rank_rows": effective_rank_rows})
        thr = convergence_threshold
        self.train_rate, self.val_rate = ConvergenceRate(thr), ConvergenceRate(thr)
        self.train_cvfp, self.val_cvfp = MeanMetric(), MeanMetric()
        self.train_div = MeanMetric()  # chunk centring: size-weighted mean of chunk values
        self.train_iters, self.val_iters = MeanMetric(), MeanMetric()
        self.train_tokens, self.val_tokens = SumMetric(), SumMetric()  # positions evaluated, over all ranks
        # parallel mode: rank of the full (already synced) context matrix, same on every rank
        self.train_erank = EffectiveRank(effective_rank_rows, percent=True, sync_on_compute=mode == "tokenwise")
        self.val_erank = EffectiveRank(effective_rank_rows, percent=True, sync_on_compute=mode == "tokenwise")
        self._state: dict[str, Tensor | None] = {"train_prev": None, "val_prev": None, "center": None,
                                                 "spread": None, "noise_seed": None}
        self._new: dict[str, Tensor | None] = {"train": None, "val": None}
        self._iter_start = 0.0
        self._iteration0_seconds = 0.0  # wall time of the sequential pass (0 when resumed)
        self._iteration0_tokens = 0  # tokens of that pass (train, and validation when this fit validates)
        self._mid_iteration = False

    # ---- the model ---------------------------------------------------------------------
    @property
    def context_dim(self) -> int:
        return self.updater.context_dim

    def forward(self, context: Tensor, ids: Tensor) -> Tensor:
        """One update: ``context (..., D), ids (...,) -> (..., D)``."""
        return self.updater.update_context_one_step(context, self.embedding(ids))

    def configure_optimizers(self):
        return configure_adam(self)

    # ---- data access -------------------------------------------------------------------
    def _sequences(self, split: str):
        dm = getattr(self.trainer, "datamodule", None)
        seqs = getattr(dm, f"{split}_sequences", None)
        if seqs is None:
            raise CVFPUserError("Phase1FixedPoint needs a TokenDataModule (data: class_path: "
                                "cvfp_lightning.data.TextDataModule or similar) that provides train/val sequences.")
        return seqs

    def _sequential(self, seqs) -> tuple[Tensor, float]:
        """Iteration 0: the sequential pass, split over DDP ranks by sequence, then summed."""
        self._iteration0_tokens = seqs.num_tokens
        start = time.perf_counter()
        with self.trainer.precision_plugin.forward_context():
            ctx = sequential_pass(self.updater, self.embedding, seqs, self.hparams.seq_batch_size,
                                  rank=self.global_rank, world_size=self.trainer.world_size)
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

    # ---- hooks ---------------------------------------------------------------------------
    def _chunk_noise(self, like: Tensor, first_position: int) -> Tensor:
        """Noise of one chunk, a function of (seed, iteration, first position) only.

        So a resumed run, a DDP run and a single-process run draw the same noise for the
        same position, whatever rank or restart computes it.
        """
        g = torch.Generator(device="cpu")
        g.manual_seed((int(self._state["noise_seed"]) * 1_000_003 + self.current_epoch * 7_919_113
                       + first_position) % (2**63 - 1))
        return torch.randn(like.shape, generator=g).to(device=like.device, dtype=like.dtype)

    def setup(self, stage: str) -> None:
        private_metric_states(self)

    def on_fit_start(self) -> None:
        if self._state["noise_seed"] is None:
            self._state["noise_seed"] = torch.initial_seed()
        if self.hparams.mode != "parallel":
            return
        seqs = self._sequences("train")
        prev = self._state["train_prev"]
        if prev is not None:
            check(prev.shape[0] == seqs.num_tokens,
                  f"the checkpoint carries contexts for {prev.shape[0]} train tokens but the data has "
                  f"{seqs.num_tokens}: resume with the same data settings.")
            self._state["train_prev"] = prev.to(self.device)
            if self._state["val_prev"] is not None:
                self._state["val_prev"] = self._state["val_prev"].to(self.device)
            for key in ("center", "spread"):  # noise_seed is a plain int
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

    def on_train_epoch_start(self) -> None:
        self._iter_start = time.perf_counter()
        if self.hparams.mode == "parallel":
            self._new["train"] = torch.zeros_like(self._state["train_prev"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.hparams.mode == "parallel":
            self._parallel_train_step(batch)
        else:
            self._tokenwise_train_step(batch)
        self._mid_iteration = batch_idx + 1 < self.trainer.num_training_batches
        if self.hparams.mode == "parallel" and not self._mid_iteration:
            self._end_parallel_iteration()

    def _parallel_train_step(self, batch: dict[str, Tensor]) -> None:
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
        if res.numel():
            self.train_rate.update(res)
            self.train_cvfp.update(res.detach())
            self.train_tokens.update(res.numel())

    def _end_parallel_iteration(self) -> None:
        hp = self.hparams
        opt = self.optimizers()
        if hp.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
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
        self.log("train/tokens", self.train_tokens, on_step=False, on_epoch=True)
        self.train_erank.update(new)
        self.log("train/effective_rank_pct", self.train_erank.compute(), on_step=False, on_epoch=True, prog_bar=True)
        self.train_erank.reset()
        self.log("train/iteration", float(self.current_epoch + 1), on_step=False, on_epoch=True)
        self.log("time/iteration_s", time.perf_counter() - self._iter_start, on_step=False, on_epoch=True)

    def _tokenwise_train_step(self, batch: dict[str, Tensor]) -> None:
        hp = self.hparams
        opt = self.optimizers()
        ids = batch["ids"]
        n = ids.shape[0]
        c = torch.zeros(n, self.context_dim, device=self.device)
        active = torch.ones(n, dtype=torch.bool, device=self.device)
        converged = torch.zeros_like(active)
        iters = torch.full((n,), hp.max_inner_iterations, device=self.device, dtype=torch.float32)
        last_res = torch.zeros(n, device=self.device)
        for it in range(1, hp.max_inner_iterations + 1):
            out = self.updater.update_context_one_step(c, self.embedding(ids)).float()
            res = per_dim_mse(out, c)
            weight = active.float()
            loss = (res * weight).sum() / weight.sum().clamp_min(1.0)
            self.manual_backward(loss)
            if hp.grad_clip > 0:
                self.clip_gradients(opt, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
            c = out.detach()
            res = res.detach()
            last_res = torch.where(active, res, last_res)
            if it > hp.warmup_iterations:
                newly = active & (res < hp.convergence_threshold)
                iters[newly] = it
                converged |= newly
                active &= ~newly
            remaining = active.sum().float()
            if self.trainer.world_size > 1:  # every rank must run the same number of backward passes
                remaining = self.trainer.strategy.reduce(remaining, reduce_op="sum")
            if remaining.item() == 0:
                break
        if n:
            self.train_rate.update(torch.where(converged, 0.0, float("inf")))
            self.train_iters.update(iters)
            self.train_cvfp.update(last_res)
            self.train_erank.update(c)
            self.train_tokens.update(n)
        self.log("train/convergence_rate", self.train_rate, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/tokens", self.train_tokens, on_step=False, on_epoch=True)
        self.log("train/mean_iterations", self.train_iters, on_step=False, on_epoch=True)
        self.log("train/cvfp_loss", self.train_cvfp, on_step=False, on_epoch=True)
        self.log("train/loss", self.train_cvfp, on_step=False, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        if self.hparams.mode == "tokenwise":
            self.log("train/effective_rank_pct", self.train_erank.compute())
            self.train_erank.reset()
            self.log("time/iteration_s", time.perf_counter() - self._iter_start)

    # ---- validation ------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.trainer.sanity_checking or self.hparams.mode != "parallel":
            return
        if self._state["val_prev"] is None:
            self._state["val_prev"], _ = self._sequential(self._sequences("val"))
        self._new["val"] = torch.zeros_like(self._state["val_prev"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            return
        if self.hparams.mode == "tokenwise":
            ids = batch["ids"]
            e = self.embedding(ids)
            terms = self.updater.token_terms(e)  # the token's share, the same in every solver step
            fixed, stats = fixed_point_iter(lambda c: self.updater.update_context_one_step(c, e, token_terms=terms),
                                            torch.zeros(ids.shape[0], self.context_dim, device=self.device),
                                            self.hparams.max_inner_iterations, self.hparams.convergence_threshold,
                                            self.hparams.warmup_iterations)
            if ids.numel():
                self.val_rate.update(torch.where(stats.converged, 0.0, float("inf")))
                self.val_iters.update(stats.nstep.float())
                self.val_cvfp.update(stats.residual)
                self.val_erank.update(fixed)
                self.val_tokens.update(ids.numel())
            self.log("val/mean_iterations", self.val_iters, on_step=False, on_epoch=True)
        else:
            prev = self._state["val_prev"]
            pos = batch["positions"]
            out = self.updater.update_context_one_step(shifted_inputs(prev, pos, batch["is_start"]),
                                                       self.embedding(batch["ids"])).float()
            res = per_dim_mse(out, prev[pos])
            self._new["val"][pos] = out
            if res.numel():
                self.val_rate.update(res)
                self.val_cvfp.update(res)
                self.val_tokens.update(res.numel())
        self.log("val/convergence_rate", self.val_rate, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/cvfp_loss", self.val_cvfp, on_step=False, on_epoch=True)
        self.log("val/tokens", self.val_tokens, on_step=False, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        if self.hparams.mode == "parallel":
            new = self._sum_over_ranks(self._new["val"])
            self._new["val"] = None
            self._state["val_prev"] = new
            self.val_erank.update(new)
        if self.val_erank.rows:
            self.log("val/effective_rank_pct", self.val_erank.compute())
        self.val_erank.reset()

    # ---- contexts for callbacks and Phase 2 --------------------------------------------------
    def contexts(self, split: str) -> Tensor | None:
        """The carried contexts ``(N, D)`` of ``split`` (``train`` or ``val``), parallel mode."""
        return self._state.get(f"{split}_prev")

    # ---- checkpoint state ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in self._state.items()}
        state["mid_iteration"] = bool(self._mid_iteration)
        checkpoint[STATE_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(self, checkpoint)
        state = checkpoint.get(STATE_KEY)
        if state is None:
            return
        if state.get("mid_iteration"):
            raise CVFPUserError("this Phase 1 checkpoint was saved in the middle of an iteration (its accumulated "
                                "gradient is not in it): resume from an epoch-end checkpoint such as last.ckpt.")
        for key in self._state:
            self._state[key] = state.get(key)
