"""Safe file I/O: atomic writes, weights-only loads of untrusted files, and the checks of a
command's output path (:func:`check_output_file`, :func:`check_writable_folder`,
:func:`write_output`): a bad path is one user error before the work, and a user's file is
never replaced by a command's output."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from cvfp_lightning.errors import CVFPUserError, check


def current_umask() -> int:
    """The process's umask: read from ``/proc/self/status`` where it is there (Linux), since
    ``os.umask`` can only be read by setting it, which for a moment gives the other threads'
    new files another mode."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> Path:
    """Write through a temporary file renamed into place; the file gets the mode ``open`` would
    give it (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as None: ``json.dumps`` would write ``NaN``,
    which is not JSON (``jq``, JavaScript and strict parsers refuse the file)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    """``obj`` as indented JSON (non-finite numbers as null), written atomically."""
    return atomic_write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n", path)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``; a corrupt, truncated or foreign file -> CVFPUserError."""
    path = Path(path)
    if not path.is_file():
        raise CVFPUserError(f"{str(path)!r} is a folder, not a file." if path.is_dir()
                            else f"file {str(path)!r} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals, EOF...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = f"{type(exc).__name__}: {first}" if len(first) < 8 else first  # a bare "101" says nothing
        cut = first.rfind(" ", 0, 200)  # at a word, or at 200 characters when there is no space before
        first = first if len(first) <= 200 else first[:cut if cut > 0 else 200] + " ..."
        raise CVFPUserError(f"{str(path)!r} is not a readable cvfp_lightning file ({first}); it may be truncated, "
                            "corrupt or from another program: delete it or point to the right file.") from exc


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """A CSV with a header of ``columns`` and one line per row (missing keys empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def atomic_write_csv(rows: list[dict], columns: list[str], path: str | Path) -> Path:
    """:func:`csv_text` of ``rows``, written atomically."""
    return atomic_write_text(csv_text(rows, columns), path)


# ---- a command's output path ---------------------------------------------------------------------------
def check_writable_folder(folder: str | Path, option: str, value: str | Path) -> Path:
    """That ``folder`` is, or can be made as, a folder this process can write in; else one user error
    naming ``option value``. The nearest existing folder on the way is probed with a temp file made and
    removed at once (permissions alone say nothing for root or for /proc)."""
    folder = Path(folder).expanduser().absolute()
    ancestor = folder
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    check(ancestor.is_dir(), f"{option} {str(value)!r} cannot be written: {str(ancestor)!r} is a file, not a "
                             "folder: give a path in a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cvfp-probe.", suffix=".tmp", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CVFPUserError(f"{option} {str(value)!r} cannot be written: no file can be made in {str(ancestor)!r} "
                            f"({exc.strerror or type(exc).__name__}): give a path in a folder you can write.") from exc
    return folder


def read_text_upto(path: Path, limit: int) -> str | None:
    """The UTF-8 text of ``path``, or None when it is larger than ``limit`` bytes or unreadable."""
    try:
        if path.stat().st_size > limit:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def check_output_file(path: str | Path, option: str, earlier_output: Callable[[Path], bool], what: str) -> Path:
    """Check ``path`` (the value of ``option``) before a command's work: it is not a folder, its folder can
    be written, and an existing file there is replaced only when it is empty or ``earlier_output(path)``
    holds (an earlier output of the same command, described by ``what``). Returns the path to write."""
    path = Path(path).expanduser()
    check(not path.is_dir(), f"{option} {str(path)!r} is a folder: give the path of a file (in it or elsewhere).")
    if path.exists() or path.is_symlink():
        check(path.is_file(), f"{option} {str(path)!r} exists and is not a regular file: give another path.")
        check(path.stat().st_size == 0 or earlier_output(path),
              f"{option} {str(path)!r} exists and is not {what}: it is not replaced; give another {option} "
              "or move that file away.")
    check_writable_folder(path.parent, option, path)
    return path


def write_output(text: str, path: str | Path, option: str, earlier_output: Callable[[Path], bool], what: str,
                 note: str = "") -> Path:
    """:func:`check_output_file` again (the file may have appeared during the work), then an atomic write of
    ``text``; a failed write is one user error (``note`` says where the result still is)."""
    path = check_output_file(path, option, earlier_output, what)
    try:
        return atomic_write_text(text, path)
    except OSError as exc:
        raise CVFPUserError(f"{option} {str(path)!r} could not be written ({exc.strerror or type(exc).__name__})"
                            f"{note}.") from exc
