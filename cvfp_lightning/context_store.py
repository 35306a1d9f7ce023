"""Where a rank keeps the carried contexts of its shard: in memory or in a file, in a chosen dtype.

A :class:`ContextStore` holds ``(n, D)`` contexts, rows ``0 .. n-1`` standing for the global
positions ``[offset, offset + n)`` of a shard. Rows are read and written as float32 (the
dtype of the computation); they are kept as ``dtype``:

=============  ================================  =========================================
store          bytes per position                RAM
=============  ================================  =========================================
``memory``     ``D * itemsize`` (fp32 4 D,       the same (a tensor on the model's device)
               bf16 / fp16 2 D)
``disk``       ``2 * D * itemsize`` on disk      O(rows read at a time): two files in the
               (two generations, see below)      run folder, read and written with
                                                 ``pread`` / ``pwrite``, never mapped
=============  ================================  =========================================

Reading and writing follow the parallel iteration's access pattern: chunks in order, each
read (old values) before it is written (new values). :meth:`begin_generation` starts a new
generation: a ``memory`` store overwrites rows in place (the caller keeps the one row it
still needs, the previous chunk's last old row), a ``disk`` store writes the new generation
into its other file, so the previous generation stays intact until the next one is
complete (a run killed mid-iteration resumes from the last checkpoint's file). After each
generation the disk store syncs the file and tells the kernel to drop its pages
(``posix_fadvise(DONTNEED)``), so page cache does not push other work out of memory; so do
:meth:`snapshot` and :meth:`restore` after they have written, hashed or read a file (a
disk store's snapshot hashes its whole current file, which would otherwise be cached again).

:meth:`snapshot` writes (memory) or names (disk) a file holding the current generation and
returns its record ``{"file", "sha256", "rows", "dim", "dtype"}`` for a checkpoint;
:meth:`restore` copies one back after checking its size and digest. A memory store writes
each snapshot into the folder it is given (the caller names one per step, ``step-N``) and
the caller removes older ones with :func:`prune_snapshots`, keeping the newest two: the
checkpoint being written may never be completed (a run killed while saving), and the
previous checkpoint's file must then still be there. On disk that is ``2 * D * itemsize``
per position, like a disk store, whose file is overwritten two generations later. An
older checkpoint's contexts are gone (bounded disk use) and refused as changed or missing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.io import file_sha256

ContextDtype = Literal["float32", "bfloat16", "float16"]
StoreKind = Literal["memory", "disk"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORES = ("memory", "disk")


def context_dtype(name: str) -> torch.dtype:
    check(name in DTYPES, f"context_dtype={name!r} is unknown: expected one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def drop_page_cache(path: str | Path) -> None:
    """Tell the kernel the (synced) pages of ``path`` are not needed again (``posix_fadvise(DONTNEED)``)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _as_bytes(t: Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().view(torch.uint8).numpy())


