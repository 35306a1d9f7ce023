"""Fixed-point solvers and the one convergence measure.

The convergence measure everywhere is the per-dimension mean squared error
``per_dim_mse(a, b) = mean_d (a - b)^2`` over the last dimension (never the L2 norm,
which grows with sqrt(D): the seed documents' worst bug). Solvers follow torchdeq: small
functions with one signature ``solver(f, x0, max_iter, tol, warmup) -> (x, FixedPointStats)``,
named in :data:`SOLVERS` (plain ``iteration`` and ``anderson`` acceleration) and called
through :func:`solve`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from cvfp_lightning.errors import CVFPUserError


def per_dim_mse(a: Tensor, b: Tensor) -> Tensor:
    """``mean_d (a - b)^2`` over the last dimension: ``(..., D), (..., D) -> (...)``."""
    return (a - b).pow(2).mean(dim=-1)


@dataclass
class FixedPointStats:
    """Statistics of a batched fixed-point solve (one row = one problem).

    Attributes:
        residual: ``(B,)`` per_dim_mse(f(x), x) at the returned x.
        converged: ``(B,)`` bool, residual < tol at some step after warmup.
        nstep: ``(B,)`` number of f evaluations until convergence (max_iter if never).
        trace: mean residual after each step.
    """

    residual: Tensor
    converged: Tensor
    nstep: Tensor
    trace: list[float] = field(default_factory=list)

    @property
    def convergence_rate(self) -> float:
        return self.converged.float().mean().item() if self.converged.numel() else 0.0

    @property
    def mean_steps(self) -> float:
        return self.nstep.float().mean().item() if self.nstep.numel() else 0.0


@torch.no_grad()
def fixed_point_iter(f: Callable[[Tensor], Tensor], x0: Tensor, max_iter: int = 200, tol: float = 1e-2,
                     warmup: int = 0) -> tuple[Tensor, FixedPointStats]:
    """Plain iteration ``x_{k+1} = f(x_k)`` on a batch ``(B, D)``.

    Rows that converged (residual < tol, checked from step ``warmup + 1`` on) are frozen,
    so each row's result is the first iterate that met the tolerance.
    """
    x = x0
    B = x.shape[0]
    converged = torch.zeros(B, dtype=torch.bool, device=x.device)
    nstep = torch.full((B,), max_iter, dtype=torch.long, device=x.device)
    residual = torch.full((B,), float("inf"), device=x.device)
    trace: list[float] = []
    for k in range(1, max_iter + 1):
        x_new = f(x)
        res = per_dim_mse(x_new, x)
        active = ~converged
        residual = torch.where(active, res, residual)
        x = torch.where(active.unsqueeze(-1), x_new, x)
        trace.append(res.mean().item())
        if k > warmup:
            newly = active & (res < tol)
            nstep = torch.where(newly, torch.full_like(nstep, k), nstep)
            converged |= newly
            if bool(converged.all()):
                break
    return x, FixedPointStats(residual, converged, nstep, trace)


@torch.no_grad()
def anderson(f: Callable[[Tensor], Tensor], x0: Tensor, max_iter: int = 50, tol: float = 1e-2, warmup: int = 0,
             m: int = 5, lam: float = 1e-4, beta: float = 1.0) -> tuple[Tensor, FixedPointStats]:
    """Anderson acceleration (type II, as in torchdeq / Walker & Ni 2011) on ``(B, D)``.

    Converged rows keep iterating with the others but their reported result is frozen at
    the first step that met ``tol`` (checked from step ``warmup + 1`` on); residuals use
    :func:`per_dim_mse`; ``nstep`` counts f evaluations as :func:`fixed_point_iter` does.
    """
    B, D = x0.shape
    X = x0.new_zeros(B, m, D)
    F_ = x0.new_zeros(B, m, D)
    X[:, 0], F_[:, 0] = x0, f(x0)
    X[:, 1], F_[:, 1] = F_[:, 0], f(F_[:, 0])
    H = x0.new_zeros(B, m + 1, m + 1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = x0.new_zeros(B, m + 1, 1)
    y[:, 0] = 1
    best = X[:, 1].clone()
    converged = torch.zeros(B, dtype=torch.bool, device=x0.device)
    nstep = torch.full((B,), max_iter, dtype=torch.long, device=x0.device)
    residual = per_dim_mse(F_[:, 1], X[:, 1])
    trace = [residual.mean().item()]
    for k in range(2, max_iter):
        n = min(k, m)
        G = F_[:, :n] - X[:, :n]
        H[:, 1:n + 1, 1:n + 1] = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, dtype=x0.dtype,
                                                                                   device=x0.device)[None]
        alpha = torch.linalg.solve(H[:, :n + 1, :n + 1], y[:, :n + 1])[:, 1:n + 1, 0]
        x_k = beta * (alpha[:, None] @ F_[:, :n])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        X[:, k % m] = x_k
        F_[:, k % m] = f(x_k)
        res = per_dim_mse(F_[:, k % m], x_k)
        trace.append(res.mean().item())
        active = ~converged
        best = torch.where(active.unsqueeze(-1), x_k, best)
        residual = torch.where(active, res, residual)
        newly = active & (res < tol) & (k + 1 > warmup)
        nstep = torch.where(newly, torch.full_like(nstep, k + 1), nstep)
        converged |= newly
        if bool(converged.all()):
            break
    return best, FixedPointStats(residual, converged, nstep, trace)


SOLVERS = {"iteration": fixed_point_iter, "anderson": anderson}
SolverName = Literal["iteration", "anderson"]


def solve(solver: str, f: Callable[[Tensor], Tensor], x0: Tensor, max_iter: int, tol: float,
          warmup: int = 0) -> tuple[Tensor, FixedPointStats]:
    """The fixed points of ``f`` from ``x0 (B, D)`` by ``solver`` (``iteration`` | ``anderson``)."""
    if solver not in SOLVERS:
        raise CVFPUserError(f"solver={solver!r} is unknown: expected one of {', '.join(SOLVERS)}.")
    return SOLVERS[solver](f, x0, max_iter=max_iter, tol=tol, warmup=warmup)


def jacobian_spectral_norm(f: Callable[[Tensor], Tensor], x: Tensor, n_iter: int = 20,
                           generator: torch.Generator | None = None) -> Tensor:
    """Largest singular value of ``df/dx`` at each row of ``x`` ``(B, D) -> (B,)``.

    ``f`` must act row-wise (the Jacobian is block-diagonal over rows), as every context
    updater does. Power iteration on ``J^T J`` with forward- and reverse-mode products.
    A value below 1 at the fixed points is the contraction the Banach argument needs.
    """
    from torch.func import jvp, vjp

    x = x.detach()
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    _, vjp_fn = vjp(f, x)
    sigma = x.new_zeros(x.shape[0])
    for _ in range(n_iter):
        _, jv = jvp(f, (x,), (v,))
        sigma = jv.norm(dim=-1)
        (jtjv,) = vjp_fn(jv)
        v = jtjv / jtjv.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return sigma.detach()
