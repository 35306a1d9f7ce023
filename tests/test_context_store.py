"""Context stores (cvfp_lightning.context_store): where a rank keeps the contexts of its positions."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from cvfp_lightning import CVFPUserError
from cvfp_lightning.context_store import ContextStore, prune_snapshots


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
        assert torch.equal(old, expected[start:start + 4])  # a copy: the write did not change what was read
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


def test_prune_snapshots_removes_only_this_stores_files_outside_the_kept_folders(tmp_path):
    for step in (1, 2, 3):
        folder = tmp_path / f"step-{step:010d}"
        folder.mkdir()
        (folder / "train.rank0-of-2.bin").write_bytes(b"0")
    (tmp_path / "step-0000000001" / "train.rank1-of-2.bin").write_bytes(b"1")  # another rank's, not yet pruned
    (tmp_path / "step-0000000002" / ".train.rank0-of-2.bin.tmp").write_bytes(b"t")  # a killed write
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train.rank0-of-2.bin").write_bytes(b"x")  # not a snapshot folder
    prune_snapshots(tmp_path, "train.rank0-of-2", {tmp_path / "step-0000000003"})
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "other", "other/train.rank0-of-2.bin", "step-0000000001", "step-0000000001/train.rank1-of-2.bin",
        "step-0000000003", "step-0000000003/train.rank0-of-2.bin"]
