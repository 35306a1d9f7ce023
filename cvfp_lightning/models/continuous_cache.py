"""Continuous cache: the next-id distribution mixed with what followed similar earlier positions.

Grave, Joulin & Usunier (2017), "Improving Neural Language Models with a Continuous Cache".
For position i of a text, with the model's distribution ``p_model(. | i)`` and key ``h_i``
(the vector the head reads, ``(E,)``), the memory ``M_i`` holds the earlier positions
``j`` with ``i - size <= j < i`` of the same text whose next id ``x_{j+1}`` is known:

    a_ij       = softmax_{j in M_i}(theta * cos(h_i, h_j))
    p_cache(w) = sum_{j in M_i} a_ij [x_{j+1} = w]
    p(w)       = (1 - weight) p_model(w) + weight p_cache(w)        (p = p_model where M_i is empty)

Positions count in the text as read: scoring a split, the positions of its stream of
sequences (the memory crosses sequence boundaries, so a paragraph recalls the ones before it
in the file); generating, the prompt and the ids generated so far. The cache has no trained
parameters: it is part of how a trained model reads text (validation, ``cvfp evaluate``,
generation), never of its training loss. Cost per scored position: ``size`` cosines and one
``(size,)`` softmax; what is kept: ``size`` keys ``(E,)`` and ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cvfp_lightning.errors import ConfigMixin, check


MAX_SIZE = 2 ** 62  # positions are int64
MAX_THETA = 1e6  # beyond it the attention is one-hot already; far beyond, theta * cos overflows float32


@dataclass
class ContinuousCache(ConfigMixin):
    """The cache's settings (see the module docstring).

    Args:
        size: positions kept, the last ``size`` before the scored one.
        theta: the sharpness of the attention over the memory (multiplies a cosine in [-1, 1]).
        weight: the cache's share ``weight`` of the mixture, in ``[0, 1)`` (0: the model alone).
    """

    _name = "continuous_cache"
    size: int = 4096
    theta: float = 14.0
    weight: float = 0.4

    def __post_init__(self) -> None:
        check(isinstance(self.size, int) and not isinstance(self.size, bool) and 0 < self.size <= MAX_SIZE,
              f"continuous_cache.size={self.size!r} is invalid: expected a whole number of positions in "
              f"[1, 2**62].")
        check(isinstance(self.theta, (int, float)) and not isinstance(self.theta, bool)
              and math.isfinite(self.theta) and 0 <= self.theta <= MAX_THETA,
              f"continuous_cache.theta={self.theta!r} is invalid: expected a number in [0, {MAX_THETA:g}] "
              "(it multiplies a cosine in float32).")
        check(isinstance(self.weight, (int, float)) and not isinstance(self.weight, bool) and 0 <= self.weight < 1,
              f"continuous_cache.weight={self.weight!r} is invalid: expected a value in [0, 1) (0: no cache).")
        self.theta, self.weight = float(self.theta) + 0.0, float(self.weight) + 0.0  # -0.0 reads as 0

    @classmethod
    def from_option(cls, value) -> "ContinuousCache | None":
        """None (no cache) for None, else :meth:`coerce` (an instance or a dict of its fields)."""
        return None if value is None else cls.coerce(value)

    def log_probs(self, logits: Tensor, keys: Tensor, positions: Tensor, memory_keys: Tensor, memory_next: Tensor,
                  memory_positions: Tensor) -> Tensor:
        """``log p`` of the mixture, ``(n, V)``.

        Args:
            logits: the model's ``(n, V)`` at the scored positions.
            keys: their keys ``h_i``, ``(n, E)``.
            positions: their positions in the text, ``(n,)``.
            memory_keys: the keys of the candidate memory rows, ``(m, E)`` (may include the
                scored positions themselves: a row counts for position i only when it lies in
                ``[i - size, i)``).
            memory_next: the id after each memory row, ``(m,)``; negative: unknown (not in the memory).
            memory_positions: their positions, ``(m,)``.
        """
        with torch.autocast(logits.device.type, enabled=False):  # float32 under bf16-mixed too
            return self._log_probs(logits.float(), keys.float(), positions, memory_keys.float(), memory_next,
                                   memory_positions)

    def _log_probs(self, logits: Tensor, keys: Tensor, positions: Tensor, memory_keys: Tensor, memory_next: Tensor,
                   memory_positions: Tensor) -> Tensor:
        log_model = torch.log_softmax(logits, dim=-1)  # (n, V)
        if self.weight == 0 or memory_keys.shape[0] == 0 or logits.shape[0] == 0:
            return log_model
        distance = positions.reshape(-1, 1) - memory_positions.reshape(1, -1)  # (n, m)
        inside = (distance >= 1) & (distance <= self.size) & (memory_next.reshape(1, -1) >= 0)
        has_memory = inside.any(dim=1, keepdim=True)  # (n, 1)
        scores = self.theta * (F.normalize(keys, dim=-1) @ F.normalize(memory_keys, dim=-1).T)
        attention = torch.softmax(scores.masked_fill(~inside, -math.inf).masked_fill(~has_memory, 0.0), dim=1)
        attention = attention * has_memory  # rows without memory: no cache
        cache = torch.zeros_like(log_model).scatter_add_(
            1, memory_next.clamp(min=0).reshape(1, -1).expand_as(attention), attention)  # (n, V) p_cache
        mixed = torch.logaddexp(log_model + math.log1p(-self.weight), cache.log() + math.log(self.weight))
        return torch.where(has_memory, mixed, log_model)
