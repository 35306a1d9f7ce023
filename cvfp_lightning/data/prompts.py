"""Generation prompts as data: the texts ``cvfp predict`` continues, and their batches."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cvfp_lightning.errors import CVFPUserError, check


def _named(option: str, value, index: int | None = None) -> str:
    """How a message names a value: ``model.prompts[0]='x'`` for a config key, ``--prompt 'x' (prompt 0)`` for a flag."""
    if option.startswith("--"):
        return f"{option} {value!r}" + (f" (prompt {index})" if index is not None else "")
    return f"{option}{'' if index is None else f'[{index}]'}={value!r}"


def read_prompts(prompts: list[str] | str | None = None, prompt_file: str | None = None,
                 names: tuple[str, str] = ("model.prompts", "model.prompt_file")) -> list[str]:
    """``prompts`` (a string or a list of them) followed by the non-empty lines of ``prompt_file``
    (``-``: standard input).

    Raises CVFPUserError (one line, naming the options ``names``) for an empty prompt, a
    missing or non-UTF-8 file, or a file that holds no prompt.
    """
    option, file_option = names
    out = [prompts] if isinstance(prompts, str) else list(prompts or [])
    for k, p in enumerate(out):
        check(isinstance(p, str) and p.strip() != "", f"{_named(option, p, k)} is empty: give some text to continue.")
    if prompt_file:
        if prompt_file == "-":
            raw = sys.stdin.buffer.read()
        else:
            path = Path(prompt_file).expanduser()
            check(path.is_file(), f"{_named(file_option, prompt_file)} does not exist: give a UTF-8 text file with "
                                  "one prompt per line, or - for standard input.")
            raw = path.read_bytes()
        try:
            lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise CVFPUserError(f"{_named(file_option, prompt_file)} is not UTF-8 text ({exc.reason}).") from None
        check(len(lines) > 0, f"{_named(file_option, prompt_file)} holds no prompt (only empty lines): "
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
