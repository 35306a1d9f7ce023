"""``TokenDataModule``: tokenise once into a memory-mapped cache, split by views, batch for any module.

Subclasses say where the text comes from (:meth:`load_texts`, :meth:`source_key`). The
base class does the rest, the same way for every source:

1. ``prepare_data`` (local rank 0): texts -> ids with the tokenizer, streamed batch by
   batch from the ``datasets.Dataset`` into the token cache folder
   ``<cache_dir>/tokens/<key>/`` (:mod:`cvfp_lightning.data.token_cache`: ``ids.bin``
   uint16/uint32, sample offsets, UTF-8 bytes per sample; key = sha256 of source,
   tokenizer and options). One folder per source: the main source, plus the separate
   validation / test files a subclass may have (:meth:`extra_sources`).
2. ``setup``: opens the caches (checked; a broken one is rebuilt with the reason in a
   warning) and splits the samples into train / validation / test (:meth:`_split`),
   then arranges each split as one stream (the seed documents') or per-sample sequences. Every split and
   arrangement is a view of the memory-mapped ids with its own offsets. Exposes
   ``train_sequences`` / ``val_sequences`` / ``test_sequences`` (:class:`TokenSequences`;
   ``test_sequences`` is None without a test split) and :meth:`split`.
3. Dataloaders in the layout the LightningModule names in the handshake
   :meth:`TokenDataModule.connect` (called from its ``setup``): ``shard_chunks`` (each
   rank's own positions in in-order chunks, Phase 1), ``position_chunks`` (in-order chunks
   dealt over ranks), ``positions`` (shuffled positions, Phase 2), ``windows``
   (``(B, T)`` windows, baselines) or ``streams`` (B lanes advancing window by window with
   their contexts carried, end-to-end Phase 2: :mod:`cvfp_lightning.data.streams`); the
   predict loader serves the prompts it passes.

Memory per rank, N tokens in S samples: the ids are memory-mapped (0 B/token anonymous,
2 or 4 B/token of shared page cache), offsets and byte counts 16 B per sample per split;
loaders add what :mod:`cvfp_lightning.data.sequences` lists (at most 4 B/token, the
shuffled order of Phase 2's positions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from cvfp_lightning.data.prompts import prompt_loader
from cvfp_lightning.data.shards import ShardChunks
from cvfp_lightning.data.sequences import (PositionChunks, PositionCollate, PositionIndex, TokenSequences, Windows,
                                           shuffled_sampler)
from cvfp_lightning.data.snapshot import SNAPSHOT_KEY, data_snapshot
from cvfp_lightning.data.streams import stream_loader
from cvfp_lightning.data.token_cache import META, TokenCacheWriter, read_token_cache
from cvfp_lightning.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from cvfp_lightning.data.tokenizer_fit import fitted_tokenizer, training_spec
from cvfp_lightning.errors import CVFPUserError, check, check_fraction, check_positive
from cvfp_lightning.progress import task

log = logging.getLogger(__name__)

SequenceMode = Literal["stream", "samples"]
SplitName = Literal["train", "val", "test"]
SPLITS = ("train", "val", "test")
LAYOUTS = ("shard_chunks", "position_chunks", "positions", "windows", "streams")
CACHE_VERSION = 2
TOKENIZE_BATCH = 1000  # samples per tokenizer call while streaming into the cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("CVFP_CACHE_DIR", Path.home() / ".cache" / "cvfp_lightning"))


def quiet_datasets() -> None:
    """No datasets progress bars on stderr: Lightning's bar and our log lines say enough."""
    import datasets

    datasets.disable_progress_bars()


def held_out(count: int, fraction: float) -> int:
    """Items held out for a fraction > 0 of ``count``: the rounded share, at least 1."""
    return max(1, round(fraction * count)) if fraction > 0 else 0


