"""Helpers of the Phase 2 / cache / baseline tests: tiny Phase 1 checkpoints, trainers, data."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import lightning as L
import torch

from cvfp_lightning.data import TextDataModule
from cvfp_lightning.modules import Phase1Parallel

SMALL_CONTEXT = {"updater": "residual", "context_dim": 16, "num_layers": 2, "token_input_all_layers": True}


def phase1_checkpoint(path: Path, vocab_size: int, context: dict | None = None, embedding: dict | None = None,
                      seed: int = 0) -> Path:
    """A Phase 1 checkpoint as Lightning writes it (state_dict + hyper_parameters), untrained."""
    torch.manual_seed(seed)
    module = Phase1Parallel(vocab_size=vocab_size, context=context or SMALL_CONTEXT,
                              embedding=embedding or {"embed_dim": 16})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}, path)
    return path


def text_data(corpus: Path, **kwargs) -> TextDataModule:
    """The corpus fixture as per-sample sequences with the bundled tokenizer (4096 ids)."""
    options = {"paths": [str(corpus)], "sequences": "samples", "max_seq_len": 128, "chunk_size": 512,
               "batch_size": 8, "seq_len": 128}
    options.update(kwargs)
    return TextDataModule(**options)


def trainer(**kwargs) -> L.Trainer:
    options = {"accelerator": "cpu", "max_epochs": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    options.update(kwargs)
    return L.Trainer(**options)


def unigram_ppl(train_ids: torch.Tensor, val_targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``val_targets`` of the add-one unigram model of ``train_ids``."""
    counts = Counter(train_ids.tolist())
    total = len(train_ids) + vocab_size
    nll = -sum(math.log((counts.get(t, 0) + 1) / total) for t in val_targets.tolist())
    return math.exp(nll / len(val_targets))
