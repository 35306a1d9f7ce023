"""``GenerationWriter``: print the continuations of ``cvfp predict`` and write ``generations.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from cvfp_lightning.io import atomic_write_text


class GenerationWriter(BasePredictionWriter):
    """Decode every prediction ``{"prompt", "ids"}`` with the data module's tokenizer, print it and
    write one JSON line per prompt (``prompt``, ``continuation``, ``new_tokens``, ``ids``) to
    ``generations.jsonl`` in the run folder (rank 0; no file without a logger).
    ``cvfp`` adds it to every ``predict`` of a next-token model.
    """

    def __init__(self):
        super().__init__(write_interval="epoch")
        self.generations: list[dict] = []

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        tokenizer = trainer.datamodule.tokenizer
        self.generations = []
        for p in predictions:
            ids = p["ids"].tolist()
            self.generations.append({"prompt": p["prompt"], "continuation": tokenizer.decode(
                ids, clean_up_tokenization_spaces=False), "new_tokens": len(ids), "ids": ids})
        if not trainer.is_global_zero:
            return
        for g in self.generations:
            print(f"--- prompt: {g['prompt']!r} ({g['new_tokens']} new tokens)\n{g['prompt']}{g['continuation']}\n",
                  flush=True)
        if trainer.loggers:
            path = Path(trainer.log_dir) / "generations.jsonl"
            atomic_write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in self.generations), path)
            rank_zero_info(f"{type(pl_module).__name__}: {len(self.generations)} continuations written to {path}")
