"""The optimizer (cvfp_lightning.optim): fused Adam where torch has the kernel."""

from __future__ import annotations

import torch


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


def test_weight_decay_is_adamw_on_the_matrices_only_and_matches_the_plain_update():
    from cvfp_lightning.optim import adam

    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6))
    w2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    ours = adam([w, b], lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW([{"params": [w2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}], lr=1e-2)
    assert isinstance(ours, torch.optim.AdamW) and ours.defaults["fused"] is True
    assert [(len(g["params"]), g["weight_decay"]) for g in ours.param_groups] == [(1, 0.1), (1, 0.0)]
    for _ in range(5):
        gw, gb = torch.randn(6, 4), torch.randn(6)
        w.grad, b.grad, w2.grad, b2.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        ours.step()
        plain.step()
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(b, b2)
    # a zero gradient still shrinks a decayed matrix by lr * wd per step (decoupled), never a bias
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    before_w, before_b = w.detach().clone(), b.detach().clone()
    fresh = adam([w, b], lr=1e-2, weight_decay=0.1)
    fresh.step()
    torch.testing.assert_close(w.detach(), before_w * (1 - 1e-2 * 0.1))
    torch.testing.assert_close(b.detach(), before_b)
    # parameter groups keep their own learning rates, each split by dims
    groups = adam([{"params": [w], "lr": 1e-3}, {"params": [b], "lr": 1e-4}], lr=1e-2, weight_decay=0.5)
    assert [(g["lr"], g["weight_decay"]) for g in groups.param_groups] == [(1e-3, 0.5), (1e-4, 0.0)]
    assert type(adam([w, b], lr=1e-2)) is torch.optim.Adam  # no decay: Adam, as before
