"""Diagnostics (cvfp_lightning.diagnostics): attractor statistics, identity and contraction."""

from __future__ import annotations

import math

import pytest
import torch

from cvfp_lightning.diagnostics import attractor_stats, cvfp_diagnostics
from cvfp_lightning.models import ContextConfig, build_context_updater, build_embedding


def test_attractor_stats_separate_one_attractor_from_many():
    same = torch.ones(5, 8)
    s = attractor_stats(same)
    assert s["attractor_distance"] == pytest.approx(0.0, abs=1e-6)
    assert s["attractor_cosine"] == pytest.approx(1.0)
    distinct = torch.eye(5, 8) * 3
    d = attractor_stats(distinct)
    assert d["attractor_distance"] == pytest.approx(3 * math.sqrt(2))
    assert d["attractor_cosine"] == pytest.approx(0.0, abs=1e-6)


def test_diagnostics_report_identity_and_contraction():
    torch.manual_seed(0)
    upd = build_context_updater(ContextConfig(updater="gated", context_dim=8, num_layers=1, hidden_dim=8), 8)
    emb = build_embedding(30, {"embed_dim": 8}, 8)
    d = cvfp_diagnostics(upd, emb, torch.arange(10), max_iter=50, tol=1e-3)
    assert set(d) >= {"identity_cosine", "fixed_point_rms", "attractor_distance", "contraction_mean"}
    assert -1.0 <= d["identity_cosine"] <= 1.0
    assert d["fixed_point_rms"] == pytest.approx(1.0, abs=0.05)  # LayerNorm output, not a zero solution
    assert d["contraction_max"] > 0
