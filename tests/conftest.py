"""Shared fixtures: offline hub, a private token cache, tiny corpora. Helpers live in ``tests/helpers/``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers.cli import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
