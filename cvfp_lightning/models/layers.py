"""``ConcatLinear``: a Linear over the concatenation ``[x; u]``, stored as two blocks.

Every layer of the CVFP blocks multiplies a concatenation of a changing state ``x`` (the
context, or the Phase 2 token vector) and an input ``u`` that is fixed per position (the
token embedding, or the Phase 1 context of that layer):

    W [x; u] + b  =  W_x x + (W_u u + b)

Keeping the two blocks apart is the same function with three gains over
``Linear(torch.cat([x, u]))``: the input's share ``W_u u + b`` can be computed once for many
positions or steps (:meth:`ConcatLinear.input_term`) and reused, so a sequential step reads
only ``W_x``; no concatenated copy is made; and backward never computes the gradient of a
frozen input (a frozen embedding, fixed contexts), which ``cat`` would compute and discard.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConcatLinear(nn.Module):
    """``(x (..., state_dim), u (..., input_dim)) -> W_x x + W_u u + b  (..., out_dim)``.

    Args:
        state_dim: width of the changing part ``x``.
        input_dim: width of the per-position input ``u``.
        out_dim: output width.
        bias: add ``b`` (it belongs to the input's share).
    """

    def __init__(self, state_dim: int, input_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.state = nn.Linear(state_dim, out_dim, bias=False)  # W_x
        self.input = nn.Linear(input_dim, out_dim, bias=bias)  # W_u, b
        self.out_features = out_dim

    def input_term(self, u: Tensor) -> Tensor:
        """The input's share ``W_u u + b``: ``(..., input_dim) -> (..., out_dim)``."""
        return self.input(u)

    def forward(self, x: Tensor, term: Tensor) -> Tensor:
        """``W_x x + term`` with ``term = input_term(u)``; one fused ``addmm`` for 2-D ``x``."""
        if x.dim() == 2 and term.shape == (x.shape[0], self.out_features):
            return torch.addmm(term, x, self.state.weight.t())
        return term + F.linear(x, self.state.weight)
