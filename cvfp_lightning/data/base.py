"""``TokenDataModule``: tokenise once, cache ids on disk, split, and batch for any module.

Subclasses say where the text comes from (:meth:`load_texts`, :meth:`source_key`). The
base class does the rest, the same way for every source:

1. ``prepare_data`` (rank 0): texts -> ids with the tokenizer, through ``datasets.map``,
   saved once to ``<cache_dir>/tokens/<key>.pt`` (key = sha256 of source, tokenizer and
   options); later runs load that file (``torch.load(weights_only=True)``).
2. ``setup``: split samples into train / validation (held-out tail by default, or the
   seed documents' "validation is a subset of training"), then one stream (seeds) or per-sample
   sequences. Exposes ``train_sequences`` / ``val_sequences`` (:class:`TokenSequences`).
3. Dataloaders in the layout the LightningModule names in the handshake
   :meth:`TokenDataModule.connect` (called from its ``setup``): ``position_chunks``
   (in-order chunks, Phase 1), ``positions`` (shuffled positions, Phase 2) or ``windows``
   (``(B, T)`` windows, baselines); the predict loader serves the prompts it passes.
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
from cvfp_lightning.data.sequences import (EpochShuffleSampler, PositionChunks, PositionCollate, PositionIndex,
                                           TokenSequences, Windows)
from cvfp_lightning.data.snapshot import SNAPSHOT_KEY, data_snapshot
from cvfp_lightning.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from cvfp_lightning.errors import CVFPUserError, check, check_fraction, check_positive
from cvfp_lightning.io import atomic_torch_save, safe_torch_load

log = logging.getLogger(__name__)

SequenceMode = Literal["stream", "samples"]
LAYOUTS = ("position_chunks", "positions", "windows")
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("CVFP_CACHE_DIR", Path.home() / ".cache" / "cvfp_lightning"))


def quiet_datasets() -> None:
    """No datasets progress bars on stderr: Lightning's bar and our log lines say enough."""
    import datasets

    datasets.disable_progress_bars()


