"""Losses (cvfp_lightning.losses): the diversity loss, its chunked spread and surrogate, the cyclic loss."""

from __future__ import annotations

import math

import pytest
import torch

from cvfp_lightning.losses import cyclic_convergence_loss, diversity_loss, diversity_surrogate, spread
from cvfp_lightning.solvers import per_dim_mse


def test_diversity_loss_value_and_centring():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.0, 2.0], [1.0, 2.0]])
    # global mean (1, 1): deviations (0,-1), (-2,-1), (2,1), (0,1): ||.||_F = sqrt(12)
    assert diversity_loss(x).item() == pytest.approx(-math.sqrt(12) / 4)
    # per-chunk centring differs: chunks [0:2] and [2:4] have spreads sqrt(2) and sqrt(2)
    chunk = (diversity_loss(x[:2]) * 2 + diversity_loss(x[2:]) * 2) / 4
    assert chunk.item() == pytest.approx(-math.sqrt(2) / 2)


def test_chunked_spread_is_the_diversity_loss():
    torch.manual_seed(0)
    x = torch.randn(1000, 6) * 3 + 5
    m = x.mean(0)
    assert spread(x, m, chunk_rows=7).item() == pytest.approx(-diversity_loss(x).item() * 1000, rel=1e-6)
    assert spread(x, m, chunk_rows=7).item() == pytest.approx(spread(x, m).item(), rel=1e-6)
    assert spread(x[:0], m).item() == 0.0


def test_diversity_surrogate_has_the_global_gradient():
    torch.manual_seed(0)
    x = torch.randn(10, 4, requires_grad=True)
    diversity_loss(x).backward()
    exact = x.grad.clone()
    x.grad = None
    m, s = x.detach().mean(0), torch.linalg.vector_norm(x.detach() - x.detach().mean(0))
    (diversity_surrogate(x[:3], m, s, 10) + diversity_surrogate(x[3:], m, s, 10)).backward()
    torch.testing.assert_close(x.grad, exact)


def test_cyclic_convergence_loss_of_a_period_2_sequence():
    # period-2 sequence a b a b: cycle 2 is exact, cycle 1 is off by |a - b|^2 per dim
    a, b = torch.zeros(3), torch.full((3,), 2.0)
    ctx = torch.stack([a, b, a, b]).unsqueeze(0)
    assert cyclic_convergence_loss(ctx, 2).item() == 0.0
    assert cyclic_convergence_loss(ctx, 1).item() == pytest.approx(4.0)
    assert per_dim_mse(ctx[0, 1:], ctx[0, :-1]).mean().item() == pytest.approx(4.0)
