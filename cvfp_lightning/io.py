"""Safe file I/O: atomic writes and weights-only loads of untrusted files."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from cvfp_lightning.errors import CVFPUserError


def _atomic_write(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the same folder, then rename: never a half-written file."""
    return _atomic_write(Path(path), lambda handle: torch.save(obj, handle))


def atomic_copy(source: str | Path, path: str | Path) -> Path:
    """Copy ``source``'s bytes to ``path`` through a temp file in ``path``'s folder, then rename."""
    with open(source, "rb") as src:
        return _atomic_write(Path(path), lambda handle: shutil.copyfileobj(src, handle, 1 << 20))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return _atomic_write(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``; a corrupt, truncated or foreign file -> CVFPUserError."""
    path = Path(path)
    if not path.is_file():
        raise CVFPUserError(f"file {str(path)!r} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals, EOF...
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CVFPUserError(f"{str(path)!r} is not a readable cvfp_lightning file ({first}); it may be truncated, "
                            "corrupt or from another program: delete it or point to the right file.") from exc


def atomic_write_csv(rows: list[dict], columns: list[str], path: str | Path) -> Path:
    """A CSV with a header of ``columns`` and one line per row (missing keys empty), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(buf.getvalue(), path)
