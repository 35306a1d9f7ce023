"""Token sequences and the batches built from them.

``TokenSequences`` holds S sequences as one flat id tensor plus offsets (a CSR layout):
sequence s is ``token_ids[offsets[s]:offsets[s+1]]``. A "stream" is the special case S = 1
(the seed documents' concatenation of all samples). Splits and arrangements (train /
validation / test, stream, samples, pieces of ``max_seq_len``) are views of one
memory-mapped id array with their own offsets, never copies of the ids.

Two batch layouts, both plain dicts of tensors, computed per batch from the ids and the
offsets (nothing of size N is precomputed):

- position batches (Phase 1, Phase 2, from :class:`PositionChunks` or a shuffled
  position loader): ``positions (n,)`` flat indices, ``ids (n,)``, ``is_start (n,)`` (the
  position begins a sequence, so its input context is the initial one), ``targets (n,)``
  the next id in the same sequence or -100 at a sequence's last position; with a history of
  K ids (Phase 2's ``token_history``) also ``history (n, K)``: the ids at positions - 1 .. - K,
  -1 where that position lies before the sequence's start.
- windows (baselines, repetition): ``input_ids (B, T)``, ``targets (B, T)`` (-100 pads).

Memory per rank, N tokens in S sequences (W windows): ids 0 B/token of anonymous memory
when memory-mapped (2 or 4 B/token of page cache once read), offsets 8 B per sequence,
:class:`Windows` 16 B per window, :class:`EpochShuffleSampler` 4 B/token during an epoch
(its permutation); a batch of n positions is O(n) (with a history of K ids, 8 K B more per
position of the batch, nothing per token of the split).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

IGNORE_INDEX = -100
BLOCK = 1 << 20  # ids converted to int64 at a time by whole-split passes (8 MB)


def _join(tensors: list[Tensor]) -> Tensor:
    """The 1-D tensors back to back: a view when they are adjacent slices of one storage, else a copy.

    The copy keeps the ids' dtype (int64 only when the dtypes differ).
    """
    full = [t for t in tensors if t.numel()]
    if not full:
        return tensors[0][:0] if tensors else torch.zeros(0, dtype=torch.long)
    first, end = full[0], full[0].storage_offset() + full[0].numel()
    adjacent = all(t.dtype == first.dtype and t.is_contiguous() for t in full)
    for t in full[1:]:
        adjacent = adjacent and (t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                                 and t.storage_offset() == end)
        end += t.numel()
    if adjacent:
        total = end - first.storage_offset()
        return torch.empty(0, dtype=first.dtype).set_(first.untyped_storage(), first.storage_offset(), (total,))
    if len({t.dtype for t in full}) > 1:
        full = [t.long() for t in full]
    return torch.cat(full)


class TokenSequences:
    """S sequences in CSR layout over one flat id tensor.

    Args / attributes:
        token_ids: ``(N,)`` integer ids as stored: a uint16 / uint32 view of the
            memory-mapped token cache (0 B/token of anonymous memory), or int64 for small
            in-memory data. Only the slices a batch needs are converted to int64.
        offsets: ``(S + 1,)`` int64, ``offsets[0] = 0``, ``offsets[-1] = N`` (8 B per sequence).
        num_bytes: UTF-8 bytes of the text these ids encode (for bits per byte); default
            the sum of ``nbytes``.
        nbytes: ``(S,)`` int64 UTF-8 bytes of each sequence's text, when known (whole
            samples); None for pieces of samples.
    """

    def __init__(self, token_ids: Tensor, offsets: Tensor, num_bytes: int | None = None,
                 nbytes: Tensor | None = None):
        token_ids = torch.as_tensor(token_ids)
        assert token_ids.dim() == 1 and not token_ids.is_floating_point(), "token_ids must be a 1-D integer tensor"
        self.token_ids = token_ids
        self.offsets = torch.as_tensor(offsets).long()
        self.nbytes = None if nbytes is None else torch.as_tensor(nbytes).long()
        assert self.offsets[0] == 0 and self.offsets[-1] == token_ids.numel(), "offsets must span ids"
        assert self.nbytes is None or self.nbytes.numel() == self.num_sequences, "one byte count per sequence"
        if num_bytes is None:
            num_bytes = int(self.nbytes.sum()) if self.nbytes is not None else 0
        self.num_bytes = int(num_bytes)

    @classmethod
    def from_lists(cls, seqs: list[list[int]] | list[Tensor], num_bytes: int = 0) -> "TokenSequences":
        """In-memory int64 sequences (tests, prompts, small data)."""
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        offsets = torch.zeros(len(seqs) + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        ids = torch.cat([torch.as_tensor(s, dtype=torch.long) for s in seqs]) if seqs else torch.zeros(0, dtype=torch.long)
        return cls(ids, offsets, num_bytes)

    # ---- sizes ------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def ids(self) -> Tensor:
        """``(N,)`` int64 ids of the whole split: a copy (8 B/token) unless stored as int64.

        For small data and checks; batches read :meth:`position_batch`, whole-split passes
        :meth:`id_blocks`.
        """
        return self.token_ids.long()

    def sequence(self, s: int) -> Tensor:
        """``(L_s,)`` int64 ids of sequence ``s``."""
        return self.token_ids[self.offsets[s]:self.offsets[s + 1]].long()

    def id_blocks(self, block: int = BLOCK) -> Iterator[Tensor]:
        """The ids in order as int64 blocks of at most ``block`` (8 B x ``block`` at a time)."""
        for start in range(0, self.num_tokens, block):
            yield self.token_ids[start:start + block].long()

    # ---- per batch ----------------------------------------------------------------------
    def position_batch(self, positions, history: int = 0) -> dict[str, Tensor]:
        """``positions (n,)`` -> ``{"positions", "ids", "is_start", "targets"}``, each ``(n,)``,
        and with ``history`` K > 0 ``"history" (n, K)``.

        The sequence of each position comes from a binary search in the offsets; ``targets``
        is the next id within the same sequence, -100 at a sequence's last position;
        ``history[:, j]`` the id at ``positions - 1 - j`` in the same sequence, -1 before its start.
        """
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        seq = torch.searchsorted(self.offsets, positions, right=True) - 1  # (n,)
        nxt = positions + 1
        has_next = nxt < self.offsets[seq + 1]
        ids = self.token_ids[positions].long()
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[has_next] = self.token_ids[nxt[has_next]].long()
        batch = {"positions": positions, "ids": ids, "is_start": positions == self.offsets[seq], "targets": targets}
        if history > 0:
            before = positions.unsqueeze(1) - torch.arange(1, history + 1)  # (n, K)
            inside = before >= self.offsets[seq].unsqueeze(1)
            batch["history"] = torch.where(inside, self.token_ids[before.clamp(min=0)].long(), -1)
        return batch

    def is_start(self) -> Tensor:
        """``(N,)`` bool: True where a sequence begins (the whole split; batches use :meth:`position_batch`)."""
        return self.position_batch(torch.arange(self.num_tokens))["is_start"]

    def targets(self) -> Tensor:
        """``(N,)`` int64 next id within the same sequence, -100 at each sequence's last position.

        The whole split (8 B/token); batches compute theirs in :meth:`position_batch`.
        """
        return self.position_batch(torch.arange(self.num_tokens))["targets"]

    def first_occurrences(self, limit: int | None = None) -> Tensor:
        """Distinct ids in the order they first occur (int64), at most ``limit``; read in blocks."""
        found: list[Tensor] = []
        seen = torch.zeros(0, dtype=torch.bool)
        count = 0
        for ids in self.id_blocks():
            uniq, inverse = torch.unique(ids, return_inverse=True)
            first = torch.full((uniq.numel(),), ids.numel(), dtype=torch.long)
            first.scatter_reduce_(0, inverse, torch.arange(ids.numel()), reduce="amin")
            if int(uniq[-1]) >= seen.numel():
                seen = torch.cat([seen, torch.zeros(int(uniq[-1]) + 1 - seen.numel(), dtype=torch.bool)])
            new = ~seen[uniq]
            uniq = uniq[new][torch.argsort(first[new])]
            seen[uniq] = True
            found.append(uniq)
            count += uniq.numel()
            if limit is not None and count >= limit:
                break
        out = torch.cat(found) if found else torch.zeros(0, dtype=torch.long)
        return out if limit is None else out[:limit]

    # ---- views ----------------------------------------------------------------------------
    def select(self, start: int, stop: int) -> "TokenSequences":
        """Sequences ``start .. stop - 1`` (a view of the ids).

        ``num_bytes`` is exact (the sum of ``nbytes``) when per-sequence bytes are known,
        else the share of ``num_bytes`` proportional to the tokens kept (rounded).
        """
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        nbytes = None if self.nbytes is None else self.nbytes[start:stop]
        num_bytes = None if nbytes is not None else self._share_of_bytes(hi - lo)
        return TokenSequences(self.token_ids[lo:hi], self.offsets[start:stop + 1] - lo, num_bytes, nbytes)

    def token_range(self, start: int, stop: int, num_bytes: int) -> "TokenSequences":
        """Tokens ``start .. stop - 1`` of a single sequence (S = 1) as one sequence (a view)."""
        assert self.num_sequences == 1, "token_range splits a single sequence"
        return TokenSequences(self.token_ids[start:stop], torch.tensor([0, stop - start]), num_bytes)

    def _share_of_bytes(self, tokens: int) -> int:
        return round(self.num_bytes * tokens / self.num_tokens) if self.num_tokens else 0

    @classmethod
    def concat(cls, parts: list["TokenSequences"]) -> "TokenSequences":
        """The sequences of all ``parts`` in order (positions of part k follow those of part k-1).

        A view when the parts are adjacent in one id array (train then validation), else a
        copy of the ids in their dtype.
        """
        offsets, base = [torch.zeros(1, dtype=torch.long)], 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += p.num_tokens
        nbytes = torch.cat([p.nbytes for p in parts]) if parts and all(p.nbytes is not None for p in parts) else None
        return cls(_join([p.token_ids for p in parts]), torch.cat(offsets), sum(p.num_bytes for p in parts), nbytes)

    def as_stream(self) -> "TokenSequences":
        """All sequences concatenated into one (S = 1), a view."""
        return TokenSequences(self.token_ids, torch.tensor([0, self.num_tokens]), self.num_bytes,
                              torch.tensor([self.num_bytes]))

    def split_long(self, max_len: int) -> "TokenSequences":
        """Every sequence cut into consecutive pieces of at most ``max_len`` (a view; empty sequences drop out)."""
        pieces = (self.lengths + max_len - 1) // max_len  # (S,)
        seq = torch.repeat_interleave(torch.arange(self.num_sequences), pieces)  # (P,) sequence of each piece
        k = torch.arange(seq.numel()) - torch.repeat_interleave(pieces.cumsum(0) - pieces, pieces)
        starts = self.offsets[seq] + k * max_len
        return TokenSequences(self.token_ids, torch.cat([starts, torch.tensor([self.num_tokens])]), self.num_bytes)

    def padded(self, order: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Sequences (in ``order``) right-padded to ``(S, T_max)`` int64; returns (ids, lengths)."""
        order = torch.arange(self.num_sequences) if order is None else order
        lengths = self.lengths[order]
        T = int(lengths.max()) if lengths.numel() else 0
        out = torch.zeros(len(order), T, dtype=torch.long)
        for row, s in enumerate(order.tolist()):
            a, b = int(self.offsets[s]), int(self.offsets[s + 1])
            out[row, :b - a] = self.token_ids[a:b]
        return out, lengths


