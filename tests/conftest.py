"""Shared fixtures: offline hub, a private token cache, tiny corpora, a CLI runner."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    os.environ["CVFP_CACHE_DIR"] = str(tmp_path_factory.mktemp("cvfp_cache"))
    import torch

    torch.set_num_threads(1)  # tiny models: one thread is faster and steadier on a shared 2-core machine
    yield


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A small English text file: 40 paragraphs of the bundled corpus."""
    text = (ROOT / "cvfp_lightning" / "data" / "bundled" / "pydoc_topics.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()][:40]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(p[:1500] for p in paragraphs) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def ultrachat_jsonl(tmp_path) -> Path:
    path = tmp_path / "ultrachat.jsonl"
    rows = []
    for i in range(12):
        rows.append({"prompt": f"q{i}", "prompt_id": str(i), "messages": [
            {"role": "user", "content": f"What is the number {i} in words, and why does it matter?"},
            {"role": "assistant", "content": f"The number {i} is written out as a word. It matters because "
                                              "counting is the start of arithmetic."}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


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
