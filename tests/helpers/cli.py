"""The repository's paths, ``cvfp`` run in-process, its one-line user errors, and the TensorBoard scalars."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def run_cli(args: list[str]) -> None:
    """Run ``cvfp ARGS`` in-process (sys.argv patched, as LightningCLI expects)."""
    from cvfp_lightning.cli import main

    old = sys.argv
    sys.argv = ["cvfp", *args]
    try:
        main(list(args))
    finally:
        sys.argv = old


def cli_error(args: list[str], capsys) -> str:
    """Run ``cvfp ARGS`` expecting a user error: exit code 2 and one stderr line, returned."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All TensorBoard scalars under ``log_dir``: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out