class PositionCollate:
    """Turn a ``(n,)`` tensor (or list) of flat positions into a position batch (O(n), nothing per N).

    Positions ``>= N`` are padding (see :class:`PositionIndex`): they stand for position 0
    with target -100, so they predict nothing and add nothing to a loss or metric.
    ``history``: ids before each position to include (:meth:`TokenSequences.position_batch`).
    """

    def __init__(self, seqs: TokenSequences, history: int = 0):
        self.seqs, self.history = seqs, int(history)

    def __call__(self, positions) -> dict[str, Tensor]:
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        pad = positions >= self.seqs.num_tokens
        if not pad.any():
            return self.seqs.position_batch(positions, self.history)
        batch = self.seqs.position_batch(positions.masked_fill(pad, 0), self.history)
        batch["targets"] = batch["targets"].masked_fill(pad, IGNORE_INDEX)
        return batch


class PositionChunks(Dataset):
    """Contiguous chunks of ``chunk_size`` positions, in order, each item one batch.

    The number of items is padded with empty chunks up to a multiple of ``world_size`` so
    that a DistributedSampler (shuffle off) gives every rank the same number of batches
    without duplicating any position: every position is seen exactly once per epoch.
    Holds nothing per token; an item is O(chunk_size).
    """

    def __init__(self, seqs: TokenSequences, chunk_size: int, world_size: int = 1, history: int = 0):
        self.collate = PositionCollate(seqs, history)
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
    """Map-style dataset of single positions (for shuffled position loaders); nothing per token.

    ``pad_to_multiple`` appends padding positions ``n, n+1, ...`` (no target, see
    :class:`PositionCollate`) up to a multiple of it, so that a DistributedSampler over
    that many ranks needs no duplicates: every position is trained on once per epoch.
    """

    def __init__(self, n: int, pad_to_multiple: int = 1):
        self.n = n
        self.length = n + (-n % max(1, pad_to_multiple))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> int:
        return k


