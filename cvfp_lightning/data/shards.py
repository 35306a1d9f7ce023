"""Which positions each DDP rank owns: contiguous, token-balanced shards of a split.

A split of N positions in S sequences (CSR ``offsets``, ``(S + 1,)``) is cut into W
contiguous global ranges ``[bounds[r], bounds[r + 1])``, one per rank:

- ``whole_sequences`` (per-sample sequences): every cut falls on a sequence start, the one
  nearest to ``k N / W``, so a rank's token count is as close to ``N / W`` as the sequence
  lengths allow (at most one sequence's length away) and no sequence is split;
- otherwise (a stream, S = 1 or a few long sequences): at ``k N / W`` exactly; a rank whose
  range starts inside a sequence continues the context of the rank before it (one row
  handed over, O(D) per rank).

Everything is a function of ``offsets`` and W, so every rank computes every shard without
communication. Memory: ``(W + 1,)`` int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import IterableDataset


def shard_bounds(offsets: Tensor, world_size: int, whole_sequences: bool) -> Tensor:
    """``(W + 1,)`` int64 global positions: rank r owns ``[bounds[r], bounds[r + 1])`` (see module doc)."""
    offsets = torch.as_tensor(offsets, dtype=torch.long)
    n, w = int(offsets[-1]), int(world_size)
    ideal = torch.div(torch.arange(w + 1, dtype=torch.long) * n, w, rounding_mode="floor")
    if not whole_sequences:
        return ideal
    starts = torch.unique(offsets)  # sequence starts and N (empty sequences collapse)
    right = torch.searchsorted(starts, ideal).clamp(max=starts.numel() - 1)
    left = (right - 1).clamp(min=0)
    nearer_left = (ideal - starts[left]) <= (starts[right] - ideal)
    bounds = torch.where(nearer_left, starts[left], starts[right])
    bounds[0], bounds[-1] = 0, n
    return torch.cummax(bounds, dim=0).values


@dataclass(frozen=True)
class Shard:
    """The global positions ``[start, stop)`` that rank ``rank`` of ``world_size`` owns.

    ``continues``: ``start`` lies inside a sequence (not at its first position), so the
    input context of position ``start`` is the last context of the rank before.
    ``chained``: the split is cut inside its sequences over several ranks (a stream), so
    the ranks hand contexts on in turn; the same on every rank.
    """

    rank: int
    world_size: int
    start: int
    stop: int
    continues: bool
    chained: bool = False

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start

    @classmethod
    def of(cls, offsets: Tensor, rank: int, world_size: int, whole_sequences: bool) -> "Shard":
        bounds = shard_bounds(offsets, world_size, whole_sequences)
        start, stop = int(bounds[rank]), int(bounds[rank + 1])
        starts = torch.as_tensor(offsets, dtype=torch.long)
        continues = 0 < start < int(starts[-1]) and not bool((starts == start).any())
        return cls(rank, world_size, start, stop, continues, chained=not whole_sequences and world_size > 1)

    @classmethod
    def whole(cls, num_tokens: int) -> "Shard":
        """One process owns everything."""
        return cls(0, 1, 0, int(num_tokens), False)


def chunk_count(start: int, stop: int, chunk_size: int) -> int:
    """Chunks of the global grid of ``chunk_size`` that meet ``[start, stop)``."""
    return -(-stop // chunk_size) - start // chunk_size if stop > start else 0


def chunk_grid(shard: Shard, chunk_size: int, bounds: Tensor) -> tuple[list[tuple[int, int]], int]:
    """The chunks of ``shard`` on the global grid of ``chunk_size``, and the most any rank has.

    Chunk boundaries are multiples of ``chunk_size`` in global positions (so a chunk's
    position-keyed randomness is the same for any W), cut at the shard's ends. Returns
    ``([(start, stop), ...], most)`` with ``most`` the largest chunk count of any rank
    (``bounds`` of :func:`shard_bounds`), at least 1: ranks with fewer chunks pad with
    empty ones, so all ranks run the same number of steps.
    """
    c = int(chunk_size)
    starts = range(shard.start // c * c, shard.stop, c) if shard.stop > shard.start else range(0)
    chunks = [(max(a, shard.start), min(a + c, shard.stop)) for a in starts]
    most = max(chunk_count(int(bounds[r]), int(bounds[r + 1]), c) for r in range(bounds.numel() - 1))
    return chunks, max(most, 1)


def shard_view(seqs, rank: int, world_size: int):
    """``(shard, view)``: rank ``rank``'s :class:`Shard` of a split and its sequences as a view.

    A split of several sequences is cut at sequence starts (:func:`shard_bounds` with
    ``whole_sequences``); a single stream anywhere, its pieces continuing one another.
    ``seqs`` is a :class:`~cvfp_lightning.data.sequences.TokenSequences`.
    """
    whole = seqs.num_sequences > 1
    shard = Shard.of(seqs.offsets, rank, world_size, whole)
    if not whole:
        share = round(seqs.num_bytes * shard.num_tokens / seqs.num_tokens) if seqs.num_tokens else 0
        return shard, seqs.token_range(shard.start, shard.stop, share)
    lo, hi = (int(i) for i in torch.searchsorted(seqs.offsets, torch.tensor([shard.start, shard.stop])))
    return shard, seqs.select(lo, hi)


class ShardChunks(IterableDataset):
    """This rank's chunks of a split, in order, on the global grid: one position batch each.

    Rank ``rank`` of ``world_size`` reads its :func:`shard_view` only, in chunks of
    :func:`chunk_grid` (global positions in the batches), then empty batches until every
    rank has the same count. An ``IterableDataset``, so Lightning adds no sampler of its own:
    the ranks' order is this one. Holds nothing per token; a batch is O(chunk_size).
    """

    def __init__(self, seqs, chunk_size: int, rank: int = 0, world_size: int = 1):
        self.seqs, self.chunk_size = seqs, int(chunk_size)
        self.shard = Shard.of(seqs.offsets, rank, world_size, seqs.num_sequences > 1)
        bounds = shard_bounds(seqs.offsets, world_size, seqs.num_sequences > 1)
        self.chunks, self.length = chunk_grid(self.shard, self.chunk_size, bounds)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for a, b in self.chunks:
            yield self.seqs.position_batch(torch.arange(a, b))
        for _ in range(self.length - len(self.chunks)):
            yield self.seqs.position_batch(torch.zeros(0, dtype=torch.long))
