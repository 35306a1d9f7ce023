"""The ``streams`` layout: B sequences per rank advancing window by window (truncated BPTT).

A recurrent model trained by truncated back-propagation reads its sequences in windows of
T ids and carries its state from one window to the next (detached). Here every rank has
``lanes`` (B) lanes; each lane holds windows in sequence order, and batch k holds the k-th
window of every lane:

    batch = {"input_ids": (B, T) ids (0-padded), "targets": (B, T) next ids (-100: none),
             "continues": (B,) bool: the window continues the lane's previous window}

A window never crosses a sequence; its targets are the next ids of its sequence (the target
of its last id is the first id of the next window, so every position with a next id in its
sequence is predicted once). ``continues`` is False where a sequence starts (the context
restarts at 0), at a lane's first window, and for empty windows (a lane that has run out:
all targets -100).

How windows are laid into lanes:

- **training** (``cut=True``): the sequences in a random order that depends on (seed,
  epoch) only, their windows back to back, cut into ``L = lanes * world_size`` runs of
  ``ceil(P / L)`` windows (P windows in all). Every lane but possibly the last ones is full, so
  nothing is padded but the tail; a run that starts inside a sequence starts from context 0
  (at most L - 1 places per epoch; a single stream is simply cut into L lanes, as recurrent
  LMs batch a corpus).
- **evaluation** (``cut=False``): every sequence whole in one lane, so its context is
  carried from its first id to its last, exactly as :func:`~cvfp_lightning.sequential_pass.sequential_pass`
  does; sequences go to lanes longest first in a snake order (lane 0, 1, .., L-1, L-1, .., 0, ...),
  which balances the lanes' window counts.

Under DDP, rank r owns lanes ``r*B .. r*B + B - 1`` and every rank runs the same number of
batches (the longest lane's window count; shorter lanes get empty windows): no window is
read twice and no rank waits on a missing batch. Item ``i`` of :class:`StreamWindows` is
batch ``i // world_size`` of rank ``i % world_size``, so the sampler Lightning puts in front
of it under DDP (a ``DistributedSamplerWrapper`` around :class:`StreamSteps`, without
shuffling: items ``r, r + W, ...``) gives each rank its own batches in order.
:class:`StreamSteps` hands out ``(epoch, i)``, so the order of an epoch is a function of
(seed, epoch) in any worker process, and a resumed run reads the same batches.

Memory per rank: the window bounds and lane order, 24 B per window (3 int64), about
24 / T bytes per token; a batch is O(B T).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cvfp_lightning.data.sequences import IGNORE_INDEX, TokenSequences


def _order_seed(seed: int, epoch: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1)


class StreamWindows(Dataset):
    """Batches of the ``streams`` layout (see the module docstring).

    Args:
        seqs: the split's sequences.
        lanes: B, lanes (rows of a batch) per rank.
        window: T, ids per window.
        world_size: ranks; every rank gets the same number of batches.
        cut: training arrangement (sequences shuffled by (seed, epoch), windows cut into
            equal lane runs) instead of evaluation's (whole sequences per lane, fixed).
        seed: seed of the training order; default ``torch.initial_seed()`` (``seed_everything``).
    """

    def __init__(self, seqs: TokenSequences, lanes: int, window: int, world_size: int = 1, cut: bool = True,
                 seed: int | None = None):
        self.seqs, self.lanes, self.window, self.world = seqs, int(lanes), int(window), int(world_size)
        self.cut = cut
        self.seed = torch.initial_seed() if seed is None else int(seed)
        pieces = seqs.split_long(self.window)  # every sequence in windows of at most T ids (a view)
        self.starts, self.stops = pieces.offsets[:-1], pieces.offsets[1:]  # (P,) bounds of each window
        self.seq_of = torch.searchsorted(seqs.offsets, self.starts, right=True) - 1  # (P,) its sequence
        P, L = self.starts.numel(), self.lanes * self.world
        if cut:  # L equal runs of the (per-epoch) order
            self.steps = -(-P // L)
            bounds = (torch.arange(L + 1) * self.steps).clamp(max=P)
        else:
            self._eval_order, bounds = self._whole_sequences(L)
            self.steps = int((bounds[1:] - bounds[:-1]).max()) if L else 0
        self.lane_bounds = bounds  # (L + 1,) lane g holds the slots bounds[g] .. bounds[g+1] - 1 of the order
        self._cached: tuple[int, Tensor] | None = None

    def _whole_sequences(self, L: int) -> tuple[Tensor, Tensor]:
        """Evaluation: ``(window order (P,), lane bounds (L + 1,))``, every sequence whole in one lane."""
        S = self.seqs.num_sequences
        counts = torch.bincount(self.seq_of, minlength=S)  # (S,) windows per sequence
        by_length = torch.argsort(counts, descending=True, stable=True)  # sequences, longest first
        k = torch.arange(S)
        lane_of_seq = torch.empty(S, dtype=torch.long)
        lane_of_seq[by_length] = torch.where((k // L) % 2 == 0, k % L, L - 1 - k % L)  # snake order
        # windows sorted by lane, then sequence index, then position
        order = torch.argsort(lane_of_seq[self.seq_of] * (S + 1) + self.seq_of, stable=True)
        bounds = torch.zeros(L + 1, dtype=torch.long)
        bounds[1:] = torch.bincount(lane_of_seq, weights=counts.double(), minlength=L).long().cumsum(0)
        return order, bounds

    def order(self, epoch: int) -> Tensor:
        """``(P,)`` the windows in lane order: training's depends on (seed, epoch), evaluation's is fixed."""
        if not self.cut:
            return self._eval_order
        if self._cached is None or self._cached[0] != epoch:
            g = torch.Generator().manual_seed(_order_seed(self.seed, epoch))
            S = self.seqs.num_sequences
            rank_of_seq = torch.empty(S, dtype=torch.long)
            rank_of_seq[torch.randperm(S, generator=g)] = torch.arange(S)
            self._cached = (epoch, torch.argsort(rank_of_seq[self.seq_of], stable=True))  # each sequence's in order
        return self._cached[1]

    def lane_windows(self, epoch: int, step: int, rank: int) -> tuple[Tensor, Tensor]:
        """Batch ``step`` of ``rank``: ``(window index, -1 for none (B,), continues (B,))``."""
        order = self.order(epoch)
        lanes = torch.arange(rank * self.lanes, (rank + 1) * self.lanes)
        lo, hi = self.lane_bounds[lanes], self.lane_bounds[lanes + 1]
        slot = lo + step
        valid = slot < hi
        last = max(order.numel() - 1, 0)
        index = torch.where(valid, order[slot.clamp(max=last)], -1) if order.numel() else torch.full_like(slot, -1)
        if step == 0 or not order.numel():
            return index, torch.zeros_like(valid)
        prev = order[(slot - 1).clamp(max=last)]
        continues = valid & (self.seq_of[prev] == self.seq_of[index.clamp_min(0)])
        return index, continues

    # ---- Dataset -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.steps * self.world

    def __getitem__(self, item) -> dict[str, Tensor]:
        epoch, i = item if isinstance(item, tuple) else (0, item)
        step, rank = divmod(int(i), self.world)
        index, continues = self.lane_windows(int(epoch), step, rank)
        B, T = self.lanes, self.window
        ids = torch.zeros(B, T, dtype=torch.long)
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for row, w in enumerate(index.tolist()):
            if w < 0:
                continue
            a, b = int(self.starts[w]), int(self.stops[w])
            batch = self.seqs.position_batch(torch.arange(a, b))
            ids[row, :b - a] = batch["ids"]
            targets[row, :b - a] = batch["targets"]
        return {"input_ids": ids, "targets": targets, "continues": continues}


class StreamSteps(Sampler):
    """``(epoch, 0), (epoch, 1), ...`` over the items of a :class:`StreamWindows`, in order.

    Lightning calls ``set_epoch`` before every epoch (also through the
    ``DistributedSamplerWrapper`` it puts around this sampler under DDP).
    """

    def __init__(self, length: int):
        self.length, self.epoch = int(length), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter([(self.epoch, i) for i in range(self.length)])

    def __len__(self) -> int:
        return self.length


def stream_loader(seqs: TokenSequences, lanes: int, window: int, world_size: int, train: bool,
                  num_workers: int = 0) -> DataLoader:
    """The ``streams`` loader of ``seqs``: training (cut, shuffled by epoch) or evaluation (whole sequences)."""
    windows = StreamWindows(seqs, lanes, window, world_size, cut=train)
    return DataLoader(windows, batch_size=None, sampler=StreamSteps(len(windows)), num_workers=num_workers)