class Windows(Dataset):
    """Fixed windows of ``seq_len`` inputs with next-id targets, never crossing sequences.

    Each sequence is cut into consecutive windows; the targets of a window are the next ids
    in the same sequence (-100 past its end); short windows are right-padded with id 0.
    ``pad_to_multiple`` appends empty windows (no targets) up to a multiple of it, so that
    evaluation sharded over that many ranks counts every token exactly once. Holds the
    window bounds as two int64 tensors (16 B per window).
    """

    def __init__(self, seqs: TokenSequences, seq_len: int, pad_to_multiple: int = 1):
        self.seq_len = int(seq_len)
        self.seqs = seqs
        pieces = seqs.split_long(self.seq_len)
        starts, stops = pieces.offsets[:-1], pieces.offsets[1:]
        self.num_real = int(starts.numel())
        pad = -self.num_real % max(1, pad_to_multiple)  # empty windows so a DistributedSampler needs no duplicates
        self.starts = torch.cat([starts, torch.zeros(pad, dtype=torch.long)])
        self.stops = torch.cat([stops, torch.zeros(pad, dtype=torch.long)])

    def __len__(self) -> int:
        return int(self.starts.numel())

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        a, b = int(self.starts[k]), int(self.stops[k])
        batch = self.seqs.position_batch(torch.arange(a, b))
        inp = torch.zeros(self.seq_len, dtype=torch.long)
        tgt = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.long)
        inp[: b - a] = batch["ids"]
        tgt[: b - a] = batch["targets"]
        return {"input_ids": inp, "targets": tgt}


