"""Shards (cvfp_lightning.data.shards): which positions a rank owns, and its chunks on the global grid."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from cvfp_lightning.data.shards import Shard, chunk_grid, shard_bounds


def test_shards_of_whole_sequences_cut_at_the_nearest_sequence_start():
    offsets = torch.tensor([0, 5, 9, 20, 22, 30])  # lengths 5 4 11 2 8
    assert shard_bounds(offsets, 1, True).tolist() == [0, 30]
    assert shard_bounds(offsets, 2, True).tolist() == [0, 20, 30]  # 15 is nearer 20 than 9
    assert shard_bounds(offsets, 3, True).tolist() == [0, 9, 20, 30]
    assert shard_bounds(offsets, 2, False).tolist() == [0, 15, 30]
    assert Shard.of(offsets, 1, 2, False) == Shard(1, 2, 15, 30, continues=True, chained=True)
    assert Shard.of(offsets, 1, 2, True) == Shard(1, 2, 20, 30, continues=False)
    # more ranks than sequences: some shards are empty, none overlaps, all positions covered
    bounds = shard_bounds(torch.tensor([0, 10]), 4, True)
    assert bounds.tolist() == [0, 0, 0, 10, 10]
    assert sum(Shard.of(torch.tensor([0, 10]), r, 4, True).num_tokens for r in range(4)) == 10


@pytest.mark.parametrize("world, whole", [(1, True), (2, True), (3, True), (2, False), (5, False)])
def test_shards_partition_every_position_once(world, whole):
    torch.manual_seed(0)
    lengths = torch.randint(1, 40, (37,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    shards = [Shard.of(offsets, r, world, whole) for r in range(world)]
    covered = torch.cat([torch.arange(s.start, s.stop) for s in shards])
    assert torch.equal(covered, torch.arange(int(offsets[-1])))
    if whole:
        assert all(not s.continues for s in shards) and max(s.num_tokens for s in shards) - \
            min(s.num_tokens for s in shards) <= 2 * int(lengths.max())


def test_chunks_follow_the_global_grid_and_every_rank_has_the_same_count():
    offsets = torch.tensor([0, 30])
    bounds = shard_bounds(offsets, 2, False)
    chunks0, most0 = chunk_grid(Shard.of(offsets, 0, 2, False), 4, bounds)
    chunks1, most1 = chunk_grid(Shard.of(offsets, 1, 2, False), 4, bounds)
    assert chunks0 == [(0, 4), (4, 8), (8, 12), (12, 15)]
    assert chunks1 == [(15, 16), (16, 20), (20, 24), (24, 28), (28, 30)]
    assert most0 == most1 == 5
