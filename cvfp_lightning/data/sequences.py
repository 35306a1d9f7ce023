"""Token sequences and the batches built from them.

``TokenSequences`` holds S sequences as one flat id tensor plus offsets (a CSR layout):
sequence s is ``ids[offsets[s]:offsets[s+1]]``. A "stream" is the special case S = 1 (the
seed documents' concatenation of all samples).

Two batch layouts, both plain dicts of tensors:

- position batches (Phase 1, Phase 2, from :class:`PositionChunks` or a shuffled
  position loader): ``positions (n,)`` flat indices, ``ids (n,)``, ``is_start (n,)`` (the
  position begins a sequence, so its input context is the initial one), ``targets (n,)``
  the next id in the same sequence or -100 at a sequence's last position.
- windows (baselines, repetition): ``input_ids (B, T)``, ``targets (B, T)`` (-100 pads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

IGNORE_INDEX = -100


@dataclass
class TokenSequences:
    """S sequences in CSR layout.

    Attributes:
        ids: ``(N,)`` int64 token ids of all sequences back to back.
        offsets: ``(S + 1,)`` int64, ``offsets[0] = 0``, ``offsets[-1] = N``.
        num_bytes: UTF-8 bytes of the text these ids encode (for bits per byte).
    """

    ids: Tensor
    offsets: Tensor
    num_bytes: int = 0

    def __post_init__(self) -> None:
        self.ids = self.ids.long()
        self.offsets = self.offsets.long()
        assert self.offsets[0] == 0 and self.offsets[-1] == self.ids.numel(), "offsets must span ids"

    @classmethod
    def from_lists(cls, seqs: list[list[int]] | list[Tensor], num_bytes: int = 0) -> "TokenSequences":
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs]) if seqs else torch.zeros(0, dtype=torch.long)
        return cls(ids, offsets, num_bytes)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def sequence(self, s: int) -> Tensor:
        return self.ids[self.offsets[s]:self.offsets[s + 1]]

    def is_start(self) -> Tensor:
        """``(N,)`` bool: True where a sequence begins."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        starts = self.offsets[:-1][self.lengths > 0]
        mask[starts] = True
        return mask

    def targets(self) -> Tensor:
        """``(N,)`` next id within the same sequence, -100 at each sequence's last position."""
        t = torch.full_like(self.ids, IGNORE_INDEX)
        if self.num_tokens > 1:
            t[:-1] = self.ids[1:]
        ends = self.offsets[1:][self.lengths > 0] - 1
        t[ends] = IGNORE_INDEX
        return t

    @classmethod
    def concat(cls, parts: list["TokenSequences"]) -> "TokenSequences":
        """The sequences of all ``parts`` in order (positions of part k follow those of part k-1)."""
        ids = torch.cat([p.ids for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
        offsets, base = [torch.zeros(1, dtype=torch.long)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += p.num_tokens
        return cls(ids, torch.cat(offsets), sum(p.num_bytes for p in parts))

    def as_stream(self) -> "TokenSequences":
        """All sequences concatenated into one (S = 1)."""
        return TokenSequences(self.ids, torch.tensor([0, self.num_tokens]), self.num_bytes)

    def split_long(self, max_len: int) -> "TokenSequences":
        """Split every sequence longer than ``max_len`` into consecutive pieces."""
        pieces = []
        for s in range(self.num_sequences):
            seq = self.sequence(s)
            pieces += [seq[i:i + max_len] for i in range(0, max(len(seq), 1), max_len)] if len(seq) else []
        return TokenSequences.from_lists(pieces, self.num_bytes)

    def padded(self, order: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sequences (in ``order``) right-padded to ``(S, T_max)``; returns (ids, lengths)."""
        order = torch.arange(self.num_sequences) if order is None else order
        lengths = self.lengths[order]
        T = int(lengths.max()) if lengths.numel() else 0
        out = torch.zeros(len(order), T, dtype=torch.long)
        for row, s in enumerate(order.tolist()):
            seq = self.sequence(s)
            out[row, :len(seq)] = seq
        return out, lengths


class PositionCollate:
    """Turn a ``(n,)`` tensor (or list) of flat positions into a position batch."""

    def __init__(self, seqs: TokenSequences):
        self.ids = seqs.ids
        self.is_start = seqs.is_start()
        self.targets = seqs.targets()

    def __call__(self, positions) -> dict[str, Tensor]:
        if not isinstance(positions, Tensor):
            positions = torch.as_tensor(positions, dtype=torch.long)
        positions = positions.long()
        return {"positions": positions, "ids": self.ids[positions], "is_start": self.is_start[positions],
                "targets": self.targets[positions]}


class PositionChunks(Dataset):
    """Contiguous chunks of ``chunk_size`` positions, in order, each item one batch.

    The number of items is padded with empty chunks up to a multiple of ``world_size`` so
    that a DistributedSampler (shuffle off) gives every rank the same number of batches
    without duplicating any position: every position is seen exactly once per epoch.
    """

    def __init__(self, seqs: TokenSequences, chunk_size: int, world_size: int = 1):
        self.collate = PositionCollate(seqs)
        self.n = seqs.num_tokens
        self.chunk_size = int(chunk_size)
        real = -(-self.n // self.chunk_size)
        self.num_real = real
        self.length = -(-real // world_size) * world_size if real else world_size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        start = min(k * self.chunk_size, self.n)
        stop = min(start + self.chunk_size, self.n) if k < self.num_real else start
        return self.collate(torch.arange(start, stop))


class PositionIndex(Dataset):
    """Map-style dataset of single positions (for shuffled position loaders)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> int:
        return k


class Windows(Dataset):
    """Fixed windows of ``seq_len`` inputs with next-id targets, never crossing sequences.

    Each sequence is cut into consecutive windows; the targets of a window are the next ids
    in the same sequence (-100 past its end); short windows are right-padded with id 0.
    ``pad_to_multiple`` appends empty windows (no targets) up to a multiple of it, so that
    evaluation sharded over that many ranks counts every token exactly once.
    """

    def __init__(self, seqs: TokenSequences, seq_len: int, pad_to_multiple: int = 1):
        self.seq_len = int(seq_len)
        self.ids, self.tgt = seqs.ids, seqs.targets()
        self.items: list[tuple[int, int]] = []
        for s in range(seqs.num_sequences):
            a, b = int(seqs.offsets[s]), int(seqs.offsets[s + 1])
            self.items += [(i, min(i + self.seq_len, b)) for i in range(a, b, self.seq_len)]
        # empty windows (all targets -100) so a DistributedSampler needs no duplicates
        self.items += [(0, 0)] * (-len(self.items) % max(1, pad_to_multiple))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        a, b = self.items[k]
        inp = torch.zeros(self.seq_len, dtype=torch.long)
        tgt = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        inp[: b - a] = self.ids[a:b]
        tgt[: b - a] = self.tgt[a:b]
        return {"input_ids": inp, "targets": tgt}


class EpochShuffleSampler(Sampler[int]):
    """A random order of ``range(n)`` that depends on (seed, epoch) only.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint
    draws the same order for its next epoch as the uninterrupted run (a plain
    ``shuffle=True`` draws from the global RNG, whose state a checkpoint does not hold).
    The seed defaults to ``torch.initial_seed()``, i.e. the run's ``seed_everything``.
    """

    def __init__(self, n: int, seed: int | None = None):
        self.n = int(n)
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