class ContextStore:
    """``(n, D)`` contexts of one shard (see the module docstring).

    Args:
        num_rows: n, the shard's positions.
        dim: D.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (kept as); reads return float32.
        kind: ``memory`` | ``disk``.
        folder: where a ``disk`` store keeps its files (required for ``disk``).
        name: file stem of this store (e.g. ``train.rank0``).
        device: where ``memory`` rows live and where reads are returned.
    """

    def __init__(self, num_rows: int, dim: int, dtype: str = "float32", kind: str = "memory",
                 folder: str | Path | None = None, name: str = "contexts", device: torch.device | str = "cpu"):
        check(kind in STORES, f"context_store={kind!r} is unknown: expected memory or disk.")
        self.num_rows, self.dim, self.kind, self.name = int(num_rows), int(dim), kind, name
        self.dtype_name, self.dtype = dtype, context_dtype(dtype)
        self.device = torch.device(device)
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.generation = 0
        self._data: Tensor | None = None
        self._fds: list[int] = []
        if kind == "memory":
            self._data = torch.zeros(self.num_rows, self.dim, dtype=self.dtype, device=self.device)
        else:
            check(folder is not None, "context_store=disk needs a run folder (a logger or checkpoint folder).")
            self.folder = Path(folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            size = self.num_rows * self.dim * self.itemsize
            for g in range(2):
                fd = os.open(self._file(g), os.O_RDWR | os.O_CREAT, 0o644)
                os.ftruncate(fd, size)
                self._fds.append(fd)

    # ---- files ---------------------------------------------------------------------------
    def _file(self, generation: int) -> Path:
        return self.folder / f"{self.name}.gen{generation % 2}.bin"

    @property
    def row_bytes(self) -> int:
        return self.dim * self.itemsize

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self):
        self.close()

    # ---- rows -----------------------------------------------------------------------------
    def read(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)`` of the current generation as float32 ``(stop - start, D)`` on ``device``:
        a copy, never a view of the store (the caller writes the new values into those rows next and
        still needs the old ones): ``4 D`` transient bytes per row read, as the bf16 / fp16 and disk
        stores always made; the store itself stays ``D * itemsize`` per position."""
        if self.kind == "memory":
            return self._data[start:stop].to(torch.float32, copy=True)
        out = torch.empty(stop - start, self.dim, dtype=self.dtype)
        if stop > start:
            got = os.preadv(self._fds[self.generation % 2], [_as_bytes(out)], start * self.row_bytes)
            check(got == (stop - start) * self.row_bytes,
                  f"the context file {self._file(self.generation)} is shorter than expected: delete the run folder's "
                  "contexts/ and start the run again.")
        return out.to(self.device).float()

    def write(self, start: int, values: Tensor) -> None:
        """Rows ``[start, start + len(values))`` of the generation being written, from ``values (k, D)``."""
        values = values.detach()
        if self.kind == "memory":
            self._data[start:start + values.shape[0]] = values.to(self.dtype)
            return
        os.pwrite(self._fds[(self.generation + self._writing) % 2], _as_bytes(values.to(self.dtype)),
                  start * self.row_bytes)

    def gather(self, rows: Tensor) -> Tensor:
        """Rows at the indices ``rows (k,)`` as float32 ``(k, D)`` (memory store)."""
        check(self.kind == "memory", "gather reads a memory store")
        return self._data[rows.to(self._data.device)].float()

    def fill(self, values: Tensor) -> None:
        """Every row at once, from ``values (n, D)`` (iteration 0)."""
        self.begin_generation()
        for start in range(0, self.num_rows, 1 << 16):
            self.write(start, values[start:start + (1 << 16)])
        self.end_generation()

    # ---- generations ------------------------------------------------------------------------
    _writing = 0

    def begin_generation(self) -> None:
        """Start writing the next generation (memory: in place; disk: into the other file)."""
        self._writing = 0 if self.kind == "memory" else 1

    def end_generation(self) -> None:
        """The written generation becomes current (disk: synced, its pages dropped from the page cache)."""
        if self.kind == "disk":
            fd = self._fds[(self.generation + 1) % 2]
            os.fdatasync(fd)
            if hasattr(os, "posix_fadvise"):
                for f in self._fds:
                    os.posix_fadvise(f, 0, 0, os.POSIX_FADV_DONTNEED)
            self.generation += 1
        self._writing = 0

    # ---- checkpoints -------------------------------------------------------------------------
    def snapshot(self, folder: str | Path) -> dict:
        """A file with the current generation and its record (memory: written to ``folder``; disk: its own file)."""
        if self.kind == "memory":
            path = Path(folder) / f"{self.name}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            h = hashlib.sha256()
            with open(tmp, "wb") as handle:
                for start in range(0, self.num_rows, 1 << 16):
                    block = _as_bytes(self._data[start:start + (1 << 16)])
                    h.update(block)
                    handle.write(block)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            digest = h.hexdigest()
        else:
            path = self._file(self.generation)
            digest = file_sha256(path)
        drop_page_cache(path)
        return {"file": str(path), "sha256": digest, "rows": self.num_rows, "dim": self.dim, "dtype": self.dtype_name}

    def restore(self, record: dict) -> None:
        """Load the rows of a :meth:`snapshot` record into the current generation (checked: shape,
        dtype, size, digest), read in blocks (O(block) extra memory)."""
        path = Path(record.get("file", ""))
        check(path.is_file(), f"the checkpoint's context file {path} is missing: resume needs the run folder it "
                              "was written in (its contexts/), or start a new run.")
        same = (int(record.get("rows", -1)), int(record.get("dim", -1)), record.get("dtype")) == \
            (self.num_rows, self.dim, self.dtype_name)
        check(same, f"the checkpoint's context file {path} holds {record.get('rows')} x {record.get('dim')} "
                    f"{record.get('dtype')} rows, this run needs {self.num_rows} x {self.dim} {self.dtype_name}: resume "
                    "with the same data, devices and context_dtype.")
        check(path.stat().st_size == self.num_rows * self.row_bytes and file_sha256(path) == record.get("sha256"),
              f"the checkpoint's context file {path} was changed after the checkpoint was written (its digest "
              "differs; only the newest two checkpoints' contexts are kept): resume from the run's last.ckpt, or "
              "start a new run.")
        block = 1 << 16
        self.begin_generation()
        with open(path, "rb") as handle:
            for start in range(0, self.num_rows, block):
                rows = min(block, self.num_rows - start)
                raw = bytearray(handle.read(rows * self.row_bytes))
                self.write(start, torch.frombuffer(raw, dtype=self.dtype).reshape(rows, self.dim))
        self.end_generation()
        drop_page_cache(path)


def prune_snapshots(root: str | Path, name: str, keep: set[Path]) -> None:
    """Remove the memory snapshot files ``root/step-*/<name>.bin`` (and a killed write's temporary
    file) of every folder not in ``keep``, then the folder once no rank's file is left in it. Only
    this store's own files are removed: each rank prunes its own, so ranks never race on one file."""
    root = Path(root)
    keep = {Path(k).resolve() for k in keep}
    for folder in sorted(p for p in root.glob("step-*") if p.is_dir() and p.resolve() not in keep):
        for path in (folder / f"{name}.bin", folder / f".{name}.bin.tmp"):  # the tmp: a write that was killed
            path.unlink(missing_ok=True)
        try:
            folder.rmdir()
        except OSError:  # another rank's file is still in it
            pass