class _RowRange:
    """Rows ``start .. stop - 1`` of a text dataset, split by :meth:`TokenDataModule._split` like token samples."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    @property
    def num_sequences(self) -> int:
        return self.stop - self.start

    def select(self, start: int, stop: int) -> "_RowRange":
        return _RowRange(self.start + start, self.start + stop)


class TokenDataModule(L.LightningDataModule):
    """Base class of the text data modules.

    Args:
        tokenizer: HF hub name, local folder, None for the bundled tokenizer, or
            ``{train: {vocab_size: N}}``: a byte-level BPE fitted on the training split
            (:mod:`cvfp_lightning.data.tokenizer_fit`; fitted, or read from the cache, on
            first use of :attr:`tokenizer`).
        sequences: ``stream`` (all samples concatenated into one sequence, the seed documents'
            layout) or ``samples`` (one sequence per sample; the context restarts at 0).
        num_samples: use only the first N samples (rows) of the source; None: all.
        train_samples: after the split, train on only the first N training samples while the
            validation samples stay the same (a fixed validation set across data sizes, as
            the scaling experiment needs); None: all.
        val_fraction: share of samples held out for validation. With a single sample the
            tail tokens are held out instead. Ignored when the subclass reads validation
            from its own files.
        test_fraction: share of samples held out for the test split (0: no test split
            unless the subclass reads test files; ``cvfp test`` then evaluates the
            validation split). The main source is laid out ``[train | validation | test]``:
            with ``test_fraction`` 0 the validation split is the tail, as before.
        val_subset_of_train: the seed documents' option: validation is the tail of the training
            data (not held out); a test split stays held out.
        max_seq_len: ``samples`` mode: split longer samples into pieces of this length.
        add_eos: append the tokenizer's EOS id to every sample (a separator in streams).
        chunk_size: positions per batch for position layouts.
        batch_size: windows per batch for the window layout; lanes per rank for the streams layout.
        seq_len: window length for the window and streams layouts.
        num_workers: DataLoader workers.
        cache_dir: token cache folder; default ``$CVFP_CACHE_DIR`` or
            ``~/.cache/cvfp_lightning``.
        trust_remote_code: passed to the tokenizer loader; off by default.

    Bytes (``num_bytes`` of each split, the denominator of bits per byte): the exact UTF-8
    byte count of the text of the split's samples. When a single sample is split by tokens
    (one document, or the seed's synthetic streams), each part gets the share of the
    sample's bytes proportional to its tokens, rounded (train gets the remainder).
    """

    def __init__(self, tokenizer: str | dict | None = None, sequences: SequenceMode = "stream",
                 num_samples: int | None = None, train_samples: int | None = None, val_fraction: float = 0.1,
                 test_fraction: float = 0.0, val_subset_of_train: bool = False,
                 max_seq_len: int | None = None, add_eos: bool = True, chunk_size: int = 4096,
                 batch_size: int = 16, seq_len: int = 128, num_workers: int = 0, cache_dir: str | None = None,
                 trust_remote_code: bool = False):
        super().__init__()
        check(sequences in ("stream", "samples"),
              f"data.sequences={sequences!r} is unknown: expected stream or samples.")
        if num_samples is not None:
            check_positive("data.num_samples", num_samples)
        if train_samples is not None:
            check_positive("data.train_samples", train_samples)
        check_fraction("data.val_fraction", val_fraction, closed=False)
        check(0.0 <= test_fraction < 1.0, f"data.test_fraction={test_fraction!r} is invalid: expected a value in "
                                          "[0, 1) (0: no held-out test split).")
        check(val_fraction + test_fraction < 1.0,
              f"data.val_fraction={val_fraction!r} + data.test_fraction={test_fraction!r} leaves nothing to train "
              "on: expected a sum below 1.")
        if max_seq_len is not None:
            check_positive("data.max_seq_len", max_seq_len)
        for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size), ("seq_len", seq_len)):
            check_positive(f"data.{name}", value)
        check_positive("data.num_workers", num_workers, allow_zero=True)
        self.tokenizer_name = tokenizer
        self.sequences, self.num_samples, self.train_samples = sequences, num_samples, train_samples
        self.val_fraction, self.test_fraction, self.val_subset_of_train = val_fraction, test_fraction, val_subset_of_train
        self.max_seq_len, self.add_eos = max_seq_len, add_eos
        self.chunk_size, self.batch_size, self.seq_len = chunk_size, batch_size, seq_len
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._tokenizer_fit = training_spec(tokenizer)
        self._tokenizer = None if self._tokenizer_fit else self._load_tokenizer(tokenizer, trust_remote_code)
        self._vocab_size: int | None = None
        self.train_sequences: TokenSequences | None = None
        self.val_sequences: TokenSequences | None = None
        self.test_sequences: TokenSequences | None = None
        self.layout = "position_chunks"  # set by connect()
        self.history = 0  # set by connect()
        self.prompts: list[str] = []

    def connect(self, layout: str, prompts: list[str] | None = None, history: int = 0) -> None:
        """The handshake with the module (litgpt's ``DataModule.connect``), from its ``setup``.

        Args:
            layout: the batch layout it trains and evaluates on (:data:`LAYOUTS`).
            prompts: the texts ``cvfp predict`` continues (the predict loader's items).
            history: ids before each position that position batches carry (``"history" (n, K)``,
                :meth:`~cvfp_lightning.data.sequences.TokenSequences.position_batch`); 0: none.
        """
        check(layout in LAYOUTS, f"data layout {layout!r} is unknown: expected one of {', '.join(LAYOUTS)}.")
        self.layout = layout
        self.prompts = list(prompts or [])
        self.history = int(history)

    @property
    def tokenizer(self):
        """The tokenizer. One to fit (``{train: ...}``) is fitted, or read from the cache, on first
        use: by then the subclass knows its texts."""
        if self._tokenizer is None and self._tokenizer_fit is not None:
            what = f"the training split of {self.describe()}"
            self._tokenizer = fitted_tokenizer(lambda: (t for b in self.train_texts().iter(batch_size=TOKENIZE_BATCH)
                                                        for t in b["text"]), self._tokenizer_fit, self.cache_dir, what)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    @property
    def vocab_size(self) -> int:
        """Ids of the tokenizer (a subclass without one sets it)."""
        if self._vocab_size is not None:
            return self._vocab_size
        return len(self.tokenizer) if self.tokenizer is not None else 0

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self._vocab_size = int(value)

    # ---- hooks for subclasses -------------------------------------------------------
    def _load_tokenizer(self, name: str | None, trust_remote_code: bool):
        return load_tokenizer(name, trust_remote_code=trust_remote_code)

    def load_texts(self, source: str = "main"):
        """Return a ``datasets.Dataset`` with a ``text`` column (one row = one sample) of ``source``."""
        raise NotImplementedError

    def source_key(self, source: str = "main") -> dict:
        """What identifies ``source`` (paths and their hashes, dataset name, split...)."""
        raise NotImplementedError

    def extra_sources(self) -> tuple[str, ...]:
        """Splits read from their own source instead of held out of the main one: some of ``val``, ``test``."""
        return ()

    def describe(self, source: str = "main") -> str:
        return type(self).__name__

    # ---- tokenisation and cache -----------------------------------------------------
    def cache_key(self, source: str | None = None) -> str:
        """Key of ``source``'s token cache; with no source, of all the module's token data."""
        if source is None:
            extra = self.extra_sources()
            if not extra:
                return self.cache_key("main")
            keys = {s: self.cache_key(s) for s in ("main", *extra)}
            return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:32]
        payload = {"version": CACHE_VERSION, "source": self.source_key(source), "add_eos": self.add_eos,
                   "num_samples": self.num_samples if source == "main" else None,
                   "tokenizer": tokenizer_fingerprint(self.tokenizer)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def cache_folder(self, source: str = "main") -> Path:
        return self.cache_dir / "tokens" / self.cache_key(source)

    def cache_path(self, source: str = "main") -> Path:
        """The cache's ``meta.json``: written last, its presence marks a complete cache."""
        return self.cache_folder(source) / META

    def tokenize(self, source: str = "main") -> Path:
        """Tokenise ``source`` into its token cache folder, one batch of samples at a time.

        The texts are read with ``Dataset.iter`` (Arrow, memory-mapped) and each batch's ids
        go straight into ``ids.bin``: a ``Dataset.map`` would first write all ids again as
        an Arrow column of int64 lists, and no list of all ids is ever held.
        """
        quiet_datasets()
        ds = self.load_texts(source)
        what = self.describe(source)
        check(len(ds) > 0, f"the data source {what} holds no text: give a non-empty source.")
        if source == "main" and self.num_samples is not None:
            check(len(ds) >= self.num_samples,
                  f"data.num_samples={self.num_samples} but the source has only {len(ds)} samples: lower it.")
            ds = ds.select(range(self.num_samples))
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        log.info("tokenising %d samples of %s", len(ds), what)
        with TokenCacheWriter(self.cache_folder(source), self.cache_key(source), self.vocab_size, what) as writer, \
                task(f"tokenising {what}", total=len(ds), unit="samples") as bar:
            for batch in ds.iter(batch_size=TOKENIZE_BATCH):
                texts = batch["text"]
                ids = tok(texts, add_special_tokens=False)["input_ids"]
                if self.add_eos and eos is not None:
                    ids = [x + [eos] for x in ids]
                writer.add(ids, [len(t.encode("utf-8")) for t in texts])
                bar.advance(len(texts))
            check(writer.num_tokens >= 2,
                  f"the data source {what} holds no text after tokenisation: give a non-empty source.")
            folder = writer.commit()
        log.info("tokenised %s into %s", what, folder)
        return folder

    def prepare_data(self) -> None:
        for source in ("main", *self.extra_sources()):
            if not self.cache_path(source).exists():
                self.tokenize(source)

    def _open(self, source: str) -> TokenSequences:
        """``source``'s samples from its cache (built or rebuilt here when missing or broken)."""
        folder, key = self.cache_folder(source), self.cache_key(source)
        if (folder / META).exists():
            try:
                ids, offsets, nbytes = read_token_cache(folder, key)
                return TokenSequences(ids, offsets, nbytes=nbytes)
            except CVFPUserError as exc:
                log.warning("%s; re-tokenising", exc)
        self.tokenize(source)
        ids, offsets, nbytes = read_token_cache(folder, key)
        return TokenSequences(ids, offsets, nbytes=nbytes)

    def load_tokens(self) -> TokenSequences | dict:
        """The main source's samples (a subclass may return ``{"ids", "lengths", "nbytes"}`` tensors)."""
        return self._open("main")

    @staticmethod
    def _as_samples(data: TokenSequences | dict) -> TokenSequences:
        if isinstance(data, TokenSequences):
            return data
        lengths = torch.as_tensor(data["lengths"]).long()
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        return TokenSequences(data["ids"], offsets, nbytes=data["nbytes"])

    # ---- split ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_sequences is not None:
            return
        samples = self._as_samples(self.load_tokens())
        extra = {source: self._open(source) for source in self.extra_sources()}
        train, val, test = self._split(samples, extra.get("val"), extra.get("test"))
        if self.train_samples is not None:
            check(self.train_samples <= train.num_sequences,
                  f"data.train_samples={self.train_samples} but the source has only {train.num_sequences} samples "
                  "for training after the validation split: lower it.")
            train = train.select(0, self.train_samples)
        self.train_sequences = self._arrange(train)
        self.val_sequences = self._arrange(val)
        self.test_sequences = self._arrange(test) if test is not None else None
        log.info("data: %d train tokens in %d sequences, %d val tokens in %d sequences%s",
                 self.train_sequences.num_tokens, self.train_sequences.num_sequences,
                 self.val_sequences.num_tokens, self.val_sequences.num_sequences,
                 f", {self.test_sequences.num_tokens} test tokens" if self.test_sequences is not None else "")

    def _split(self, samples: TokenSequences, val: TokenSequences | None = None,
               test: TokenSequences | None = None) -> tuple[TokenSequences, TokenSequences, TokenSequences | None]:
        """``(train, val, test or None)`` samples, views of ``samples`` (and of the separate sources).

        The main source is ``[train | val | test]``: the held-out tail shares, validation
        first; ``val`` / ``test`` given as their own sources are taken whole instead.
        """
        S = samples.num_sequences
        if S == 1:
            return self._split_tokens(samples, val, test)
        k_val = 0 if val is not None else min(held_out(S, self.val_fraction), S - 1)
        k_test = 0 if test is not None else held_out(S, self.test_fraction)
        check(S - k_val - k_test >= 1,
              f"{self.describe()} has only {S} samples: too few to hold out {k_val} for validation and {k_test} "
              "for the test split; lower data.val_fraction / data.test_fraction or give more samples.")
        body, end = S - k_test, S
        if test is None and k_test:
            test = samples.select(body, end)
        if self.val_subset_of_train:
            train = samples.select(0, body)
            return train, train.select(max(0, body - k_val), body), test
        if val is None:
            val = samples.select(body - k_val, body)
        return samples.select(0, body - k_val), val, test

    def train_texts(self):
        """The training split's samples as text (a ``datasets.Dataset``), before tokenisation.

        Exactly the samples :meth:`setup` trains on: the main source's first rows as
        :meth:`_split` lays them out (``[train | val | test]``, then ``train_samples``),
        never a validation or test sample. A single sample is returned only when none of
        it is held out (validation and test from their own files, or no test split with
        ``val_subset_of_train``): held-out tails are cut by tokens, which need a tokenizer.
        """
        ds = self.load_texts("main")
        if self.num_samples is not None:
            check(len(ds) >= self.num_samples,
                  f"data.num_samples={self.num_samples} but the source has only {len(ds)} samples: lower it.")
            ds = ds.select(range(self.num_samples))
        extra, rows = self.extra_sources(), _RowRange(0, len(ds))
        if rows.num_sequences == 1:
            finer = "line" if getattr(self, "sample_by", None) == "paragraph" else "paragraph"
            check(("test" in extra or self.test_fraction == 0) and ("val" in extra or self.val_subset_of_train),
                  f"{self.describe()} holds a single sample, and its held-out tails are cut by tokens: a tokenizer "
                  "cannot be fitted on its training part alone. Give data.val_paths / data.test_paths, or "
                  f"data.sample_by {finer}.")
            train = rows
        else:
            train = self._split(rows, rows if "val" in extra else None, rows if "test" in extra else None)[0]
        if self.train_samples is not None:
            train = train.select(0, min(self.train_samples, train.num_sequences))
        return ds.select(range(train.start, train.stop))

    def _split_tokens(self, only: TokenSequences, val: TokenSequences | None, test: TokenSequences | None):
        """A single sample split by tokens: ``[train | val | test]`` tails, bytes shared by tokens."""
        n, nb = only.num_tokens, only.num_bytes
        n_val = 0 if val is not None else held_out(n, self.val_fraction)
        n_test = 0 if test is not None else held_out(n, self.test_fraction)
        cut = n - n_val - n_test
        check(cut >= 2, f"{self.describe()} has only {n} tokens: too few to split off validation"
                        f"{' and test' if n_test else ''}.")
        val_bytes, test_bytes = round(nb * n_val / n), round(nb * n_test / n)
        if test is None and n_test:
            test = only.token_range(n - n_test, n, test_bytes)
        if val is None:
            val = only.token_range(cut, cut + n_val, val_bytes)
        if self.val_subset_of_train:
            return only.token_range(0, n - n_test, nb - test_bytes), val, test
        return only.token_range(0, cut, nb - val_bytes - test_bytes), val, test

    def _arrange(self, samples: TokenSequences) -> TokenSequences:
        if self.sequences == "stream":
            return samples.as_stream()
        return samples.split_long(self.max_seq_len) if self.max_seq_len else samples

    def split(self, name: SplitName) -> TokenSequences | None:
        """The ``train``, ``val`` or ``test`` sequences (after :meth:`setup`; ``test`` may be None)."""
        check(name in SPLITS, f"split {name!r} is unknown: expected one of {', '.join(SPLITS)}.")
        self.setup()
        return getattr(self, f"{name}_sequences")

    # ---- dataloaders ------------------------------------------------------------------
    def _loader(self, seqs: TokenSequences, train: bool) -> DataLoader:
        """The loader for the connected ``layout``.

        Every loader is padded with empty batches / windows / positions (no targets) to a
        multiple of the DDP world size instead of the DistributedSampler's duplicates, so
        metrics synced over ranks count every token exactly once and equal a single
        process's. Training orders put the padding last and shard without a second shuffle
        (:func:`~cvfp_lightning.data.sequences.shuffled_sampler`): W ranks with
        ``chunk_size`` / ``batch_size`` B train on the global batches of one process with W*B.
        """
        layout = self.layout
        world = self.trainer.world_size if self.trainer is not None else 1
        if layout == "shard_chunks":  # Phase 1: each rank its own positions, in order
            rank = self.trainer.global_rank if self.trainer is not None else 0
            return DataLoader(ShardChunks(seqs, self.chunk_size, rank, world), batch_size=None,
                              num_workers=self.num_workers)
        if layout == "position_chunks" or (layout == "positions" and not train):
            return DataLoader(PositionChunks(seqs, self.chunk_size, world, self.history), batch_size=None,
                              shuffle=False, num_workers=self.num_workers)
        if layout == "positions":
            index = PositionIndex(seqs.num_tokens, pad_to_multiple=world)
            return DataLoader(index, batch_size=self.chunk_size,
                              sampler=shuffled_sampler(seqs.num_tokens, len(index), self.trainer),
                              collate_fn=PositionCollate(seqs, self.history), num_workers=self.num_workers)
        if layout == "windows":
            windows = Windows(seqs, self.seq_len, pad_to_multiple=world)
            return DataLoader(windows, batch_size=self.batch_size, num_workers=self.num_workers,
                              sampler=shuffled_sampler(windows.num_real, len(windows), self.trainer) if train else None)
        if layout == "streams":  # batch_size lanes per rank, windows of seq_len (truncated BPTT)
            return stream_loader(seqs, self.batch_size, self.seq_len, world, train, self.num_workers)
        raise ValueError(f"unknown layout {layout!r}")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_sequences, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_sequences, train=False)

    def test_dataloader(self) -> DataLoader:
        """The test split; without one (``test_fraction`` 0, no test files) the validation split."""
        self.setup()
        if self.test_sequences is None:
            log.info("no test split (data.test_fraction is 0 and no test files): testing on the validation split")
            return self.val_dataloader()
        return self._loader(self.test_sequences, train=False)

    def predict_dataloader(self) -> DataLoader:
        """The connected prompts, encoded with this data's tokenizer (generation)."""
        return prompt_loader(self.prompts, self.tokenizer)

    def state_dict(self) -> dict:
        """What the data was, so a resumed run can check it trains on the same tokens, and the
        tokenizer and arrangement an exported model needs (:mod:`cvfp_lightning.data.snapshot`)."""
        return {"cache_key": self.cache_key(), "vocab_size": self.vocab_size, SNAPSHOT_KEY: data_snapshot(self)}

    def load_state_dict(self, state: dict) -> None:
        key = state.get("cache_key")
        if key is not None and key != self.cache_key():
            raise CVFPUserError(
                f"the checkpoint was trained on other data or another tokenizer (token cache key {key} != "
                f"{self.cache_key()} of {self.describe()}): resume with the data settings of that run.")
