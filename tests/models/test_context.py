"""The context updaters (cvfp_lightning.models.context): shapes and widths, the simple updater, bad
configs, and the one update function that every caller goes through."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.diagnostics import cvfp_diagnostics
from cvfp_lightning.errors import CVFPUserError
from cvfp_lightning.models import ContextConfig, ContextUpdater, build_context_updater, build_embedding, unroll
from cvfp_lightning.sequential_pass import sequential_pass

PKG = Path(__file__).resolve().parents[2] / "cvfp_lightning"


@pytest.mark.parametrize("cfg, layer_dims", [
    (dict(updater="residual", context_dim=16, num_layers=3, token_input_all_layers=True), [16, 16, 16]),
    (dict(updater="residual", context_dim=16, num_layers=4, token_input_all_layers=False), [28, 24, 20, 16]),
    (dict(updater="gated", context_dim=16, num_layers=2, hidden_dim=24, stacking="sequential"), [16]),
    (dict(updater="gated", context_dim=16, num_layers=2, hidden_dim=24, stacking="layerwise"), [16, 16]),
    (dict(updater="simple", context_dim=16, num_layers=2, hidden_dim=24), [16]),
])
def test_updater_shapes(cfg, layer_dims):
    upd = build_context_updater(ContextConfig(**cfg), embed_dim=16)
    assert upd.layer_dims == layer_dims
    c, e = torch.randn(5, 7, 16), torch.randn(5, 7, 16)
    out, layers = upd.update_context_one_step(c, e, return_all_layers=True)
    assert out.shape == (5, 7, 16)
    assert [tuple(t.shape) for t in layers] == [(5, 7, d) for d in layer_dims]
    assert torch.equal(layers[-1], out)
    # precomputed token terms (the sequential pass's fast path) give the same function
    fast, fast_layers = upd.update_context_one_step(c, e, True, upd.token_terms(e))
    torch.testing.assert_close(fast, out)
    for a, b in zip(fast_layers, layers):
        torch.testing.assert_close(a, b)
    assert sum(t.shape[-1] for t in upd.token_terms(e)) == upd.token_terms_width()
    ctx = unroll(upd, torch.randn(2, 6, 16))
    assert ctx.shape == (2, 6, 16)
    # unroll is the repeated one-step update
    step = upd.update_context_one_step(ctx[:, 2], torch.zeros(2, 16))
    assert step.shape == (2, 16)


def test_residual_false_widths_shrink_arithmetically():
    upd = build_context_updater(ContextConfig(context_dim=768, num_layers=6, token_input_all_layers=False), 768)
    assert upd.layer_dims == [1408, 1280, 1152, 1024, 896, 768]


def test_simple_updater_is_clamped_and_normalised():
    upd = build_context_updater(ContextConfig(updater="simple", context_dim=8, num_layers=1, hidden_dim=8), 8)
    out = upd.update_context_one_step(torch.randn(4, 8) * 100, torch.randn(4, 8))
    assert out.abs().max() <= 10.0
    assert out.mean(-1).abs().max() < 1e-5


@pytest.mark.parametrize("bad", [dict(context_dim=0), dict(num_layers=-1), dict(updater="lstm"),
                                 dict(stacking="diagonal"), dict(context_dim=2.5)])
def test_bad_context_config_is_a_user_error(bad):
    with pytest.raises(CVFPUserError):
        ContextConfig(**bad)


class _Counting:
    def __init__(self):
        self.calls = 0


def test_one_update_function_serves_every_caller(monkeypatch):
    """sequential pass, fixed-point solver, diagnostics and unroll all go through it."""
    counter = _Counting()
    original = ContextUpdater.update_context_one_step

    def counted(self, *args, **kwargs):
        counter.calls += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ContextUpdater, "update_context_one_step", counted)
    upd = build_context_updater(ContextConfig(context_dim=8, num_layers=1), 8)
    emb = build_embedding(10, {"embed_dim": 8}, 8)
    seqs = TokenSequences.from_lists([[1, 2, 3]])
    for run in (lambda: sequential_pass(upd, emb, seqs), lambda: unroll(upd, torch.randn(1, 3, 8)),
                lambda: cvfp_diagnostics(upd, emb, torch.arange(4), max_iter=3, power_iters=2)):
        before = counter.calls
        run()
        assert counter.calls > before


def test_no_module_bypasses_the_update_function():
    """Only models/context.py may call an updater's private layer stack."""
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if p.name != "context.py" and re.search(r"\._layers\(", p.read_text())]
    assert offenders == []
