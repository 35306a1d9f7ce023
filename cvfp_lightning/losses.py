"""Training losses of CVFP models.

- :func:`cyclic_convergence_loss`: repetition training
  ``MSE(ctx[:, L:], ctx[:, :-L])`` for cycle length L; :func:`cycle_stats` the same over a
  batch of rows with their own L, with the change and distance statistics.
- :func:`diversity_loss`: ``-||X - mean(X)||_F / n`` (negative spread, to be minimised).
- :func:`spread`: ``||X - mean(X)||_F`` in chunks, for the per-iteration statistics.
- :func:`diversity_surrogate`: the chunked form of the global diversity loss whose
  gradient equals the global loss's gradient (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cvfp_lightning.solvers import per_dim_mse


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


@dataclass
class CycleStats:
    """Statistics of one batch of contexts (see :func:`cycle_stats`).

    ``conv_loss`` keeps its graph; the rest are detached. ``pairs`` / ``steps`` count the
    real (t, t-L) pairs and (t, t-1) steps behind the means.
    """

    conv_loss: Tensor
    conv_metric: Tensor
    change: Tensor
    pairs: int
    steps: int


def cycle_stats(contexts: Tensor, cycle_length: Tensor, mask: Tensor) -> CycleStats:
    """Cyclic loss and distances of ``contexts (B, T, D)`` with per-row ``cycle_length (B,)``
    and ``mask (B, T)`` (True = real position; padding only at the end of a row).

    ``conv_loss`` = mean over all real pairs of ``per_dim_mse(ctx[t], ctx[t - L_b])``
    (:func:`~cvfp_lightning.losses.cyclic_convergence_loss` per group of equal L, weighted
    by pair count), ``conv_metric`` = mean ``||ctx[t] - ctx[t - L_b]||_2`` over the same
    pairs, ``change`` = mean ``||ctx[t] - ctx[t - 1]||_2`` over real consecutive positions.
    """
    total_loss = contexts.sum() * 0.0
    dist_sum = contexts.new_zeros(())
    pairs = 0
    for L in cycle_length.unique().tolist():
        rows = cycle_length == L
        c, m = contexts[rows], mask[rows]
        pair_mask = m[:, L:] & m[:, :-L]
        n = int(pair_mask.sum())
        if n == 0:
            continue
        total_loss = total_loss + cyclic_convergence_loss(c, L, m) * n
        dist = (c[:, L:] - c[:, :-L]).detach().norm(dim=-1)
        dist_sum = dist_sum + dist[pair_mask].sum()
        pairs += n
    step_mask = mask[:, 1:] & mask[:, :-1]
    steps = int(step_mask.sum())
    change = (contexts[:, 1:] - contexts[:, :-1]).detach().norm(dim=-1)[step_mask].sum()
    return CycleStats(conv_loss=total_loss / max(pairs, 1), conv_metric=dist_sum / max(pairs, 1),
                      change=change / max(steps, 1), pairs=pairs, steps=steps)


def cycle_end_contexts(contexts: Tensor, cycle_length: Tensor, mask: Tensor) -> Tensor:
    """Context of each row at its last complete cycle: ``(B, T, D) -> (B, D)``.

    Row b with ``n_b`` real positions ends its last whole cycle at
    ``t = (n_b // L_b) * L_b - 1``; comparing rows there compares the same phase of every
    cycle (after a whole phrase), which matters when the L_b differ.
    """
    n = mask.sum(dim=1)
    last = (n // cycle_length) * cycle_length - 1
    return contexts[torch.arange(contexts.shape[0], device=contexts.device), last.clamp_min(0)]


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
