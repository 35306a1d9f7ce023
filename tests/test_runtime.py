"""The CPU allocator settings applied by the ``cvfp`` entry points (cvfp_lightning.runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Allocates and frees blocks of 1 to 40 MB the way a training iteration does and reports the
# minor page faults of each round; the first round always faults (fresh memory).
SCRIPT = r"""
import json, resource, sys, torch
from cvfp_lightning.runtime import tune_cpu_allocator
applied = tune_cpu_allocator()
faults = []
keep = torch.ones(5 * 1024 * 1024)
for _ in range(3):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        big = torch.ones(10 * 1024 * 1024)
        blocks = [torch.ones(n * 256 * 1024) for n in (1, 3, 8, 20, 2, 12)]
        del big
        more = [torch.ones(n * 256 * 1024) for n in (4, 16)]
        del blocks, more
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def run_script(tuning: str) -> dict:
    env = {**os.environ, "CVFP_MALLOC_TUNING": tuning, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tuned_allocator_reuses_freed_memory_without_page_faults():
    tuned = run_script("1")
    assert tuned["applied"] is True
    # after the first round every block comes back from the heap: no page is faulted in again
    # (a 40 MB round faults in over 10,000 pages when the memory went back to the kernel)
    assert max(tuned["faults"][1:]) < 500, tuned


def test_allocator_tuning_can_be_turned_off():
    assert run_script("0")["applied"] is False
