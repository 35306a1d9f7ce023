"""The token cache on disk: one memory-mapped id array per source plus sample offsets.

A source's ids are computed once (``TokenDataModule.prepare_data``) and written to the
folder ``<cache_dir>/tokens/<key>/`` (nanoGPT's ``.bin``, plus what splits need)::

    ids.bin       (N,) uint16 when the vocabulary has at most 65536 ids, else uint32; raw
                  little-endian, all samples back to back
    offsets.npy   (S + 1,) int64: sample s is ids[offsets[s]:offsets[s + 1]] (no empty sample)
    nbytes.npy    (S,) int64: UTF-8 bytes of sample s's text
    meta.json     format, key, dtype, vocab_size, num_tokens, num_samples, the sha256 of the
                  three files above (computed while writing), and the source's description

The folder is written under a temporary name in the same parent and renamed into place, so
a reader sees a complete cache or none; ``meta.json`` is written last. Reading checks the
format, the key, the dtype, every file's size and sha256 and the offsets; any mismatch is a
:class:`CVFPUserError` naming the file and what is wrong (``TokenDataModule`` then rebuilds
the cache with that reason in a warning). Files are read back without pickle
(``np.load(allow_pickle=False)``, ``json``, ``np.memmap``).

Memory: ``ids.bin`` is memory-mapped copy-on-write (``np.memmap`` mode ``"c"``: pages come
from the page cache, an accidental in-place write stays private and never reaches the file
or crashes the process), so the ids cost 0 bytes of anonymous memory per token and 2 (or 4)
bytes of shared page cache per token read; offsets and nbytes are 16 bytes per sample in
RAM. Writing holds one batch of samples at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.io import file_sha256

log = logging.getLogger(__name__)

FORMAT = 2
FILES = ("ids.bin", "offsets.npy", "nbytes.npy")
META = "meta.json"


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 for at most 65536 ids, else uint32 (2 or 4 bytes per token on disk)."""
    check(0 < vocab_size <= 1 << 32, f"vocab_size={vocab_size} cannot be stored: expected 1 to 2**32 ids.")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class TokenCacheWriter:
    """Stream samples of ids into a new cache folder; :meth:`commit` publishes it atomically.

    Use as a context manager: an exception (or no commit) removes the temporary folder.
    """

    def __init__(self, folder: str | Path, key: str, vocab_size: int, source: str = ""):
        self.folder, self.key, self.vocab_size, self.source = Path(folder), key, int(vocab_size), source
        self.dtype = ids_dtype(self.vocab_size)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".tmp", dir=self.folder.parent))
        self._ids = open(self.tmp / "ids.bin", "wb")
        self._sha = hashlib.sha256()
        self._lengths: list[np.ndarray] = []
        self._nbytes: list[np.ndarray] = []
        self.num_tokens = 0

    def __enter__(self) -> "TokenCacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._ids.closed:
            self._ids.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, samples, nbytes) -> None:
        """Append samples (each a sequence of ids or a 1-D integer array) and their UTF-8 bytes.

        Empty samples are dropped (with their bytes). Ids must lie in ``[0, vocab_size)``.
        """
        lengths = np.fromiter((len(s) for s in samples), dtype=np.int64, count=len(samples))
        nbytes = np.asarray(nbytes, dtype=np.int64).reshape(-1)
        check(len(nbytes) == len(lengths), "internal: one byte count per sample is needed")
        keep = lengths > 0
        if not keep.any():
            return
        parts = [np.asarray(s).reshape(-1) for s, k in zip(samples, keep) if k]
        self._write(parts[0] if len(parts) == 1 else np.concatenate(parts))
        self._lengths.append(lengths[keep])
        self._nbytes.append(nbytes[keep])

    def add_blocks(self, blocks, nbytes: int) -> None:
        """Append one sample given as consecutive 1-D blocks of ids (a long sample, written block by block)."""
        length = sum(self._write(np.asarray(block).reshape(-1)) for block in blocks)
        if length:
            self._lengths.append(np.array([length], dtype=np.int64))
            self._nbytes.append(np.array([nbytes], dtype=np.int64))

    def _write(self, flat: np.ndarray) -> int:
        if not flat.size:
            return 0
        low, high = int(flat.min()), int(flat.max())
        check(low >= 0 and high < self.vocab_size,
              f"token id {high if high >= self.vocab_size else low} is outside the vocabulary of "
              f"{self.vocab_size} ids: the tokenizer and vocab_size disagree.")
        data = np.ascontiguousarray(flat.astype(self.dtype, copy=False))
        self._ids.write(data)
        self._sha.update(data)
        self.num_tokens += int(flat.size)
        return int(flat.size)

    def commit(self) -> Path:
        """Write offsets, nbytes and meta.json, then rename the folder into place."""
        self._ids.flush()
        os.fsync(self._ids.fileno())
        self._ids.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        nbytes = np.concatenate(self._nbytes) if self._nbytes else np.zeros(0, dtype=np.int64)
        sha = {"ids.bin": self._sha.hexdigest()}
        for name, array in (("offsets.npy", offsets), ("nbytes.npy", nbytes)):
            data = _npy_bytes(array)
            (self.tmp / name).write_bytes(data)
            sha[name] = hashlib.sha256(data).hexdigest()
        meta = {"format": FORMAT, "key": self.key, "dtype": self.dtype.str, "vocab_size": self.vocab_size,
                "num_tokens": self.num_tokens, "num_samples": int(len(lengths)), "sha256": sha,
                "source": self.source}
        with open(self.tmp / META, "w") as handle:
            json.dump(meta, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(self.tmp, self.folder)
        return self.folder


def _publish(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; an existing (broken) folder is moved aside first.

    When another process publishes the same key at the same moment, its complete folder
    is kept and ours is dropped (both hold the same ids).
    """
    stale = None
    if folder.exists():
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{tmp.name[-12:]}")
        try:
            os.rename(folder, stale)
        except FileNotFoundError:
            stale = None
    try:
        os.rename(tmp, folder)
    except OSError:
        if not (folder / META).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _fail(folder: Path, what: str) -> None:
    raise CVFPUserError(f"token cache {str(folder)!r} {what}")


def read_token_cache(folder: str | Path, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Open a cache folder: ``(ids (N,) uint16/uint32 memory-mapped, offsets (S+1,) int64, nbytes (S,) int64)``.

    Raises:
        CVFPUserError: missing, incomplete, truncated, corrupt or foreign cache (one line).
    """
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        _fail(folder, "is incomplete (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        num_tokens, num_samples, sha = int(meta["num_tokens"]), int(meta["num_samples"]), dict(meta["sha256"])
        fmt, found_key = meta["format"], meta["key"]
    except (ValueError, KeyError, TypeError) as exc:
        _fail(folder, f"has an unreadable meta.json ({type(exc).__name__}: {str(exc)[:80]})")
    if fmt != FORMAT:
        _fail(folder, f"has format {fmt!r}, expected {FORMAT}")
    if found_key != key:
        _fail(folder, f"was written for key {found_key!r}, not {key!r}")
    if dtype not in (np.dtype("<u2"), np.dtype("<u4")):
        _fail(folder, f"has id dtype {dtype.str!r}, expected <u2 or <u4")
    ids_path = folder / "ids.bin"
    expected = {"ids.bin": num_tokens * dtype.itemsize}
    for name in FILES:
        path = folder / name
        if not path.is_file():
            _fail(folder, f"has no {name}")
        size = path.stat().st_size
        if name in expected and size != expected[name]:
            _fail(folder, f"has {name} of {size} bytes, expected {expected[name]} ({num_tokens} ids of "
                          f"{dtype.itemsize} bytes): truncated or overwritten")
        if file_sha256(path) != sha.get(name):
            _fail(folder, f"has a {name} whose sha256 differs from meta.json: corrupt")
    offsets = np.load(folder / "offsets.npy", allow_pickle=False)
    nbytes = np.load(folder / "nbytes.npy", allow_pickle=False)
    ok = (offsets.dtype == np.int64 and offsets.shape == (num_samples + 1,) and nbytes.shape == (num_samples,)
          and offsets[0] == 0 and offsets[-1] == num_tokens and bool(np.all(np.diff(offsets) > 0)))
    if not ok:
        _fail(folder, "has offsets that do not span its ids in increasing order")
    if num_tokens:
        ids = torch.from_numpy(np.memmap(ids_path, dtype=dtype, mode="c", shape=(num_tokens,)))
    else:
        ids = torch.zeros(0, dtype=torch.uint16 if dtype.itemsize == 2 else torch.uint32)
    return ids, torch.from_numpy(offsets), torch.from_numpy(nbytes.astype(np.int64))
