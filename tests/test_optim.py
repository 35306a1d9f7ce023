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
