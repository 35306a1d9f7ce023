"""Ordinary language models to compare CVFP against, sized to a trainable-parameter budget.

All map ``ids (B, T) -> logits (B, T, V)`` and are causal (position t sees ids 0..t):

``gru`` / ``lstm``
    ``Embedding(V, d) -> GRU|LSTM(d, d, num_layers) -> Linear(d, V)``.
``transformer``
    token embedding + learned position embedding (``max_len`` positions), ``num_layers``
    pre-LN causal encoder layers (``d`` wide, ``num_heads`` heads, feed-forward ``4 d``,
    GELU), a final LayerNorm, ``Linear(d, V)``.

:func:`match_hidden_dim` picks the width ``d`` whose trainable parameter count is
closest to a target (the CVFP model's, so the comparison is at equal size); the counts are
taken from models built on the ``meta`` device (no memory, no formula to drift).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from cvfp_lightning.errors import CVFPUserError, check, check_positive

Arch = Literal["gru", "lstm", "transformer"]
ARCHS = ("gru", "lstm", "transformer")
MAX_HIDDEN = 16384


class RecurrentLM(nn.Module):
    """GRU or LSTM language model, ``(B, T) -> (B, T, V)``; the state starts at 0 per window."""

    def __init__(self, cell: Literal["gru", "lstm"], vocab_size: int, hidden_dim: int, num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        self.rnn = rnn(hidden_dim, hidden_dim, num_layers, batch_first=True,
                       dropout=dropout if num_layers > 1 else 0.0)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, ids: Tensor, state=None, return_state: bool = False):
        """``ids (B, T) -> logits (B, T, V)``; with ``return_state`` also the recurrent state after
        ``ids`` (``h (L, B, d)``, for an LSTM ``(h, c)``), which ``state`` continues from (generation)."""
        h, state = self.rnn(self.embed(ids), state)  # (B, T, d)
        logits = self.head(h)  # (B, T, V)
        return (logits, state) if return_state else logits


class TransformerLM(nn.Module):
    """Causal pre-LN Transformer language model, ``(B, T) -> (B, T, V)``, ``T <= max_len``."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int = 2, num_heads: int = 4,
                 max_len: int = 512, dropout: float = 0.0):
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        self.pos = nn.Embedding(max_len, hidden_dim)
        layer = nn.TransformerEncoderLayer(hidden_dim, num_heads, 4 * hidden_dim, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, ids: Tensor) -> Tensor:
        B, T = ids.shape
        if T > self.max_len:
            raise CVFPUserError(f"windows of {T} tokens exceed the transformer's max_len={self.max_len}: "
                                "set model.max_len >= data.seq_len.")
        x = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))  # (B, T, d)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device)
        x = self.encoder(x, mask=mask, is_causal=True)
        return self.head(self.norm(x))  # (B, T, V)


def build_baseline(arch: str, vocab_size: int, hidden_dim: int, num_layers: int = 1, num_heads: int = 4,
                   max_len: int = 512, dropout: float = 0.0) -> nn.Module:
    """The baseline ``arch`` (``gru`` | ``lstm`` | ``transformer``) of width ``hidden_dim``."""
    check(arch in ARCHS, f"model.arch={arch!r} is unknown: expected one of {', '.join(ARCHS)}.")
    for name, value in (("vocab_size", vocab_size), ("hidden_dim", hidden_dim), ("num_layers", num_layers),
                        ("num_heads", num_heads), ("max_len", max_len)):
        check_positive(f"model.{name}", value)
    if arch == "transformer":
        check(hidden_dim % num_heads == 0,
              f"model.hidden_dim={hidden_dim} is not a multiple of model.num_heads={num_heads}.")
        return TransformerLM(vocab_size, hidden_dim, num_layers, num_heads, max_len, dropout)
    return RecurrentLM(arch, vocab_size, hidden_dim, num_layers, dropout)


def count_trainable(module: nn.Module) -> int:
    """Trainable parameters of ``module`` (shared tensors counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def match_hidden_dim(arch: str, vocab_size: int, target: int, num_layers: int = 1, num_heads: int = 4,
                     max_len: int = 512) -> int:
    """Width ``d`` whose model has the trainable parameter count closest to ``target``.

    Transformer widths are multiples of ``num_heads``. Counts grow with ``d``, so a binary
    search over ``d`` finds the nearest one.
    """
    step = num_heads if arch == "transformer" else 1

    def count(k: int) -> int:
        with torch.device("meta"):
            return count_trainable(build_baseline(arch, vocab_size, k * step, num_layers, num_heads, max_len))

    smallest = count(1)
    check(target >= smallest,
          f"model.match_params={target} is below the smallest {arch} baseline ({smallest} trainable parameters "
          f"with vocabulary {vocab_size}): raise it or set hidden_dim instead.")
    lo, hi = 1, MAX_HIDDEN // step
    check(count(hi) >= target, f"model.match_params={target} needs a {arch} wider than {MAX_HIDDEN}: lower it.")
    while hi - lo > 1:  # invariant: count(lo) <= target <= count(hi)
        mid = (lo + hi) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda k: abs(count(k) - target))
    return best * step
