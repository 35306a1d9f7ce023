"""Where every benchmark script writes its report: ``benchmarks/results/<name>_<date>.json``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(name: str, report: dict) -> Path:
    """Write ``report`` as ``results/<name>_<YYYYmmdd_HHMMSS>.json``; say where on stderr."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return out
