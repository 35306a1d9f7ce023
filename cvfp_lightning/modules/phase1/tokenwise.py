"""Token-wise Phase 1 (the Phase 1 specification): every token iterates to its own fixed point.

Every token of a batch starts from ``c = 0`` and iterates ``c <- f(c, e)`` with loss
``per_dim_mse(f(c, e), c.detach())`` and one optimizer step per inner iteration, until the
residual is below ``convergence_threshold`` (checked after ``warmup_iterations``) or
``max_inner_iterations``. Tokens are independent given the weights, so a batch of tokens
iterates together; converged tokens drop out of the loss. Validation solves the fixed
points without training, by plain iteration or Anderson acceleration (``solver``,
:func:`~cvfp_lightning.solvers.solve`), and logs ``val/mean_iterations`` (with ``anderson``
also ``val/mean_iterations_iteration``, plain iteration's count on the same tokens).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from cvfp_lightning.errors import check, check_positive
from cvfp_lightning.metrics import EffectiveRank
from cvfp_lightning.models.context import ContextConfig
from cvfp_lightning.models.embedding import EmbeddingConfig
from cvfp_lightning.modules.phase1.base import Phase1Base
from cvfp_lightning.solvers import SOLVERS, SolverName, fixed_point_iter, per_dim_mse, solve


class Phase1Tokenwise(Phase1Base):
    """Token-wise fixed-point learning (see the module docstring).

    Args:
        convergence_threshold: per-dimension MSE below which a token counts as converged
            (the specification: 0.01).
        max_inner_iterations: inner iterations per token at most.
        warmup_iterations: inner iterations before convergence is checked.
        solver: how validation solves the fixed points: ``iteration`` or ``anderson``.
        **others**: see :class:`~cvfp_lightning.modules.phase1.base.Phase1Base`.
    """

    def __init__(self, vocab_size: int = 0, context: ContextConfig | None = None,
                 embedding: EmbeddingConfig | None = None, convergence_threshold: float = 0.01, lr: float = 1e-4,
                 grad_clip: float = 1.0, max_inner_iterations: int = 200, warmup_iterations: int = 0,
                 solver: SolverName = "iteration", effective_rank_rows: int = 10_000):
        check_positive("model.max_inner_iterations", max_inner_iterations)
        check_positive("model.warmup_iterations", warmup_iterations, allow_zero=True)
        check(warmup_iterations < max_inner_iterations,
              f"model.warmup_iterations={warmup_iterations} must be < max_inner_iterations={max_inner_iterations}.")
        check(solver in SOLVERS, f"model.solver={solver!r} is unknown: expected one of {', '.join(SOLVERS)}.")
        algorithm = {"max_inner_iterations": max_inner_iterations, "warmup_iterations": warmup_iterations}
        if solver != "iteration":  # the default stays out of the hyperparameters: earlier checkpoints resume
            algorithm["solver"] = solver
        super().__init__(vocab_size, context, embedding, convergence_threshold, lr, grad_clip, effective_rank_rows,
                         algorithm)
        self.solver = solver
        self.train_erank = EffectiveRank(effective_rank_rows, percent=True)  # rows gathered over ranks
        self.val_erank = EffectiveRank(effective_rank_rows, percent=True)
        self.train_iters, self.val_iters, self.val_iters_plain = MeanMetric(), MeanMetric(), MeanMetric()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        hp = self.hparams
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
            self.optimizer_step_clipped()
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
        self.train_residuals.update(last_res)  # every step, empty too: the same update count on every rank
        if n:
            self.train_rate.update(torch.where(converged, 0.0, float("inf")))
            self.train_iters.update(iters)
            self.train_cvfp.update(last_res)
            self.train_erank.update(c)
            self.train_tokens.update(n)
        self._mid_iteration = batch_idx + 1 < self.trainer.num_training_batches
        self.log("train/convergence_rate", self.train_rate, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/mean_iterations", self.train_iters, on_step=False, on_epoch=True)
        self.log("train/tokens", self.train_tokens, on_step=False, on_epoch=True)
        self.log("train/cvfp_loss", self.train_cvfp, on_step=False, on_epoch=True)
        self.log("train/loss", self.train_cvfp, on_step=False, on_epoch=True)
        if not self._mid_iteration:  # the epoch's spectrum, before callbacks (EffectiveRankMonitor) read it
            self.log("train/effective_rank_pct", self.train_erank.compute(), on_step=False, on_epoch=True,
                     batch_size=1)
            self.train_erank.reset()

    def on_train_epoch_end(self) -> None:
        self.log("time/iteration_s", time.perf_counter() - self._iter_start)
        super().on_train_epoch_end()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            return
        hp = self.hparams
        ids = batch["ids"]
        e = self.embedding(ids)
        terms = self.updater.token_terms(e)  # the token's share, the same in every solver step
        def f(c):
            return self.updater.update_context_one_step(c, e, token_terms=terms)

        start = torch.zeros(ids.shape[0], self.context_dim, device=self.device)
        fixed, stats = solve(self.solver, f, start, hp.max_inner_iterations, hp.convergence_threshold,
                             hp.warmup_iterations)
        self.val_residuals.update(stats.residual)
        if ids.numel():
            self.val_rate.update(torch.where(stats.converged, 0.0, float("inf")))
            self.val_iters.update(stats.nstep.float())
            self.val_cvfp.update(stats.residual)
            self.val_erank.update(fixed)
            self.val_tokens.update(ids.numel())
        self.log("val/mean_iterations", self.val_iters, on_step=False, on_epoch=True)
        if self.solver != "iteration":  # plain iteration's count on the same tokens, for comparison
            plain = fixed_point_iter(f, start, hp.max_inner_iterations, hp.convergence_threshold, hp.warmup_iterations)
            if ids.numel():
                self.val_iters_plain.update(plain[1].nstep.float())
            self.log("val/mean_iterations_iteration", self.val_iters_plain, on_step=False, on_epoch=True)
        self.log_validation_metrics()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        if self.val_erank.rows:
            self.log("val/effective_rank_pct", self.val_erank.compute())
        self.val_erank.reset()
