"""Process-wide settings for fast CPU training, applied once by the ``cvfp`` entry points.

glibc ``malloc`` serves blocks above a dynamic threshold with ``mmap`` and gives freed heap
memory back to the kernel. A Phase 1 iteration allocates and frees hundreds of MB of
activations in blocks of 1 to 20 MB, so every iteration faults the same memory back in page
by page: 37,000 to 111,000 minor page faults and 5 to 15% of the iteration's time on the
reference workload (``benchmarks/README.md``); Phase 2's 1600 x 50257 logits (321 MB) and
their gradients are faulted in at every step (an epoch took 18.6 s instead of 8.4 s).
Serving blocks up to 1 GB from the heap and keeping up to 2 GB of freed memory there makes
those pages reusable: from the third iteration on, next to no faults. The peak RSS barely
changes (the memory is in use at the peak anyway: 0.96 against 0.99 GB on the reference
workload, 6.6 against 6.0 GB at 640k tokens); a process may keep up to 2 GB it has freed
until it exits.

Set ``CVFP_MALLOC_TUNING=0`` to leave the allocator alone (e.g. when preloading jemalloc or
tcmalloc, which solve the same problem).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 1024 * 1024 * 1024
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes

_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Apply the ``mallopt`` settings above (Linux with glibc only). Returns whether they apply."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("CVFP_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc tuning %s", "applied" if _applied else "refused by libc")
    return _applied


# ---- the package's log lines ---------------------------------------------------------------------
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _RankZeroStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (a live rich bar redirects it), on rank 0 only."""

    def emit(self, record: logging.LogRecord) -> None:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) != 0:
            return
        self.setStream(sys.stderr)
        super().emit(record)


class _Formatter(logging.Formatter):
    """``cvfp: message`` for INFO, ``cvfp: warning: message`` above it (like ``cvfp: error: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"cvfp: {level}{super().format(record)}"


def log_level(level: str | int | None) -> int:
    """The level of a name of :data:`LOG_LEVELS` (any case) or a number; None reads ``CVFP_LOG_LEVEL``
    (default ``INFO``). Raises ValueError for an unknown name."""
    if level is None:
        level = os.environ.get("CVFP_LOG_LEVEL") or "INFO"
    if isinstance(level, int):
        return level
    name = str(level).strip().upper()
    if name not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is unknown: expected one of {', '.join(LOG_LEVELS)}.")
    return getattr(logging, name)


def configure_logging(level: str | int | None = None) -> int:
    """Show the ``cvfp_lightning`` loggers' lines at ``level`` and above (:func:`log_level`); returns the level.

    One handler on the ``cvfp_lightning`` logger prints on stderr, on rank 0 only; calling this
    again replaces it. When the application has configured the root logger (it has handlers),
    no handler is added and the records reach the root's handlers. Lightning's own loggers keep
    their handler; ``level`` above INFO quiets them too (the package's ``rank_zero_info`` lines
    are Lightning's). Call it after importing ``lightning``, which sets its loggers' level on
    import.
    """
    level = log_level(level)
    package = logging.getLogger("cvfp_lightning")
    package.setLevel(level)
    for handler in [h for h in package.handlers if isinstance(h, _RankZeroStderrHandler)]:
        package.removeHandler(handler)
    if not logging.getLogger().hasHandlers():
        handler = _RankZeroStderrHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        package.addHandler(handler)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    return level
