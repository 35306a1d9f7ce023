"""torchmetrics Metrics of CVFP training (synced across DDP ranks by torchmetrics).

- :class:`ConvergenceRate`: share of rows whose residual (per-dimension MSE) is below
  a threshold.
- :class:`EffectiveRank`: Roy & Vetterli effective rank of the *uncentred* context matrix,
  ``p = s / sum(s)`` over its singular values, ``ER = exp(-sum p ln p)``, on at most
  ``max_rows`` rows sampled with a fixed seed; ``percent=True`` reports ``100 ER / D``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class ConvergenceRate(Metric):
    """``#(residual < threshold) / #rows``; ``update(residual (n,))``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("converged", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, residual: Tensor) -> None:
        residual = residual.detach().reshape(-1)
        self.converged += (residual < self.threshold).sum().to(torch.float64)
        self.total += residual.numel()

    def compute(self) -> Tensor:
        return (self.converged / self.total.clamp_min(1.0)).float()


def effective_rank(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Roy-Vetterli effective rank of ``matrix (n, D)`` (uncentred). Returns (ER, singular values)."""
    s = torch.linalg.svdvals(matrix.double())
    total = s.sum()
    if total <= 0:
        return torch.tensor(0.0), s.float()
    p = s / total
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).float(), s.float()


class EffectiveRank(Metric):
    """Effective rank of the rows given to ``update(contexts (n, D))`` (all ranks gathered).

    ``compute`` samples at most ``max_rows`` rows (``torch.randperm`` seeded by ``seed``,
    the same on every rank) and returns ER, or ``100 ER / D`` with ``percent``.
    The singular values of the last compute stay in ``last_singular_values``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, max_rows: int = 10_000, seed: int = 0, percent: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.max_rows, self.seed, self.percent = int(max_rows), int(seed), percent
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.last_singular_values: Tensor | None = None

    def update(self, contexts: Tensor) -> None:
        self.rows.append(contexts.detach().float().reshape(-1, contexts.shape[-1]))

    def compute(self) -> Tensor:
        rows = dim_zero_cat(self.rows)
        if rows.shape[0] > self.max_rows:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(rows.shape[0], generator=g)[: self.max_rows].sort().values
            rows = rows[idx.to(rows.device)]
        er, s = effective_rank(rows.cpu())
        self.last_singular_values = s
        value = 100.0 * er / rows.shape[1] if self.percent else er
        return value.to(self.device)
