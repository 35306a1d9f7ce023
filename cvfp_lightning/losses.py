"""Training losses of CVFP models.

- :func:`cvfp_loss`: fixed-point self-consistency ``mean per_dim_mse(out, target)``.
- :func:`cyclic_convergence_loss`: repetition training
  ``MSE(ctx[:, L:], ctx[:, :-L])`` for cycle length L.
- :func:`diversity_loss`: ``-||X - mean(X)||_F / n`` (negative spread, to be minimised).
- :func:`spread`: ``||X - mean(X)||_F`` in chunks, for the per-iteration statistics.
- :func:`diversity_surrogate`: the chunked form of the global diversity loss whose
  gradient equals the global loss's gradient (see its docstring).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cvfp_lightning.solvers import per_dim_mse


def cvfp_loss(out: Tensor, target: Tensor) -> Tensor:
    """``mean over rows of per_dim_mse(out, target)``; ``target`` is treated as a constant."""
    return per_dim_mse(out, target.detach()).mean()


def cyclic_convergence_loss(contexts: Tensor, cycle_length: int, mask: Tensor | None = None) -> Tensor:
    """``MSE(ctx[:, L:], ctx[:, :-L])`` for ``contexts (B, T, D)`` and cycle length L.

    With ``mask (B, T)`` (True = real token) only pairs whose both ends are real count.
    Returns 0 when T <= L.
    """
    L = int(cycle_length)
    if L < 1:
        raise ValueError(f"cycle_length={L} must be >= 1")
    if contexts.shape[1] <= L:
        return contexts.sum() * 0.0
    per_pair = per_dim_mse(contexts[:, L:], contexts[:, :-L])  # (B, T-L)
    if mask is None:
        return per_pair.mean()
    pair_mask = (mask[:, L:] & mask[:, :-L]).to(per_pair.dtype)
    return (per_pair * pair_mask).sum() / pair_mask.sum().clamp_min(1.0)


def diversity_loss(contexts: Tensor, center: Tensor | None = None) -> Tensor:
    """``-||X - m||_F / n`` for ``X = contexts (n, D)``; ``m`` = the row mean unless given."""
    n = contexts.shape[0]
    if n == 0:
        return contexts.sum() * 0.0
    m = contexts.mean(dim=0) if center is None else center
    return -torch.linalg.vector_norm(contexts - m) / n


@torch.no_grad()
def spread(contexts: Tensor, center: Tensor, chunk_rows: int = 1 << 16) -> Tensor:
    """``||X - 1 m^T||_F`` of ``X = contexts (n, D)``, ``m = center (D,)``, without gradient.

    Computed ``chunk_rows`` rows at a time, accumulated in float64, so no ``(n, D)``
    temporary is allocated (the contexts of 640k tokens are 2 GB).
    ``diversity_loss(X) == -spread(X, X.mean(0)) / n``.
    """
    total = torch.zeros((), dtype=torch.float64, device=contexts.device)
    for start in range(0, contexts.shape[0], chunk_rows):
        total += (contexts[start:start + chunk_rows] - center).pow(2).sum(dtype=torch.float64)
    return total.sqrt().to(contexts.dtype)


def diversity_surrogate(contexts: Tensor, center: Tensor, spread: Tensor, total: int) -> Tensor:
    """Chunk term of the global diversity loss with exact gradient.

    The global loss over all ``total`` rows is ``Lg = -||X - 1 m^T||_F / N``. Its gradient
    for row j is ``-(x_j - m) / (N S)`` with ``S = ||X - 1 m^T||_F`` (the term through m
    vanishes because the deviations sum to zero). Summed over chunks, this surrogate

        ``Ls = -sum_{j in chunk} ||x_j - m||^2 / (2 N S)``  (m, S constants)

    has exactly that gradient when m and S are the global mean and spread, so chunked
    gradient accumulation and DDP shards reproduce the one-batch gradient. The caller
    passes m and S of the previous iteration's contexts (equal to the current ones at a
    fixed point). Its value is not Lg: log the global value computed once per iteration.
    """
    if contexts.shape[0] == 0:
        return contexts.sum() * 0.0
    sq = (contexts - center).pow(2).sum()
    return -sq / (2.0 * total * spread.clamp_min(1e-12))
