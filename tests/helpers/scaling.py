"""Stand-ins of the ``cvfp scaling`` tests: settings over the shipped configs, a fake training runner."""

from __future__ import annotations

import json
from pathlib import Path

from cvfp_lightning.experiments.scaling_law import ScalingSettings
from helpers.cli import CONFIGS


def scaling_settings(tmp_path, **kwargs) -> ScalingSettings:
    options = {"sizes": [10, 20, 40], "out_dir": tmp_path / "out", "phase1_config": CONFIGS / "phase1.yaml",
               "phase2_config": CONFIGS / "phase2.yaml", "overrides": {}, "phase1_overrides": {},
               "phase2_overrides": {}}
    options.update(kwargs)
    return ScalingSettings(**options)


class FakeRunner:
    """Stands in for :func:`run_fit`: records the calls, returns plausible metrics, can fail on one run."""

    def __init__(self, fail_on: tuple[int, str] | None = None):
        self.calls: list[tuple[int, str, list[str]]] = []
        self.fail_on = fail_on

    def __call__(self, kind: str, args: list[str]) -> dict:
        size = int(next(a for a in args if a.startswith("--data.init_args.train_samples=")).split("=")[1])
        logger = json.loads(args[-1].split("=", 1)[1])["init_args"]
        run = logger["version"]
        run_dir = Path(logger["save_dir"]) / logger["name"] / run
        assert not run_dir.exists(), "an unfinished run's folder is cleared before it runs again"
        run_dir.mkdir(parents=True)
        self.calls.append((size, run, args))
        if self.fail_on == (size, run):
            raise KeyboardInterrupt  # interrupted mid-run: no record
        tokens = 100 * size
        if kind == "phase1":
            ckpt = run_dir / "checkpoints" / "last.ckpt"
            ckpt.parent.mkdir()
            ckpt.write_bytes(b"weights")
            return {"checkpoint": str(ckpt), "iterations": 6, "effective_rank_pct": 60.0, "train_tokens": tokens,
                    "val_tokens": 10}
        return {"val/ppl": 900.0 * tokens ** -0.35, "val/acc": 0.2, "val/loss": 1.0, "train_tokens": tokens,
                "val_tokens": 10, "trainable_params": 4321, "best_epoch": 1}
