"""Shards (which positions a rank owns) and context stores (where it keeps their contexts)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from cvfp_lightning import CVFPUserError
from cvfp_lightning.context_store import ContextStore
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


@pytest.mark.parametrize("kind", ["memory", "disk"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_store_keeps_rows_across_generations_and_snapshots(tmp_path, kind, dtype):
    x = torch.randn(10, 6)
    store = ContextStore(10, 6, dtype, kind, folder=tmp_path / "run", name="train.rank0")
    store.fill(x)
    expected = x.to(store.dtype).float()
    assert torch.equal(store.read(0, 10), expected)
    store.begin_generation()  # the next generation, chunk by chunk: old rows stay readable until written
    for start in range(0, 10, 4):
        old = store.read(start, min(start + 4, 10))
        assert torch.equal(old, expected[start:start + 4])
        store.write(start, old * 2)
    store.end_generation()
    assert torch.equal(store.read(0, 10), (expected * 2).to(store.dtype).float())
    record = store.snapshot(tmp_path / "snap")
    other = ContextStore(10, 6, dtype, kind, folder=tmp_path / "run", name="train.rank0")
    other.restore(record)
    assert torch.equal(other.read(0, 10), store.read(0, 10))
    bad = dict(record, sha256="0" * 64)
    with pytest.raises(CVFPUserError, match="digest differs"):
        other.restore(bad)
    with pytest.raises(CVFPUserError, match="holds 10 x 6"):
        ContextStore(11, 6, dtype, kind, folder=tmp_path / "run2", name="x").restore(record)


def test_the_disk_store_holds_no_rows_in_memory(tmp_path):
    store = ContextStore(1000, 64, "float32", "disk", folder=tmp_path, name="val.rank0")
    assert store._data is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.rank0.gen0.bin", "val.rank0.gen1.bin"]
    assert all(p.stat().st_size == 1000 * 64 * 4 for p in tmp_path.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_snapshot_and_restore_drop_the_page_cache_of_their_file(tmp_path, monkeypatch, kind):
    dropped = []
    real = os.posix_fadvise

    def spy(fd, offset, length, advice):
        if advice == os.POSIX_FADV_DONTNEED:
            dropped.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    store = ContextStore(10, 4, kind=kind, folder=tmp_path / "live", name="train.rank0-of-1")
    store.fill(torch.randn(10, 4))
    dropped.clear()
    record = store.snapshot(tmp_path / "snapshot")  # a disk store hashes its whole file here
    assert os.path.realpath(record["file"]) in dropped
    other = ContextStore(10, 4, kind=kind, folder=tmp_path / "other", name="train.rank0-of-1")
    dropped.clear()
    other.restore(record)  # hashed and read
    assert os.path.realpath(record["file"]) in dropped
    assert torch.equal(other.read(0, 10), store.read(0, 10))
