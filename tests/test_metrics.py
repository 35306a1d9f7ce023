"""Metrics (cvfp_lightning.metrics): the effective rank of known matrices and of a row sample."""

from __future__ import annotations

import pytest
import torch

from cvfp_lightning.metrics import EffectiveRank, effective_rank


def test_effective_rank_of_known_matrices():
    er, _ = effective_rank(torch.eye(16))
    assert er.item() == pytest.approx(16.0, rel=1e-5)
    rank1 = torch.outer(torch.arange(1.0, 9.0), torch.randn(16))
    assert effective_rank(rank1)[0].item() == pytest.approx(1.0, abs=1e-4)
    # singular values (1, 1, 0, 0) -> p = (1/2, 1/2) -> exp(ln 2) = 2
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0])))[0].item() == pytest.approx(2.0, rel=1e-5)
    metric = EffectiveRank(max_rows=10_000, percent=True)
    metric.update(torch.eye(8)[:4])
    metric.update(torch.eye(8)[4:])
    assert metric.compute().item() == pytest.approx(100.0, rel=1e-5)


def test_effective_rank_samples_at_most_max_rows():
    metric = EffectiveRank(max_rows=50)
    metric.update(torch.randn(500, 8))
    metric.compute()
    # still a valid rank of a full-rank Gaussian sample, from 50 rows only
    assert 6.0 < metric.compute().item() <= 8.0