class TokenDataModule(L.LightningDataModule):
    """Base class of the text data modules.

    Args:
        tokenizer: HF hub name, local folder, or None for the bundled tokenizer.
        sequences: ``stream`` (all samples concatenated into one sequence, the seed documents'
            layout) or ``samples`` (one sequence per sample; the context restarts at 0).
        num_samples: use only the first N samples (rows) of the source; None: all.
        train_samples: after the split, train on only the first N training samples while the
            validation samples stay the same (a fixed validation set across data sizes, as
            the scaling experiment needs); None: all.
        val_fraction: share of samples held out for validation (the tail). With a single
            sample the tail tokens are held out instead.
        val_subset_of_train: the seed documents' option: validation is the tail of the training
            data (not held out).
        max_seq_len: ``samples`` mode: split longer samples into pieces of this length.
        add_eos: append the tokenizer's EOS id to every sample (a separator in streams).
        chunk_size: positions per batch for position layouts.
        batch_size: windows per batch for the window layout.
        seq_len: window length for the window layout.
        num_workers: DataLoader workers.
        cache_dir: token cache folder; default ``$CVFP_CACHE_DIR`` or
            ``~/.cache/cvfp_lightning``.
        trust_remote_code: passed to the tokenizer loader; off by default.
    """

    def __init__(self, tokenizer: str | None = None, sequences: SequenceMode = "stream",
                 num_samples: int | None = None, train_samples: int | None = None, val_fraction: float = 0.1,
                 val_subset_of_train: bool = False,
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
        if max_seq_len is not None:
            check_positive("data.max_seq_len", max_seq_len)
        for name, value in (("chunk_size", chunk_size), ("batch_size", batch_size), ("seq_len", seq_len)):
            check_positive(f"data.{name}", value)
        check_positive("data.num_workers", num_workers, allow_zero=True)
        self.tokenizer_name = tokenizer
        self.sequences, self.num_samples, self.train_samples = sequences, num_samples, train_samples
        self.val_fraction, self.val_subset_of_train = val_fraction, val_subset_of_train
        self.max_seq_len, self.add_eos = max_seq_len, add_eos
        self.chunk_size, self.batch_size, self.seq_len = chunk_size, batch_size, seq_len
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.tokenizer = self._load_tokenizer(tokenizer, trust_remote_code)
        self.vocab_size: int = len(self.tokenizer) if self.tokenizer is not None else 0
        self.train_sequences: TokenSequences | None = None
        self.val_sequences: TokenSequences | None = None
        self.layout = "position_chunks"  # set by connect()
        self.prompts: list[str] = []

    def connect(self, layout: str, prompts: list[str] | None = None) -> None:
        """The handshake with the module (litgpt's ``DataModule.connect``), from its ``setup``.

        Args:
            layout: the batch layout it trains and evaluates on (:data:`LAYOUTS`).
            prompts: the texts ``cvfp predict`` continues (the predict loader's items).
        """
        check(layout in LAYOUTS, f"data layout {layout!r} is unknown: expected one of {', '.join(LAYOUTS)}.")
        self.layout = layout
        self.prompts = list(prompts or [])

    # ---- hooks for subclasses -------------------------------------------------------
    def _load_tokenizer(self, name: str | None, trust_remote_code: bool):
        return load_tokenizer(name, trust_remote_code=trust_remote_code)

    def load_texts(self):
        """Return a ``datasets.Dataset`` with a ``text`` column (one row = one sample)."""
        raise NotImplementedError

    def source_key(self) -> dict:
        """What identifies the source (paths and their hashes, dataset name, split...)."""
        raise NotImplementedError

    # ---- tokenisation and cache -----------------------------------------------------
    def cache_key(self) -> str:
        payload = {"version": CACHE_VERSION, "source": self.source_key(), "num_samples": self.num_samples,
                   "add_eos": self.add_eos, "tokenizer": tokenizer_fingerprint(self.tokenizer)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def cache_path(self) -> Path:
        return self.cache_dir / "tokens" / f"{self.cache_key()}.pt"

    def tokenize(self) -> dict:
        """Tokenise the source: ``{"ids": (N,) int32, "lengths": (S,), "nbytes": (S,)}``."""
        quiet_datasets()
        ds = self.load_texts()
        check(len(ds) > 0, f"the data source {self.describe()} holds no text: give a non-empty source.")
        if self.num_samples is not None:
            check(len(ds) >= self.num_samples,
                  f"data.num_samples={self.num_samples} but the source has only {len(ds)} samples: lower it.")
            ds = ds.select(range(self.num_samples))
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id

        def encode(batch):
            ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
            if self.add_eos and eos is not None:
                ids = [x + [eos] for x in ids]
            return {"ids": ids, "nbytes": [len(t.encode("utf-8")) for t in batch["text"]]}

        log.info("tokenising %d samples of %s", len(ds), self.describe())
        ds = ds.map(encode, batched=True, remove_columns=ds.column_names, load_from_cache_file=False,
                    keep_in_memory=True)
        seqs = [torch.tensor(x, dtype=torch.int32) for x in ds["ids"] if len(x)]
        nbytes = [n for x, n in zip(ds["ids"], ds["nbytes"]) if len(x)]
        check(len(seqs) > 0 and sum(len(s) for s in seqs) >= 2,
              f"the data source {self.describe()} holds no text after tokenisation: give a non-empty source.")
        return {"ids": torch.cat(seqs), "lengths": torch.tensor([len(s) for s in seqs]),
                "nbytes": torch.tensor(nbytes, dtype=torch.long), "key": self.cache_key()}

    def describe(self) -> str:
        return type(self).__name__

    def prepare_data(self) -> None:
        path = self.cache_path()
        if path.exists():
            return
        atomic_torch_save(self.tokenize(), path)
        log.info("tokenised %s into %s", self.describe(), path)

    def load_tokens(self) -> dict:
        path = self.cache_path()
        if path.exists():
            try:
                data = safe_torch_load(path)
                if isinstance(data, dict) and data.get("key") == self.cache_key() and {"ids", "lengths", "nbytes"} <= set(data):
                    return data
                log.warning("token cache %s does not match its key; re-tokenising", path)
            except CVFPUserError as exc:
                log.warning("%s; re-tokenising", exc)
        data = self.tokenize()
        atomic_torch_save(data, path)
        return data

    # ---- split ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_sequences is not None:
            return
        data = self.load_tokens()
        ids, lengths, nbytes = data["ids"].long(), data["lengths"].long(), data["nbytes"].long()
        samples = list(torch.split(ids, lengths.tolist()))
        train, val, train_bytes, val_bytes = self._split(samples, nbytes.tolist())
        if self.train_samples is not None:
            check(self.train_samples <= len(train),
                  f"data.train_samples={self.train_samples} but the source has only {len(train)} samples for "
                  "training after the validation split: lower it.")
            train_bytes = round(train_bytes * sum(len(t) for t in train[: self.train_samples])
                                / max(1, sum(len(t) for t in train)))
            train = train[: self.train_samples]
        self.train_sequences = self._arrange(train, train_bytes)
        self.val_sequences = self._arrange(val, val_bytes)
        log.info("data: %d train tokens in %d sequences, %d val tokens in %d sequences",
                 self.train_sequences.num_tokens, self.train_sequences.num_sequences,
                 self.val_sequences.num_tokens, self.val_sequences.num_sequences)

    def _split(self, samples, nbytes):
        S = len(samples)
        if S >= 2:
            k = max(1, round(self.val_fraction * S))
            k = min(k, S - 1)
            val, val_bytes = samples[S - k:], sum(nbytes[S - k:])
            if self.val_subset_of_train:
                return samples, val, sum(nbytes), val_bytes
            return samples[: S - k], val, sum(nbytes[: S - k]), val_bytes
        only = samples[0]
        cut = len(only) - max(1, round(self.val_fraction * len(only)))
        check(cut >= 2, f"{self.describe()} has only {len(only)} tokens: too few to split off validation.")
        share = (len(only) - cut) / len(only)
        val_bytes = round(nbytes[0] * share)
        if self.val_subset_of_train:
            return [only], [only[cut:]], nbytes[0], val_bytes
        return [only[:cut]], [only[cut:]], nbytes[0] - val_bytes, val_bytes

    def _arrange(self, samples, num_bytes) -> TokenSequences:
        seqs = TokenSequences.from_lists(samples, num_bytes)
        if self.sequences == "stream":
            return seqs.as_stream()
        return seqs.split_long(self.max_seq_len) if self.max_seq_len else seqs

    # ---- dataloaders ------------------------------------------------------------------
    def _loader(self, seqs: TokenSequences, train: bool) -> DataLoader:
        """The loader for the connected ``layout``.

        Evaluation loaders (and Phase 1's in-order chunks) are padded with empty batches /
        windows to a multiple of the DDP world size instead of the DistributedSampler's
        duplicates, so metrics synced over ranks count every token exactly once and equal a
        single process's.
        """
        layout = self.layout
        world = self.trainer.world_size if self.trainer is not None else 1
        if layout == "position_chunks" or (layout == "positions" and not train):
            return DataLoader(PositionChunks(seqs, self.chunk_size, world), batch_size=None, shuffle=False,
                              num_workers=self.num_workers)
        if layout == "positions":
            return DataLoader(PositionIndex(seqs.num_tokens), batch_size=self.chunk_size,
                              sampler=EpochShuffleSampler(seqs.num_tokens), collate_fn=PositionCollate(seqs),
                              num_workers=self.num_workers)
        if layout == "windows":
            windows = Windows(seqs, self.seq_len, pad_to_multiple=1 if train else world)
            return DataLoader(windows, batch_size=self.batch_size, num_workers=self.num_workers,
                              sampler=EpochShuffleSampler(len(windows)) if train else None)
        raise ValueError(f"unknown layout {layout!r}")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_sequences, train=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_sequences, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

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
