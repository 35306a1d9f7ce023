"""Layers (cvfp_lightning.models.layers): ConcatLinear is one Linear over the concatenation."""

from __future__ import annotations

import pytest
import torch

from cvfp_lightning.models.layers import ConcatLinear


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
