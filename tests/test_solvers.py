"""Fixed-point solvers (cvfp_lightning.solvers): the per-dimension MSE measure, plain iteration and
Anderson on a contraction, warm-up, and the Jacobian's spectral norm."""

from __future__ import annotations

import pytest
import torch

from cvfp_lightning.metrics import ConvergenceRate
from cvfp_lightning.solvers import anderson, fixed_point_iter, jacobian_spectral_norm, per_dim_mse


def test_mse_not_l2_is_the_convergence_measure():
    # the seeds' bug: 256 dims each off by 0.1 -> MSE 0.01 (converged at 0.03) but L2 1.6
    a, b = torch.zeros(1, 256), torch.full((1, 256), 0.1)
    assert per_dim_mse(a, b).item() == pytest.approx(0.01)
    assert torch.linalg.vector_norm(a - b).item() == pytest.approx(1.6)
    rate = ConvergenceRate(0.03)
    rate.update(per_dim_mse(a, b))
    rate.update(torch.tensor([0.5, 0.01, 0.029, 0.03]))
    assert rate.compute().item() == pytest.approx(3 / 5)  # 0.01, 0.01, 0.029 < 0.03; 0.5 and 0.03 are not


def test_fixed_point_iteration_and_anderson_on_a_contraction():
    # f(x) = 0.5 x + 1 has the fixed point 2 in every dimension
    f = lambda x: 0.5 * x + 1.0  # noqa: E731
    x, stats = fixed_point_iter(f, torch.zeros(3, 4), max_iter=100, tol=1e-8)
    torch.testing.assert_close(x, torch.full((3, 4), 2.0), atol=1e-3, rtol=0)
    assert stats.converged.all() and stats.convergence_rate == 1.0
    # x_k = 2 - 2^(1-k): step k has residual 4^-(k-1), below 1e-8 first at k = 15
    assert stats.nstep.tolist() == [15, 15, 15]
    xa, sa = anderson(f, torch.zeros(3, 4), max_iter=50, tol=1e-8)
    torch.testing.assert_close(xa, torch.full((3, 4), 2.0), atol=1e-3, rtol=0)
    assert sa.mean_steps < stats.mean_steps


def test_warmup_delays_convergence_checks():
    _, stats = fixed_point_iter(lambda x: x, torch.zeros(2, 3), max_iter=20, tol=0.1, warmup=5)
    assert stats.nstep.tolist() == [6, 6]


def test_jacobian_spectral_norm_of_a_linear_map():
    torch.manual_seed(0)
    A = torch.randn(6, 6)
    sigma = jacobian_spectral_norm(lambda x: x @ A.T, torch.randn(3, 6), n_iter=100)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(A, ord=2).repeat(3), rtol=1e-3, atol=1e-3)
