"""Phase 2 token block: turns a position's per-layer contexts and its token into a vector.

Per layer ``l = 1..L`` (one per context layer):

    t_0 = e
    t_l = LN(t_{l-1} + ReLU(W_l [c_l; t_{l-1}] + b_l))

``e (..., E)`` is the token's embedding, ``c_l (..., d_l)`` the output of context layer l
at the same position (``ContextUpdater.layer_dims``), and every ``t_l`` is ``(..., E)``
wide, so the output can feed a head tied to the embedding matrix.

With a history of K > 0 ids (``history``), ``t_0`` also reads the embeddings ``h_1 .. h_K`` of
the K ids before the position (``h_j = 0`` where the sequence has no j-th id before it):

    t_0 = LN(e + ReLU(W_0 [e; h_1; ..; h_K] + b_0))

an explicit short-range input next to the contexts, which carry the whole history but
(frozen, fitted to their fixed points, not to prediction) keep the exact recent ids only
loosely. K = 0 is the seed documents' token block.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cvfp_lightning.errors import check, check_positive
from cvfp_lightning.models.layers import ConcatLinear


class TokenBlock(nn.Module):
    """``([c_1 .. c_L], e) -> t_L``: contexts ``(..., d_l)`` each, ``e (..., E)`` -> ``(..., E)``.

    Args:
        context_dims: ``[d_1, ..., d_L]``, the widths of the context layers.
        embed_dim: E, the width of the token embedding and of every ``t_l``.
        history: K, the ids before the position whose embeddings ``t_0`` reads (0: none).
    """

    def __init__(self, context_dims: list[int], embed_dim: int, history: int = 0):
        super().__init__()
        check(len(context_dims) > 0, "the token block needs at least one context layer.")
        check_positive("embed_dim", embed_dim)
        check(isinstance(history, int) and not isinstance(history, bool) and history >= 0,
              f"model.token_history={history!r} is invalid: expected a whole number >= 0 (0: no history).")
        self.context_dims, self.embed_dim, self.history = list(context_dims), embed_dim, history
        # W_0 [e; h_1..h_K] + b_0 as W_e e + (W_h [h_1..h_K] + b_0)
        self.history_linear = ConcatLinear(embed_dim, history * embed_dim, embed_dim) if history else None
        self.history_norm = nn.LayerNorm(embed_dim) if history else None
        # W_l [c_l; t] + b_l as W_t t + (W_c c_l + b_l): no gradient is computed for the frozen contexts
        self.linears = nn.ModuleList([ConcatLinear(embed_dim, d, embed_dim) for d in context_dims])
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in context_dims])

    def legacy_renames(self) -> dict[str, tuple[str, str | None]]:
        """Checkpoints before ConcatLinear: ``linears[l]`` was one Linear over ``[c_l; t]``."""
        return {f"linears.{l}": (f"linears.{l}", "input_first") for l in range(self.num_layers)}

    @property
    def num_layers(self) -> int:
        return len(self.linears)

    def forward(self, contexts: list[Tensor], token_embed: Tensor, history_embeds: Tensor | None = None) -> Tensor:
        """``[c_l (..., d_l)], e (..., E)``, with a history ``h (..., K, E)`` -> ``t_L (..., E)``."""
        if len(contexts) != self.num_layers:
            raise ValueError(f"TokenBlock got {len(contexts)} context layers, expected {self.num_layers}.")
        t = token_embed  # (..., E)
        if self.history_linear is not None:
            if history_embeds is None or history_embeds.shape[-2:] != (self.history, self.embed_dim):
                raise ValueError(f"TokenBlock reads a history of {self.history} embeddings of width {self.embed_dim}, "
                                 f"got {None if history_embeds is None else tuple(history_embeds.shape)}.")
            term = self.history_linear.input_term(history_embeds.flatten(-2).to(t.dtype))  # (..., E)
            t = self.history_norm(t + F.relu(self.history_linear(t, term)))
        for c, lin, norm in zip(contexts, self.linears, self.norms):
            t = norm(t + F.relu(lin(t, lin.input_term(c.to(t.dtype)))))  # (..., E)
        return t
