"""The CPU allocator settings applied by the ``cvfp`` entry points (cvfp_lightning.runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Allocates and frees 100 MB blocks (like Phase 2's logits and their gradients) and reports
# the minor page faults of each round; the first rounds fault (fresh memory, heap growth).
SCRIPT = r"""
import json, resource, sys, torch
from cvfp_lightning.runtime import tune_cpu_allocator
applied = tune_cpu_allocator()
faults = []
for _ in range(6):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        logits = torch.ones(25 * 1024 * 1024)
        grad = torch.ones(25 * 1024 * 1024)
        del logits, grad
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
    tuned, untuned = run_script("1"), run_script("0")
    assert tuned["applied"] is True and untuned["applied"] is False
    # untuned, every 100 MB block is mapped fresh and faulted in page by page (6 x 25,600
    # pages a round); tuned, once the heap has grown (a few rounds) every block is reused from it
    assert min(untuned["faults"][1:]) > 100_000, untuned
    assert max(tuned["faults"][-2:]) < 500, tuned
