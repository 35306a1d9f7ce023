"""Post-training diagnostics of a context updater (the failure modes the seed documents ran into).

- identity mapping: ``mean cos(c, f(c, e))`` on random c; > 0.95 means f barely changes
  the context (fixed points everywhere, nothing learned).
- zero solution: RMS of the fixed points; ~0 means contexts collapsed to zero.
- global attractor: mean pairwise L2 distance and cosine between the fixed points of
  distinct tokens; distance ~0 / cosine ~1 means every token shares one fixed point.
- contraction: spectral norm of ``df/dc`` at the fixed points (power iteration); < 1 is
  the contraction the Banach argument of the specification needs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cvfp_lightning.models.context import ContextUpdater
from cvfp_lightning.models.embedding import TokenEmbedding
from cvfp_lightning.solvers import fixed_point_iter, jacobian_spectral_norm, solve


def attractor_stats(contexts: Tensor) -> dict[str, float]:
    """Mean pairwise L2 distance and cosine between the rows of ``contexts (K, D)``, K >= 2."""
    K = contexts.shape[0]
    if K < 2:
        return {"attractor_distance": float("nan"), "attractor_cosine": float("nan")}
    x = contexts.double()
    dist = torch.cdist(x, x)
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = unit @ unit.T
    off = ~torch.eye(K, dtype=torch.bool, device=x.device)
    return {"attractor_distance": dist[off].mean().item(), "attractor_cosine": cos[off].mean().item()}


@torch.no_grad()
def cvfp_diagnostics(updater: ContextUpdater, embedding: TokenEmbedding, ids: Tensor, max_iter: int = 100,
                     tol: float = 0.03, power_iters: int = 10, seed: int = 0,
                     solver: str = "iteration") -> dict[str, float]:
    """All diagnostics on the distinct token ids ``ids (K,)``; returns ``{name: value}``.

    The fixed points are solved from ``c = 0`` by ``solver`` (:data:`~cvfp_lightning.solvers.SOLVERS`);
    ``fixed_point_steps`` is its mean number of steps, and with a solver other than plain
    iteration ``fixed_point_steps_iteration`` is plain iteration's, for comparison.
    """
    device = next(updater.parameters()).device
    ids = torch.unique(ids.to(device))
    e = embedding(ids)
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(ids.shape[0], updater.context_dim, generator=g).to(device)
    identity = torch.nn.functional.cosine_similarity(c, updater.update_context_one_step(c, e), dim=-1).mean().item()

    terms = updater.token_terms(e)  # the token's share, the same in every solver step

    def f(x):
        return updater.update_context_one_step(x, e, token_terms=terms)

    fixed, stats = solve(solver, f, torch.zeros_like(c), max_iter=max_iter, tol=tol)
    with torch.enable_grad():
        sigma = jacobian_spectral_norm(f, fixed, n_iter=power_iters, generator=g)
    out = {"identity_cosine": identity, "fixed_point_rate": stats.convergence_rate,
           "fixed_point_steps": stats.mean_steps, "fixed_point_rms": fixed.pow(2).mean().sqrt().item(),
           "contraction_mean": sigma.mean().item(), "contraction_max": sigma.max().item()}
    if solver != "iteration":
        out["fixed_point_steps_iteration"] = fixed_point_iter(f, torch.zeros_like(c), max_iter, tol)[1].mean_steps
    out.update(attractor_stats(fixed))
    return out


@torch.no_grad()
def phase1_fixed_point_stats(updater: ContextUpdater, embedding: TokenEmbedding, seqs, threshold: float,
                             noise_std: float, max_rows: int = 10_000, seed: int = 0, batch_size: int = 256,
                             chunk: int = 8192) -> dict[str, float]:
    """Phase 1's convergence rate and effective rank of a context block on the sequences ``seqs``.

    The contexts are the block's own sequential pass ``c_i = f(c_{i-1}, e_i)`` from ``c = 0``
    (:func:`~cvfp_lightning.sequential_pass.sequential_pass`). Phase 1's test is then one
    parallel iteration from them, as in its training: ``out_i = f(c_{i-1} + n_i, e_i)``
    (``c_{-1} = 0`` where a sequence starts, ``n_i ~ N(0, noise_std^2)`` drawn from ``seed``),
    and position i has converged when ``per_dim_mse(out_i, c_i) < threshold``
    (:class:`~cvfp_lightning.metrics.ConvergenceRate`). Without noise every position passes
    by construction (``out = c``): the noise of the Phase 1 run is what makes it a test of
    the fixed-point property. Effective rank: :class:`~cvfp_lightning.metrics.EffectiveRank`
    of ``c`` (``max_rows`` sampled rows), in % of the context width.

    Returns ``{"convergence_rate", "effective_rank_pct", "cvfp_loss"}`` (the mean residual).
    Memory: the contexts, 4 D bytes per position.
    """
    from cvfp_lightning.metrics import ConvergenceRate, EffectiveRank
    from cvfp_lightning.sequential_pass import sequential_pass, shifted_inputs
    from cvfp_lightning.solvers import per_dim_mse

    contexts = sequential_pass(updater, embedding, seqs, batch_size)  # (N, D)
    rate, erank = ConvergenceRate(threshold), EffectiveRank(max_rows, seed=seed, percent=True)
    g = torch.Generator().manual_seed(seed)
    residual_sum = 0.0
    for start in range(0, seqs.num_tokens, chunk):
        batch = seqs.position_batch(torch.arange(start, min(start + chunk, seqs.num_tokens)))
        pos = batch["positions"].to(contexts.device)
        inp = shifted_inputs(contexts, pos, batch["is_start"].to(contexts.device))
        if noise_std > 0:
            inp = inp + noise_std * torch.randn(inp.shape, generator=g).to(inp)
        out = updater.update_context_one_step(inp, embedding(batch["ids"].to(contexts.device))).float()
        res = per_dim_mse(out, contexts[pos])
        rate.update(res)
        residual_sum += float(res.sum())
    erank.update(contexts)
    return {"convergence_rate": float(rate.compute()), "effective_rank_pct": float(erank.compute()),
            "cvfp_loss": residual_sum / max(seqs.num_tokens, 1)}