class EpochShuffleSampler(DistributedSampler):
    """A random order of ``range(n)`` that depends on (seed, epoch) only, then the padding,
    sharded over ``num_replicas`` ranks.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed from a checkpoint
    draws the same order for its next epoch as the uninterrupted run (a plain
    ``shuffle=True`` draws from the global RNG, whose state a checkpoint does not hold).
    The seed defaults to ``torch.initial_seed()``, i.e. the run's ``seed_everything``.

    ``size`` (>= n, a multiple of ``num_replicas``) is the dataset's length with its padding
    items ``n .. size-1``, which come last, in order. Rank r gets the items ``r, r+W, r+2W,
    ...`` of that order, so W ranks with batch B train on the global batches of one process
    with batch W*B, and no item is duplicated. A DistributedSampler, so Lightning does not
    wrap it in its ``DistributedSamplerWrapper`` (which would reshuffle it with another seed
    and hold it as a Python list of N items). The permutation is held as int32 (4 B per
    item; the same order as int64) and handed out in blocks, never as one Python list.
    """

    def __init__(self, n: int, seed: int | None = None, size: int | None = None, num_replicas: int = 1,
                 rank: int = 0):
        self.n = int(n)
        self.size = self.n if size is None else int(size)
        if self.size < self.n or self.size % num_replicas:
            raise ValueError(f"size {self.size} must be >= n {self.n} and a multiple of num_replicas {num_replicas}")
        super().__init__(range(self.size), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.seed = torch.initial_seed() if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
        dtype = torch.int32 if self.size < 2**31 else torch.int64
        order = torch.cat([torch.randperm(self.n, generator=g, dtype=dtype),
                           torch.arange(self.n, self.size, dtype=dtype)])
        for block in order[self.rank::self.num_replicas].split(1 << 16):
            yield from block.tolist()

    def __len__(self) -> int:
        return self.size // self.num_replicas


def shuffled_sampler(n: int, size: int, trainer=None) -> EpochShuffleSampler:
    """The training sampler of ``n`` items padded to ``size``: :class:`EpochShuffleSampler`
    over the trainer's DDP ranks (one process without a trainer)."""
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    return EpochShuffleSampler(n, size=size, num_replicas=world, rank=rank)
