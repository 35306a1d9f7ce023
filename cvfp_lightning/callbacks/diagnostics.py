"""``CVFPDiagnostics``: identity mapping, zero solution, global attractor, contraction."""

from __future__ import annotations

import logging

import lightning as L
import torch

from cvfp_lightning.diagnostics import cvfp_diagnostics
from cvfp_lightning.errors import check
from cvfp_lightning.solvers import SOLVERS, SolverName

log = logging.getLogger(__name__)


class CVFPDiagnostics(L.Callback):
    """Run :func:`~cvfp_lightning.diagnostics.cvfp_diagnostics` and log ``diag/*``.

    Runs at the end of training, and every ``every_n_epochs`` epochs when set. Uses up to
    ``num_tokens`` distinct ids of the training data (or of the vocabulary when the data
    has no sequences), fixed-point tolerance ``tol`` (default: the module's
    ``convergence_threshold``), fixed points solved by ``solver`` (``iteration`` or
    ``anderson``; with ``anderson``, ``diag/fixed_point_steps_iteration`` shows plain
    iteration's step count beside it).
    """

    def __init__(self, num_tokens: int = 256, every_n_epochs: int | None = None, max_iter: int = 100,
                 tol: float | None = None, power_iters: int = 10, solver: SolverName = "iteration"):
        check(solver in SOLVERS, f"CVFPDiagnostics.solver={solver!r} is unknown: expected one of {', '.join(SOLVERS)}.")
        self.num_tokens, self.every_n_epochs = num_tokens, every_n_epochs
        self.max_iter, self.tol, self.power_iters, self.solver = max_iter, tol, power_iters, solver
        self.results: dict[str, float] = {}

    def _token_ids(self, trainer: L.Trainer, pl_module) -> torch.Tensor:
        seqs = getattr(getattr(trainer, "datamodule", None), "train_sequences", None)
        if seqs is not None and seqs.num_tokens:
            ids = seqs.first_occurrences(self.num_tokens)  # in data order, deterministic
        else:
            ids = torch.arange(pl_module.embedding.vocab_size)
        return ids[: self.num_tokens]

    def run(self, trainer: L.Trainer, pl_module) -> dict[str, float]:
        tol = self.tol if self.tol is not None else float(pl_module.hparams.get("convergence_threshold", 0.03))
        was_training = pl_module.training
        pl_module.eval()
        try:
            res = cvfp_diagnostics(pl_module.updater, pl_module.embedding, self._token_ids(trainer, pl_module),
                                   self.max_iter, tol, self.power_iters, solver=self.solver)
        finally:
            pl_module.train(was_training)
        self.results = {f"diag/{k}": v for k, v in res.items()}
        return self.results

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            for name, value in self.run(trainer, pl_module).items():
                pl_module.log(name, value)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self.run(trainer, pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(results, step=trainer.global_step)
        if trainer.is_global_zero:
            log.info("diagnostics: %s", ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
