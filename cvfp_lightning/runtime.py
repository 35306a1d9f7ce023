"""Process-wide settings applied by the ``cvfp`` entry points: the CPU allocator, and the
process group closed before the process exits (:func:`close_process_group`).

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


def close_process_group() -> None:
    """Destroy torch.distributed's default process group, if this process has one.

    Lightning destroys it at exit only for NCCL. A gloo group (DDP on CPU) would otherwise
    live into interpreter shutdown with its worker and transport threads running while
    Python and the C++ statics are torn down; PyTorch asks every process to call
    ``destroy_process_group`` before it exits. Called after a successful run (every rank
    of ``--trainer.strategy ddp`` runs the entry point).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
