"""Text sources: plain text files (and the bundled corpus), UltraChat, synthetic ids.

All text goes through ``datasets.load_dataset`` and the shared tokenise/cache/split code
of :class:`~cvfp_lightning.data.base.TokenDataModule`; synthetic ids go into the same
memory-mapped token cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch

from cvfp_lightning.data.base import TokenDataModule, held_out
from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.data.token_cache import TokenCacheWriter
from cvfp_lightning.data.tokenizer import bundled_data_dir
from cvfp_lightning.errors import CVFPUserError, check, check_positive
from cvfp_lightning.io import file_sha256

ULTRACHAT = "HuggingFaceH4/ultrachat_200k"
BLOCK = 1 << 20  # synthetic ids drawn at a time


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
            text, shipped in the package as ``cvfp_lightning/data/bundled/pydoc_topics.txt``,
            one topic per paragraph).
        val_paths: text files of the validation split (then ``val_fraction`` is not used
            and all of ``paths`` trains); None: the held-out ``val_fraction`` of ``paths``.
        test_paths: text files of the test split (then ``test_fraction`` is not used);
            None: the held-out ``test_fraction`` of ``paths`` (none when it is 0).
        sample_by: ``paragraph`` (blank-line separated, default), ``line`` or ``document``.
        **kwargs: see :class:`TokenDataModule`.
    """

    def __init__(self, paths: list[str] | str | None = None,
                 sample_by: Literal["paragraph", "line", "document"] = "paragraph",
                 val_paths: list[str] | str | None = None, test_paths: list[str] | str | None = None, **kwargs):
        check(sample_by in ("paragraph", "line", "document"),
              f"data.sample_by={sample_by!r} is unknown: expected paragraph, line or document.")
        paths, val_paths, test_paths = ([p] if isinstance(p, str) else p for p in (paths, val_paths, test_paths))
        for name, given in (("paths", paths), ("val_paths", val_paths), ("test_paths", test_paths)):
            if given is not None:
                check(len(given) > 0, f"data.{name} is an empty list: give text files (--data.init_args.{name} "
                                      f"'[my.txt]'), or null "
                                      f"{'for the bundled corpus' if name == 'paths' else 'to hold them out of data.paths'}.")
        check(not (val_paths and kwargs.get("val_subset_of_train")),
              "data.val_subset_of_train=true takes validation from the training data: drop data.val_paths or set it "
              "to false.")
        self.paths = [str(p) for p in paths] if paths is not None else None
        self.val_paths = [str(p) for p in val_paths] if val_paths else None
        self.test_paths = [str(p) for p in test_paths] if test_paths else None
        self.sample_by = sample_by
        super().__init__(**kwargs)
        self._files = {"main": _check_files(self.paths, "data file") if self.paths
                       else [bundled_data_dir() / "pydoc_topics.txt"]}
        for source, given in (("val", self.val_paths), ("test", self.test_paths)):
            if given:
                self._files[source] = _check_files(given, f"{source} data file")

    def extra_sources(self) -> tuple[str, ...]:
        return tuple(s for s in ("val", "test") if s in self._files)

    def describe(self, source: str = "main") -> str:
        return f"text files {[str(f) for f in self._files[source]]}"

    def source_key(self, source: str = "main") -> dict:
        return {"kind": "text", "sample_by": self.sample_by,
                "files": [[str(f.resolve()), file_sha256(f)] for f in self._files[source]]}

    def load_texts(self, source: str = "main"):
        import datasets

        files = self._files[source]
        for f in files:  # undecodable bytes give a clear message, not a builder traceback
            with open(f, "rb") as handle:
                for lineno, line in enumerate(handle, 1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise CVFPUserError(f"data file {str(f)!r} is not UTF-8 text (line {lineno}: {exc.reason}): "
                                            "convert it to UTF-8 (e.g. iconv -t utf-8).") from None
        try:
            ds = datasets.load_dataset("text", data_files=[str(f) for f in files], split="train",
                                       sample_by=self.sample_by)
        except Exception as exc:  # noqa: BLE001 - datasets wraps builder errors in many types
            raise CVFPUserError(f"could not read {self.describe(source)}: {_first_line(exc)}") from exc
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
        test_split: the hub split read as the test split (``test_sft``) when the data comes
            from the hub and ``test_fraction`` is 0; None: no hub test split.
        test_files: local JSONL file(s) of the test split (instead of ``test_split``).
        test_samples: first N rows of ``test_split``; None: as many as the validation split
            holds out of ``num_samples`` (all rows when ``num_samples`` is None).
    """

    def __init__(self, dataset: str = ULTRACHAT, split: str = "train_sft",
                 data_files: list[str] | str | None = None, num_samples: int | None = 500,
                 tokenizer: str | None = "gpt2", test_split: str | None = "test_sft",
                 test_files: list[str] | str | None = None, test_samples: int | None = None, **kwargs):
        data_files, test_files = ([p] if isinstance(p, str) else p for p in (data_files, test_files))
        if test_samples is not None:
            check_positive("data.test_samples", test_samples)
        self.dataset, self.split, self.test_split, self.test_samples = dataset, split, test_split, test_samples
        self.data_files = [str(p) for p in data_files] if data_files else None
        self.test_files = [str(p) for p in test_files] if test_files else None
        super().__init__(tokenizer=tokenizer, num_samples=num_samples, **kwargs)
        self._files = _check_files(self.data_files, "data file") if self.data_files else None
        self._test_files = _check_files(self.test_files, "test data file") if self.test_files else None

    def _hub_test(self) -> bool:
        return self._files is None and self._test_files is None and bool(self.test_split) and self.test_fraction == 0

    def _test_rows(self) -> int | None:
        if self.test_samples is not None:
            return self.test_samples
        return held_out(self.num_samples, self.val_fraction) if self.num_samples else None

    def extra_sources(self) -> tuple[str, ...]:
        return ("test",) if self._test_files or self._hub_test() else ()

    def describe(self, source: str = "main") -> str:
        if source == "test":
            return f"JSONL {self.test_files}" if self._test_files else f"hub dataset {self.dataset}[{self.test_split}]"
        return f"JSONL {self.data_files}" if self.data_files else f"hub dataset {self.dataset}[{self.split}]"

    def source_key(self, source: str = "main") -> dict:
        files = self._test_files if source == "test" else self._files
        if files:
            return {"kind": "ultrachat-json", "files": [[str(f.resolve()), file_sha256(f)] for f in files]}
        if source == "test":
            return {"kind": "ultrachat-hub", "dataset": self.dataset, "split": self.test_split,
                    "rows": self._test_rows()}
        return {"kind": "ultrachat-hub", "dataset": self.dataset, "split": self.split}

    def load_texts(self, source: str = "main"):
        import datasets

        files = self._test_files if source == "test" else self._files
        try:
            if files:
                ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
            else:
                split, rows = (self.test_split, self._test_rows()) if source == "test" else (self.split, self.num_samples)
                ds = datasets.load_dataset(self.dataset, split=f"{split}[:{rows}]" if rows else split)
        except Exception as exc:  # noqa: BLE001
            hint = ("pass --data.data_files with a local JSONL copy, or allow hub access (unset HF_DATASETS_OFFLINE)"
                    if not files else "check the file is JSON Lines with a 'messages' list per row")
            raise CVFPUserError(f"could not load {self.describe(source)} ({_first_line(exc)}): {hint}.") from exc
        check("messages" in ds.column_names,
              f"{self.describe(source)} has no 'messages' column (columns: {ds.column_names}): expected UltraChat "
              "rows with a list of {{role, content}} messages.")

        def join(batch):
            texts = []
            for messages in batch["messages"]:
                check(isinstance(messages, list),
                      f"{self.describe(source)}: a 'messages' value is {type(messages).__name__}, expected a list.")
                texts.append("\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m)
                                       for m in messages))
            return {"text": texts}

        ds = ds.map(join, batched=True, remove_columns=ds.column_names, load_from_cache_file=False)
        return ds.filter(lambda row: bool(row["text"].strip()))


class SyntheticTokensDataModule(TokenDataModule):
    """Token ids drawn uniformly from ``[0, vocab_size)`` with a fixed RNG seed (no tokenizer).

    The performance reference workload: 6400 train ids and 1280 validation ids from a
    vocabulary of 50257, RNG seed 42, one stream. ``samples`` mode cuts the train ids into
    sequences of ``max_seq_len``. The ids are drawn once, in blocks (the same ids as one
    draw), into the memory-mapped token cache: train, validation and ``test_tokens`` test
    ids, in that order, three samples of one array.
    """

    def __init__(self, vocab_size: int = 50257, num_tokens: int = 6400, val_tokens: int = 1280, seed: int = 42,
                 test_tokens: int = 0, **kwargs):
        for name, value in (("vocab_size", vocab_size), ("num_tokens", num_tokens), ("val_tokens", val_tokens)):
            check_positive(f"data.{name}", value)
        check_positive("data.test_tokens", test_tokens, allow_zero=True)
        self._vocab, self.num_tokens, self.val_tokens, self.seed = vocab_size, num_tokens, val_tokens, seed
        self.test_tokens = test_tokens
        super().__init__(**kwargs)
        self.vocab_size = vocab_size

    def _load_tokenizer(self, name, trust_remote_code):
        return None

    def describe(self, source: str = "main") -> str:
        test = f"+{self.test_tokens}" if self.test_tokens else ""
        return f"synthetic ids ({self.num_tokens}+{self.val_tokens}{test} from {self._vocab}, seed {self.seed})"

    def cache_key(self, source: str | None = None) -> str:
        what = ("synthetic", self._vocab, self.num_tokens, self.val_tokens, self.seed)
        return hashlib.sha256(repr(what + ((self.test_tokens,) if self.test_tokens else ())).encode()).hexdigest()[:32]

    def tokenize(self, source: str = "main") -> Path:
        g = torch.Generator().manual_seed(self.seed)

        def draw(n: int):
            for start in range(0, n, BLOCK):
                yield torch.randint(0, self._vocab, (min(BLOCK, n - start),), generator=g).numpy()

        with TokenCacheWriter(self.cache_folder(), self.cache_key(), self._vocab, self.describe()) as writer:
            for n in (self.num_tokens, self.val_tokens, self.test_tokens):
                writer.add_blocks(draw(n), 0)
            return writer.commit()

    def _split(self, samples: TokenSequences, val=None, test=None):
        if self.sequences == "samples":
            check(self.max_seq_len is not None,
                  "data.sequences=samples with synthetic ids needs data.max_seq_len (the sequence length).")
        train = samples.select(0, 1)
        if self.val_subset_of_train:
            val = train.token_range(self.num_tokens - self.val_tokens, self.num_tokens, 0)
        else:
            val = samples.select(1, 2)
        return train, val, samples.select(2, 3) if samples.num_sequences > 2 else None
