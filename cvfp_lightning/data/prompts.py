"""Generation prompts as data: the texts ``cvfp predict`` continues, and their batches."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cvfp_lightning.errors import CVFPUserError, check


def read_prompts(prompts: list[str] | str | None = None, prompt_file: str | None = None) -> list[str]:
    """``prompts`` (a string or a list of them) followed by the non-empty lines of ``prompt_file``.

    Raises CVFPUserError (one line) for an empty prompt, a missing or non-UTF-8 file, or a
    file that holds no prompt.
    """
    out = [prompts] if isinstance(prompts, str) else list(prompts or [])
    for k, p in enumerate(out):
        check(isinstance(p, str) and p.strip() != "", f"model.prompts[{k}]={p!r} is empty: give some text to continue.")
    if prompt_file:
        path = Path(prompt_file).expanduser()
        check(path.is_file(), f"model.prompt_file={prompt_file!r} does not exist: give a UTF-8 text file with "
                              "one prompt per line.")
        try:
            lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise CVFPUserError(f"model.prompt_file={prompt_file!r} is not UTF-8 text ({exc.reason}).") from None
        check(len(lines) > 0, f"model.prompt_file={prompt_file!r} holds no prompt (only empty lines): "
                              "write one prompt per line.")
        out += lines
    return out


def prompt_loader(prompts: list[str], tokenizer) -> DataLoader:
    """One batch per prompt: ``{"prompt": str, "ids": (T,) int64}``, encoded with ``tokenizer``."""
    check(tokenizer is not None, "generation needs a tokenizer: use a text data module (data.tokenizer).")
    check(len(prompts) > 0, "cvfp predict has no prompt: pass --model.prompts '[\"Some text\"]' or "
                            "--model.prompt_file prompts.txt (one prompt per line).")
    items = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        check(len(ids) > 0, f"prompt {k} ({prompt!r}) gives no tokens: give some text to continue.")
        items.append({"prompt": prompt, "ids": torch.tensor(ids, dtype=torch.long)})
    return DataLoader(items, batch_size=None, shuffle=False)
