"""Unit tests of the shared CVFP core: measures, losses, updaters, solvers, metrics."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.diagnostics import attractor_stats, cvfp_diagnostics
from cvfp_lightning.errors import CVFPUserError
from cvfp_lightning.losses import cyclic_convergence_loss, diversity_loss, diversity_surrogate, spread
from cvfp_lightning.metrics import ConvergenceRate, EffectiveRank, effective_rank
from cvfp_lightning.models import ContextConfig, ContextUpdater, build_context_updater, build_embedding, unroll
from cvfp_lightning.models.layers import ConcatLinear
from cvfp_lightning.sequential_pass import sequential_pass, shifted_inputs
from cvfp_lightning.solvers import anderson, fixed_point_iter, jacobian_spectral_norm, per_dim_mse

PKG = Path(__file__).resolve().parents[2] / "cvfp_lightning"


def test_mse_not_l2_is_the_convergence_measure():
    # the seeds' bug: 256 dims each off by 0.1 -> MSE 0.01 (converged at 0.03) but L2 1.6
    a, b = torch.zeros(1, 256), torch.full((1, 256), 0.1)
    assert per_dim_mse(a, b).item() == pytest.approx(0.01)
    assert torch.linalg.vector_norm(a - b).item() == pytest.approx(1.6)
    rate = ConvergenceRate(0.03)
    rate.update(per_dim_mse(a, b))
    rate.update(torch.tensor([0.5, 0.01, 0.029, 0.03]))
    assert rate.compute().item() == pytest.approx(3 / 5)  # 0.01, 0.01, 0.029 < 0.03; 0.5 and 0.03 are not


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


def test_one_token_shift_and_sequence_starts():
    seqs = TokenSequences.from_lists([[5, 6, 7], [8, 9]])
    assert seqs.is_start().tolist() == [True, False, False, True, False]
    assert seqs.targets().tolist() == [6, 7, -100, 9, -100]
    contexts = torch.arange(5.0).unsqueeze(-1).repeat(1, 2)  # row i = (i, i)
    pos = torch.tensor([0, 1, 2, 3, 4])
    inp = shifted_inputs(contexts, pos, seqs.is_start()[pos])
    assert inp[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0, 3.0]  # start -> 0, else contexts[i - 1]


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


def test_cyclic_loss_of_a_hand_built_sequence():
    # period-2 sequence a b a b: cycle 2 is exact, cycle 1 is off by |a - b|^2 per dim
    a, b = torch.zeros(3), torch.full((3,), 2.0)
    ctx = torch.stack([a, b, a, b]).unsqueeze(0)
    assert cyclic_convergence_loss(ctx, 2).item() == 0.0
    assert cyclic_convergence_loss(ctx, 1).item() == pytest.approx(4.0)
    assert per_dim_mse(ctx[0, 1:], ctx[0, :-1]).mean().item() == pytest.approx(4.0)


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


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_concat_linear_is_a_linear_over_the_concatenation(shape):
    torch.manual_seed(0)
    lin = ConcatLinear(state_dim=6, input_dim=4, out_dim=5)
    x = torch.randn(*shape, 6, requires_grad=True)
    u = torch.randn(*shape, 4)  # frozen input: no gradient wanted
    w = torch.cat([lin.state.weight, lin.input.weight], dim=1)  # W over [x; u]
    x_ref = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(torch.cat([x_ref, u], -1), w, lin.input.bias)
    out = lin(x, lin.input_term(u))
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert lin.state.weight.grad.shape == (5, 6) and lin.input.bias.grad.shape == (5,)
    assert u.grad is None


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


def test_sequential_pass_matches_unroll_and_batches_sequences():
    torch.manual_seed(0)
    upd = build_context_updater(ContextConfig(context_dim=8, num_layers=2), 8)
    emb = build_embedding(20, {"embed_dim": 8}, 8)
    seqs = TokenSequences.from_lists([[1, 2, 3, 4], [5, 6], [7, 8, 9]])
    ctx = sequential_pass(upd, emb, seqs, batch_size=2)
    for s in range(3):
        ids = seqs.sequence(s)
        ref = unroll(upd, emb(ids).unsqueeze(0))[0]
        torch.testing.assert_close(ctx[seqs.offsets[s]:seqs.offsets[s + 1]], ref)
    # two "ranks" together give the whole pass
    parts = sum(sequential_pass(upd, emb, seqs, batch_size=2, rank=r, world_size=2) for r in range(2))
    torch.testing.assert_close(parts, ctx)
    ctx_all, layers = sequential_pass(upd, emb, seqs, return_all_layers=True)
    torch.testing.assert_close(layers[-1], ctx_all)


def test_sequential_pass_computes_no_padding_steps(monkeypatch):
    """Sequences of many lengths (and an empty one), small blocks: every position is computed
    once, from its own sequence's history, and ended sequences leave the batch."""
    import cvfp_lightning.sequential_pass as passes

    torch.manual_seed(0)
    upd = build_context_updater(ContextConfig(context_dim=8, num_layers=2), 8)
    emb = build_embedding(30, {"embed_dim": 8}, 8)
    lists = [[1, 2, 3, 4, 5, 6, 7], [], [8, 9], [10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20, 21, 22, 23, 24]]
    seqs = TokenSequences.from_lists(lists)
    rows = []
    step = type(upd).update_context_one_step

    def counting_step(self, context, *args, **kwargs):
        rows.append(context.shape[0])
        return step(self, context, *args, **kwargs)

    monkeypatch.setattr(passes, "MAX_BLOCK", 3)
    monkeypatch.setattr(type(upd), "update_context_one_step", counting_step)
    ctx, layers = sequential_pass(upd, emb, seqs, batch_size=4, return_all_layers=True)
    assert sum(rows) == seqs.num_tokens  # one update per real position, none for padding
    monkeypatch.undo()
    for s, ids in enumerate(lists):
        if ids:
            ref, ref_layers = unroll(upd, emb(torch.tensor([ids])), return_all_layers=True)
            a, b = int(seqs.offsets[s]), int(seqs.offsets[s + 1])
            torch.testing.assert_close(ctx[a:b], ref[0])
            for got, want in zip(layers, ref_layers):
                torch.testing.assert_close(got[a:b], want[0])


def test_token_sequences_concat_keeps_every_sequence():
    a = TokenSequences.from_lists([[1, 2], [3]], num_bytes=5)
    b = TokenSequences.from_lists([[4, 5, 6], [], [7]], num_bytes=4)
    both = TokenSequences.concat([a, b])
    assert both.ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert [both.sequence(s).tolist() for s in range(both.num_sequences)] == [[1, 2], [3], [4, 5, 6], [], [7]]
    assert both.num_bytes == 9


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


def test_adam_is_fused_where_torch_has_the_kernel_and_matches_the_plain_update():
    from cvfp_lightning.optim import adam

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(50, 7))
    q = torch.nn.Parameter(p.detach().clone())
    fused, plain = adam([p], lr=1e-2), torch.optim.Adam([q], lr=1e-2)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(5):
        g = torch.randn(50, 7)
        p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    torch.testing.assert_close(p, q)
    assert not adam([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=1e-2).defaults["fused"]

    class MixedTrainer:  # Lightning's AMP plugin cannot clip the gradients of a fused optimizer
        precision = "bf16-mixed"

    assert not adam([torch.nn.Parameter(torch.zeros(3))], lr=1e-2, trainer=MixedTrainer()).defaults["fused"]
