"""Where every benchmark script writes its report: ``benchmarks/results/<name>_<date>.json``."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def host() -> dict:
    """The CPU the numbers came from: its model, the kernels torch picked for it (AVX2 / AVX512 / ...)
    and torch's thread count. CPU numbers are bit-identical only on the same kernels and threads."""
    import torch

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor() or platform.machine(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


def write_report(name: str, report: dict) -> Path:
    """Write ``report`` as ``results/<name>_<YYYYmmdd_HHMMSS>.json``; say where on stderr."""
    RESULTS.mkdir(exist_ok=True)
    report = {**report, "host": report.get("host") or host()}
    out = RESULTS / f"{name}_{time.strftime('%Y%m%d_%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return out
