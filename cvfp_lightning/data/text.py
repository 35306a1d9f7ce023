"""Text sources: plain text files (and the bundled corpus), UltraChat, synthetic ids.

All text goes through ``datasets.load_dataset`` and the shared tokenise/cache/split code
of :class:`~cvfp_lightning.data.base.TokenDataModule`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch

from cvfp_lightning.data.base import TokenDataModule
from cvfp_lightning.data.tokenizer import bundled_data_dir
from cvfp_lightning.errors import CVFPUserError, check, check_positive
from cvfp_lightning.io import file_sha256

ULTRACHAT = "HuggingFaceH4/ultrachat_200k"


def _check_files(paths: list[str], what: str) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        check(path.is_file(), f"{what} {p!r} does not exist or is not a file: give paths to existing files.")
        check(path.stat().st_size > 0, f"{what} {p!r} is empty: give a file with text in it.")
        out.append(path)
    return out


def _first_line(exc: BaseException) -> str:
    cause = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    msg = str(cause).strip().splitlines()
    return (msg[0] if msg else type(cause).__name__)[:200]


class TextDataModule(TokenDataModule):
    """Plain UTF-8 text files, read with ``datasets.load_dataset("text", ...)``.

    Args:
        paths: text files; None means the bundled corpus (CPython's ``pydoc_data.topics``
            text, shipped as ``data/pydoc_topics.txt``, one topic per paragraph).
        sample_by: ``paragraph`` (blank-line separated, default), ``line`` or ``document``.
        **kwargs: see :class:`TokenDataModule`.
    """

    def __init__(self, paths: list[str] | str | None = None,
                 sample_by: Literal["paragraph", "line", "document"] = "paragraph", **kwargs):
        check(sample_by in ("paragraph", "line", "document"),
              f"data.sample_by={sample_by!r} is unknown: expected paragraph, line or document.")
        if isinstance(paths, str):
            paths = [paths]
        if paths is not None:
            check(len(paths) > 0, "data.paths is an empty list: give text files, or null for the bundled corpus.")
        self.paths = [str(p) for p in paths] if paths is not None else None
        self.sample_by = sample_by
        super().__init__(**kwargs)
        self._files = _check_files(self.paths, "data file") if self.paths else [bundled_data_dir() / "pydoc_topics.txt"]

    def describe(self) -> str:
        return f"text files {[str(f) for f in self._files]}"

    def source_key(self) -> dict:
        return {"kind": "text", "sample_by": self.sample_by,
                "files": [[str(f.resolve()), file_sha256(f)] for f in self._files]}

    def load_texts(self):
        import datasets

        for f in self._files:  # undecodable bytes give a clear message, not a builder traceback
            with open(f, "rb") as handle:
                for lineno, line in enumerate(handle, 1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise CVFPUserError(f"data file {str(f)!r} is not UTF-8 text (line {lineno}: {exc.reason}): "
                                            "convert it to UTF-8 (e.g. iconv -t utf-8).") from None
        try:
            ds = datasets.load_dataset("text", data_files=[str(f) for f in self._files], split="train",
                                       sample_by=self.sample_by)
        except Exception as exc:  # noqa: BLE001 - datasets wraps builder errors in many types
            raise CVFPUserError(f"could not read {self.describe()}: {_first_line(exc)}") from exc
        return ds.filter(lambda row: bool(row["text"].strip()))


class UltraChatDataModule(TokenDataModule):
    """UltraChat dialogues: text = ``"\\n".join(message contents)`` of each row.

    Args:
        dataset: hub name (``HuggingFaceH4/ultrachat_200k``) used when ``data_files`` is None.
        split: split of the hub dataset (``train_sft``).
        data_files: local JSONL file(s) of the same shape (a ``messages`` list of
            ``{"role", "content"}`` per row), read with ``load_dataset("json", ...)``.
        num_samples: first N rows (default 500, as in the seed documents' largest scaling point).
        tokenizer: default ``gpt2`` as in the seed documents.
    """

    def __init__(self, dataset: str = ULTRACHAT, split: str = "train_sft",
                 data_files: list[str] | str | None = None, num_samples: int | None = 500,
                 tokenizer: str | None = "gpt2", **kwargs):
        if isinstance(data_files, str):
            data_files = [data_files]
        self.dataset, self.split = dataset, split
        self.data_files = [str(p) for p in data_files] if data_files else None
        super().__init__(tokenizer=tokenizer, num_samples=num_samples, **kwargs)
        self._files = _check_files(self.data_files, "data file") if self.data_files else None

    def describe(self) -> str:
        return f"JSONL {self.data_files}" if self.data_files else f"hub dataset {self.dataset}[{self.split}]"

    def source_key(self) -> dict:
        if self._files:
            return {"kind": "ultrachat-json", "files": [[str(f.resolve()), file_sha256(f)] for f in self._files]}
        return {"kind": "ultrachat-hub", "dataset": self.dataset, "split": self.split}

    def load_texts(self):
        import datasets

        try:
            if self._files:
                ds = datasets.load_dataset("json", data_files=[str(f) for f in self._files], split="train")
            else:
                split = f"{self.split}[:{self.num_samples}]" if self.num_samples else self.split
                ds = datasets.load_dataset(self.dataset, split=split)
        except Exception as exc:  # noqa: BLE001
            hint = ("pass --data.data_files with a local JSONL copy, or allow hub access (unset HF_DATASETS_OFFLINE)"
                    if not self._files else "check the file is JSON Lines with a 'messages' list per row")
            raise CVFPUserError(f"could not load {self.describe()} ({_first_line(exc)}): {hint}.") from exc
        check("messages" in ds.column_names,
              f"{self.describe()} has no 'messages' column (columns: {ds.column_names}): expected UltraChat rows "
              "with a list of {{role, content}} messages.")

        def join(batch):
            texts = []
            for messages in batch["messages"]:
                check(isinstance(messages, list),
                      f"{self.describe()}: a 'messages' value is {type(messages).__name__}, expected a list.")
                texts.append("\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m)
                                       for m in messages))
            return {"text": texts}

        ds = ds.map(join, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                    keep_in_memory=True)
        return ds.filter(lambda row: bool(row["text"].strip()))


class SyntheticTokensDataModule(TokenDataModule):
    """Token ids drawn uniformly from ``[0, vocab_size)`` with a fixed RNG seed (no tokenizer).

    The performance reference workload: 6400 train ids and 1280 validation ids from a
    vocabulary of 50257, RNG seed 42, one stream. ``samples`` mode cuts the train ids into
    sequences of ``max_seq_len``.
    """

    def __init__(self, vocab_size: int = 50257, num_tokens: int = 6400, val_tokens: int = 1280, seed: int = 42,
                 **kwargs):
        for name, value in (("vocab_size", vocab_size), ("num_tokens", num_tokens), ("val_tokens", val_tokens)):
            check_positive(f"data.{name}", value)
        self._vocab, self.num_tokens, self.val_tokens, self.seed = vocab_size, num_tokens, val_tokens, seed
        super().__init__(**kwargs)
        self.vocab_size = vocab_size

    def _load_tokenizer(self, name, trust_remote_code):
        return None

    def describe(self) -> str:
        return f"synthetic ids ({self.num_tokens}+{self.val_tokens} from {self._vocab}, seed {self.seed})"

    def cache_key(self) -> str:
        return hashlib.sha256(repr(("synthetic", self._vocab, self.num_tokens, self.val_tokens, self.seed))
                              .encode()).hexdigest()[:32]

    def prepare_data(self) -> None:
        pass

    def load_tokens(self) -> dict:
        g = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(0, self._vocab, (self.num_tokens + self.val_tokens,), generator=g)
        return {"ids": ids, "lengths": torch.tensor([self.num_tokens, self.val_tokens]),
                "nbytes": torch.zeros(2, dtype=torch.long)}

    def _split(self, samples, nbytes):
        train, val = samples
        if self.sequences == "samples":
            check(self.max_seq_len is not None,
                  "data.sequences=samples with synthetic ids needs data.max_seq_len (the sequence length).")
        if self.val_subset_of_train:
            val = train[-self.val_tokens:]
        return [train], [val], 0, 0
