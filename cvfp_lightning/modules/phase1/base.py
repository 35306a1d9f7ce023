"""What the two Phase 1 algorithms share: the model, its optimiser, the metrics, the checkpoint state.

Phase 1 learns weights whose context update ``c_new = f(c, e)`` settles at fixed points.
The algorithms are subclasses (:class:`~cvfp_lightning.modules.phase1.parallel.Phase1Parallel`,
:class:`~cvfp_lightning.modules.phase1.tokenwise.Phase1Tokenwise`), chosen by ``class_path``.
Both train the one update rule ``updater.update_context_one_step`` and measure convergence
with the per-dimension MSE against ``convergence_threshold``.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric, SumMetric

from cvfp_lightning.errors import CVFPUserError, check, check_positive
from cvfp_lightning.metrics import ConvergenceRate, ResidualHistogram, private_metric_states
from cvfp_lightning.models.context import ContextConfig, build_context_updater
from cvfp_lightning.models.embedding import EmbeddingConfig, build_embedding
from cvfp_lightning.models.legacy import upgrade_checkpoint
from cvfp_lightning.modules.checkpoint_fit import check_checkpoint_fits
from cvfp_lightning.optim import configure_adam

STATE_KEY = "cvfp_phase1_state"


class Phase1Base(L.LightningModule):
    """Embedding + context block trained for fixed points (one algorithm per subclass).

    Args:
        vocab_size: number of token ids (linked from ``data.vocab_size`` by the CLI).
        context: the context block (:class:`~cvfp_lightning.models.context.ContextConfig`).
        embedding: the token embedding (:class:`~cvfp_lightning.models.embedding.EmbeddingConfig`).
        convergence_threshold: per-dimension MSE below which a position counts as converged.
        lr: Adam learning rate.
        grad_clip: max gradient norm per optimizer step (0 disables).
        effective_rank_rows: rows sampled for the effective rank.
        algorithm: the subclass's own (checked) options, saved as hyperparameters too.

    Subclasses make their effective-rank metrics ``train_erank`` / ``val_erank``, keep their
    carried state in ``self._state`` (saved in every checkpoint under
    ``cvfp_phase1_state``, so ``--ckpt_path`` resumes exactly) and set
    ``self._mid_iteration`` while an iteration's gradient is still being accumulated.
    """

    data_layout = "position_chunks"
    STATE_FIELDS: tuple[str, ...] = ("noise_seed",)

    def __init__(self, vocab_size: int, context: ContextConfig | dict | None, embedding: EmbeddingConfig | dict | None,
                 convergence_threshold: float, lr: float, grad_clip: float, effective_rank_rows: int,
                 algorithm: dict):
        super().__init__()
        context, embedding = ContextConfig.coerce(context), EmbeddingConfig.coerce(embedding)
        check(isinstance(vocab_size, int) and vocab_size > 0,
              f"model.vocab_size={vocab_size!r} is invalid: expected a positive integer (the CLI links it from the data).")
        check_positive("model.convergence_threshold", convergence_threshold)
        check_positive("model.lr", lr)
        check_positive("model.grad_clip", grad_clip, allow_zero=True)
        check_positive("model.effective_rank_rows", effective_rank_rows)
        self.automatic_optimization = False
        self.embedding = build_embedding(vocab_size, embedding, default_dim=context.context_dim)
        embedding = EmbeddingConfig(**{**embedding.to_dict(), "embed_dim": self.embedding.embed_dim})
        self.updater = build_context_updater(context, self.embedding.embed_dim)
        # plain dicts in the checkpoint (loadable with weights_only), with the resolved embed_dim
        self.save_hyperparameters({"vocab_size": vocab_size, "context": context.to_dict(),
                                   "embedding": embedding.to_dict(), **algorithm,
                                   "convergence_threshold": convergence_threshold, "lr": lr, "grad_clip": grad_clip,
                                   "effective_rank_rows": effective_rank_rows})
        thr = convergence_threshold
        self.train_rate, self.val_rate = ConvergenceRate(thr), ConvergenceRate(thr)
        # the residual distribution of the epoch (ResidualMonitor draws it): O(bins), reset every epoch
        self.train_residuals, self.val_residuals = ResidualHistogram(thr), ResidualHistogram(thr)
        self.train_cvfp, self.val_cvfp = MeanMetric(), MeanMetric()
        self.train_tokens, self.val_tokens = SumMetric(), SumMetric()  # positions evaluated, over all ranks
        self._state: dict = {key: None for key in self.STATE_FIELDS}
        self._iter_start = 0.0
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

    def optimizer_step_clipped(self) -> None:
        """One manual optimizer step: clip to ``grad_clip`` (norm), step, zero the gradients."""
        opt = self.optimizers()
        if self.hparams.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)

    # ---- data access -------------------------------------------------------------------
    def sequences(self, split: str):
        """The ``train`` / ``val`` :class:`~cvfp_lightning.data.sequences.TokenSequences` of the data module."""
        dm = getattr(self.trainer, "datamodule", None)
        seqs = getattr(dm, f"{split}_sequences", None)
        if seqs is None:
            raise CVFPUserError(f"{type(self).__name__} needs a TokenDataModule (data: class_path: "
                                "cvfp_lightning.data.TextDataModule or similar) that provides train/val sequences.")
        return seqs

    def contexts(self, split: str) -> Tensor | None:
        """The carried contexts ``(N, D)`` of ``split`` (``train`` or ``val``), when the algorithm keeps them."""
        return self._state.get(f"{split}_prev")

    def log_validation_metrics(self) -> None:
        """The validation metrics both algorithms update: convergence rate, residual, positions."""
        self.log("val/convergence_rate", self.val_rate, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/cvfp_loss", self.val_cvfp, on_step=False, on_epoch=True)
        self.log("val/tokens", self.val_tokens, on_step=False, on_epoch=True)

    # ---- hooks shared by both algorithms -------------------------------------------------
    def setup(self, stage: str) -> None:
        private_metric_states(self)
        connect = getattr(getattr(self._trainer, "datamodule", None), "connect", None)
        if connect is not None:  # the handshake: in-order position chunks
            connect(layout=self.data_layout)

    def on_fit_start(self) -> None:
        if self._state["noise_seed"] is None:
            self._state["noise_seed"] = torch.initial_seed()

    def on_train_epoch_start(self) -> None:
        self._iter_start = time.perf_counter()
        self.train_residuals.reset()

    def on_train_epoch_end(self) -> None:
        """Step the ``--lr_scheduler`` once per iteration (Lightning does not under manual
        optimization); ``ReduceLROnPlateau`` reads its ``monitor`` from the iteration's metrics."""
        scheduler = self.lr_schedulers()
        if scheduler is None:
            return
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            monitor = getattr(scheduler, "monitor", None)
            value = self.trainer.callback_metrics.get(monitor)
            if value is None:
                raise CVFPUserError(f"--lr_scheduler ReduceLROnPlateau: monitor {monitor!r} is not logged; "
                                    f"{type(self).__name__} logs {sorted(self.trainer.callback_metrics)}.")
            scheduler.step(value)
        else:
            scheduler.step()

    def on_validation_epoch_start(self) -> None:
        self.val_residuals.reset()

    # ---- checkpoint state ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        def cpu(v):
            if isinstance(v, dict):
                return {k: cpu(x) for k, x in v.items()}
            return v.detach().cpu() if isinstance(v, Tensor) else v

        state = cpu(self._state)
        state["mid_iteration"] = bool(self._mid_iteration)
        checkpoint[STATE_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(self, checkpoint)
        check_checkpoint_fits(self, checkpoint)
        state = checkpoint.get(STATE_KEY)
        if state is None:
            return
        if state.get("mid_iteration"):
            raise CVFPUserError("this Phase 1 checkpoint was saved in the middle of an iteration (its accumulated "
                                "gradient is not in it): resume from an epoch-end checkpoint such as last.ckpt.")
        for key in self._state:
            self._state[key] = state.get(key)
