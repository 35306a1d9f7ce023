"""Run every DDP test N times in a row, each time in a fresh pytest process, and count.

A test that fails one run in a few is a failing test: this is the evidence that the DDP
tests (``tests/cli/test_ddp.py``: two CPU processes against one, through ``cvfp ...
--trainer.strategy ddp``) pass every time on this machine. No retries, no skips: a run
counts as passed only when pytest exits 0 with every test passed.

    python benchmarks/ddp_repeat.py [--runs 10] [-k EXPR]

Prints one line per run and the count; writes ``results/ddp_repeat_<time>.json`` with the
machine's load averages, each run's seconds, exit code and pytest summary line, and the
output tail of failed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("-k", default=None, help="pytest -k expression (default: every DDP test)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cli/test_ddp.py"]
    if args.k:
        cmd += ["-k", args.k]
    runs, start = [], time.time()
    for i in range(1, args.runs + 1):
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.time() - t0
        lines = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
        summary = lines[-1].strip("= ") if lines else "no pytest summary"
        ok = proc.returncode == 0 and "failed" not in summary and "error" not in summary
        runs.append({"run": i, "seconds": round(seconds, 1), "returncode": proc.returncode, "summary": summary,
                     "passed": ok, **({} if ok else {"output_tail": (proc.stdout + proc.stderr)[-6000:]})})
        print(f"run {i}/{args.runs}: {'passed' if ok else 'FAILED'} in {seconds:.0f} s ({summary})", flush=True)
    passed = sum(r["passed"] for r in runs)
    total = time.time() - start
    print(f"DDP tests: {passed}/{args.runs} runs passed, {total / 60:.1f} min in all")
    report = {"command": " ".join(cmd), "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
              "runs_passed": passed, "runs": runs, "total_s": round(total, 1)}
    out = HERE / "results" / f"ddp_repeat_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
