"""The ``streams`` layout (truncated BPTT): every position once per epoch, whole sequences in
evaluation, the same batches per rank under DDP without duplicates, an order of (seed, epoch)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from cvfp_lightning.data.sequences import IGNORE_INDEX, TokenSequences
from cvfp_lightning.data.streams import StreamSteps, StreamWindows, stream_loader

LENGTHS = [23, 5, 1, 17, 40, 2, 9, 12]


def sequences() -> TokenSequences:
    """Ids that name their position: sequence s, offset k -> 1000 s + k + 1 (never 0, the pad id)."""
    return TokenSequences.from_lists([[1000 * s + k + 1 for k in range(n)] for s, n in enumerate(LENGTHS)])


def rank_batches(windows: StreamWindows, rank: int, epoch: int = 0) -> list[dict]:
    """Rank ``rank``'s batches as Lightning's DistributedSamplerWrapper (no shuffle) hands them out."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    sampler = StreamSteps(len(windows))
    if windows.world > 1:
        sampler = DistributedSamplerWrapper(sampler, num_replicas=windows.world, rank=rank, shuffle=False)
    sampler.set_epoch(epoch)
    return list(DataLoader(windows, batch_size=None, sampler=sampler))


def predicted(batches: list[dict]) -> list[int]:
    """The input ids that have a target, over all batches and lanes."""
    out = []
    for b in batches:
        keep = b["targets"] != IGNORE_INDEX
        out += b["input_ids"][keep].tolist()
    return out


@pytest.mark.parametrize("cut", [True, False])
@pytest.mark.parametrize("world", [1, 2])
def test_every_position_is_read_once_per_epoch_on_every_rank_count(cut, world):
    seqs = sequences()
    windows = StreamWindows(seqs, lanes=3, window=4, world_size=world, cut=cut, seed=7)
    for epoch in (0, 1):
        per_rank = [rank_batches(windows, r, epoch) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1  # every rank runs the same number of batches
        read = [i for b in per_rank for i in predicted(b)]
        with_next = [i for s, n in enumerate(LENGTHS) for i in range(1000 * s + 1, 1000 * s + n)]
        assert sorted(read) == with_next  # each position with a next id predicted exactly once, no duplicates
        inputs = [i for batches in per_rank for b in batches for i in b["input_ids"].reshape(-1).tolist() if i]
        assert sorted(inputs) == sorted(seqs.ids.tolist())  # every position is an input exactly once


def test_targets_are_the_next_ids_of_the_same_sequence():
    windows = StreamWindows(sequences(), lanes=2, window=4, cut=True, seed=0)
    for b in rank_batches(windows, 0):
        ids, targets = b["input_ids"], b["targets"]
        keep = targets != IGNORE_INDEX
        assert torch.equal(targets[keep], ids[keep] + 1)  # ids count up within a sequence


def lane_streams(batches: list[dict]) -> list[list[tuple[list[int], bool]]]:
    lanes = batches[0]["input_ids"].shape[0]
    return [[(b["input_ids"][r][b["input_ids"][r] > 0].tolist(), bool(b["continues"][r])) for b in batches]
            for r in range(lanes)]


def test_continues_marks_exactly_the_windows_that_follow_their_predecessor():
    for cut in (True, False):
        windows = StreamWindows(sequences(), lanes=3, window=4, cut=cut, seed=3)
        for lane in lane_streams(rank_batches(windows, 0)):
            previous: list[int] = []
            for ids, continues in lane:
                follows = bool(ids) and bool(previous) and ids[0] == previous[-1] + 1  # next window, same sequence
                assert continues == follows, (ids, previous)
                previous = ids


def test_evaluation_carries_every_sequence_whole_in_one_lane():
    windows = StreamWindows(sequences(), lanes=3, window=4, world_size=2, cut=False)
    for rank in range(2):
        for lane in lane_streams(rank_batches(windows, rank)):
            for ids, continues in lane:
                if ids and ids[0] % 1000 != 1:  # not the first id of its sequence: carried from the lane's last window
                    assert continues


def test_training_order_depends_on_seed_and_epoch_only():
    seqs = sequences()
    a = StreamWindows(seqs, lanes=2, window=4, cut=True, seed=5)
    b = StreamWindows(seqs, lanes=2, window=4, cut=True, seed=5)
    first = [x["input_ids"] for x in rank_batches(a, 0, epoch=3)]
    again = [x["input_ids"] for x in rank_batches(b, 0, epoch=3)]
    other = [x["input_ids"] for x in rank_batches(a, 0, epoch=4)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not all(torch.equal(x, y) for x, y in zip(first, other))


def test_a_single_stream_is_cut_into_lanes_for_training_and_kept_whole_for_evaluation():
    stream = sequences().as_stream()
    train = StreamWindows(stream, lanes=4, window=4, cut=True)
    assert train.steps == -(-stream.num_tokens // (4 * 4))
    evaluation = StreamWindows(stream, lanes=4, window=4, cut=False)
    assert evaluation.steps == -(-stream.num_tokens // 4)  # one lane holds it all


def test_the_data_module_serves_the_streams_layout(corpus):
    from helpers.lm import text_data

    dm = text_data(corpus, batch_size=4, seq_len=16)
    dm.setup()
    dm.connect(layout="streams")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and batch["continues"].shape == (4,)
    loader = stream_loader(dm.val_sequences, 4, 16, 1, train=False)
    scored = sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in loader)
    assert scored == dm.val_sequences.num_tokens - dm.val_sequences.num_sequences  # all but each sequence's first
