"""The Phase 1 -> Phase 2 context cache: the final context of every position, in shard files.

The Phase 2 context block is the frozen Phase 1 updater, so the contexts of a fixed text
never change. Every layer's output at position i is a function of ``(c_{i-1}, e_i)`` only
(the update reads the previous final context and the token), so the cache keeps just the
final context ``c_i`` of every train, validation and test position (D values in fp32, bf16
or fp16: ``4 D`` or ``2 D`` bytes per position on disk) and Phase 2 recomputes a batch's
per-layer inputs with one parallel forward of the frozen block,
``updater(c_{i-1}, e_i, return_all_layers=True)``. The contexts are written by the sharded
sequential pass (:func:`~cvfp_lightning.sequential_pass.sharded_sequential_pass`): every
rank writes the rows of its own shard to its own file, nothing is all-reduced, and nothing
of size N is held in memory while writing.

Folder (``context_cache/`` next to the Phase 1 checkpoints)::

    meta.json                     version, fingerprint, components (one sha256 each, see
                                  COMPONENT_NAMES), dim, dtype, and per split its rows and
                                  shards [{file, start, stop, bytes, sha256, mtime_ns}]
    {split}.rank{r}-of-{W}.bin    rows [start, stop) of the split, raw little-endian

A shard's sha256 is computed once, when it is written. A reader
(:class:`ContextCache`) memory-maps the files read-only (file pages the kernel may
reclaim; Phase 2 reads rows at random, so no more of a file is resident than it touches)
and checks the fingerprint (a cache made from other weights, data, tokenizer or
configuration is stale), each file's size, and, when a file's size or modification time
differs from its record, its digest again: a file changed after it was written is refused.

Modes (``cache`` of :class:`~cvfp_lightning.modules.phase2.Phase2LM`): ``auto`` reads a
matching cache ("cache hit"), otherwise says why and recomputes the contexts; a fit writes
them into its own run folder (or ``cache_path`` when given), never into the Phase 1 run's,
and without a run folder (no logger) writes nothing; ``require`` refuses a missing or stale
cache with the reason; ``off`` computes the contexts in memory (``4 D`` bytes per position
of every split, on every rank) and never reads or writes a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from cvfp_lightning.context_store import context_dtype
from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.data.shards import shard_view
from cvfp_lightning.data.tokenizer import tokenizer_fingerprint
from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.io import atomic_write_json, file_sha256
from cvfp_lightning.models.context import ContextUpdater
from cvfp_lightning.models.embedding import TokenEmbedding
from cvfp_lightning.sequential_pass import sequential_pass, sharded_sequential_pass

CACHE_VERSION = 2
CACHE_DIRNAME = "context_cache"
META = "meta.json"
SPLITS = ("train", "val", "test")
CacheMode = Literal["auto", "require", "off"]
CACHE_MODES = ("auto", "require", "off")

COMPONENT_NAMES = {
    "version": "the cache format version",
    "phase1_weights": "the Phase 1 weights (embedding and context block)",
    "config": "the context/embedding configuration",
    "data_source": "the data source",
    "tokenizer": "the tokenizer",
    "train_tokens": "the training token ids",
    "val_tokens": "the validation token ids",
    "test_tokens": "the test token ids",
}
PLURAL_COMPONENTS = {"phase1_weights", "train_tokens", "val_tokens", "test_tokens"}
# embedding/context options that only affect initialisation or training, not the contexts
_INIT_ONLY = {"freeze", "trust_remote_code", "pretrained", "init_std", "bias_std"}


def _update_tensor(h, name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def state_digest(*states: dict[str, Tensor]) -> str:
    """sha256 of state dicts (names, dtypes, shapes, bytes), in order."""
    h = hashlib.sha256()
    for k, state in enumerate(states):
        for name, t in sorted(state.items()):
            _update_tensor(h, f"{k}.{name}", t)
    return h.hexdigest()


def weights_digest(*modules: nn.Module) -> str:
    """sha256 of the parameters and buffers (names, dtypes, shapes, bytes) of ``modules``."""
    return state_digest(*(module.state_dict() for module in modules))


def sequences_digest(seqs: TokenSequences) -> str:
    """sha256 of a split's token ids (as int64) and sequence boundaries; the ids are read in blocks."""
    h = hashlib.sha256()
    h.update(f"ids|{torch.int64}|{(seqs.num_tokens,)}|".encode())  # the header _update_tensor writes
    for block in seqs.id_blocks():
        h.update(block.numpy())
    _update_tensor(h, "offsets", seqs.offsets.long())
    return h.hexdigest()


def contexts_config(vocab_size: int, context: dict, embedding: dict) -> dict:
    """The options the contexts depend on (from a Phase 1 module's hyperparameters)."""
    return {"vocab_size": int(vocab_size),
            "context": {k: v for k, v in sorted(dict(context).items()) if k not in _INIT_ONLY},
            "embedding": {k: v for k, v in sorted(dict(embedding).items()) if k not in _INIT_ONLY}}


def cache_components(embedding: TokenEmbedding, updater: ContextUpdater, datamodule, config: dict) -> dict[str, str]:
    """What the cached contexts depend on, one digest per item (see ``COMPONENT_NAMES``).

    ``datamodule`` must expose ``train_sequences`` / ``val_sequences`` (and ``test_sequences``,
    None without a test split) after ``setup``;
    its ``cache_key()`` (source, tokenizer, options) and ``tokenizer`` are used when present.
    """
    tokenizer = getattr(datamodule, "tokenizer", None)
    key = getattr(datamodule, "cache_key", None)
    return {
        "version": str(CACHE_VERSION),
        "phase1_weights": weights_digest(embedding, updater),
        "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "data_source": str(key()) if callable(key) else "unknown",
        "tokenizer": tokenizer_fingerprint(tokenizer) if tokenizer is not None else "none",
        **{f"{split}_tokens": sequences_digest(seqs) if (seqs := getattr(datamodule, f"{split}_sequences", None))
           is not None else "none" for split in SPLITS},
    }


def fingerprint(components: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


class Contexts:
    """The final contexts of a data module's splits, by global position (cached or computed)."""

    dim: int

    def gather(self, split: str, positions: Tensor) -> Tensor:  # pragma: no cover - interface
        """``positions (k,)`` of ``split`` -> their final contexts, float32 ``(k, D)`` on the CPU."""
        raise NotImplementedError

    def previous(self, split: str, positions: Tensor, is_start: Tensor) -> Tensor:
        """The context each position reads, ``c_{i-1}`` (0 where a sequence starts): ``(k,), (k,) -> (k, D)``."""
        before = self.gather(split, (positions - 1).clamp_min(0))
        return torch.where(is_start.cpu().reshape(-1, 1), 0.0, before)

    def position_rows(self, split: str, seqs, history: int = 0):
        """``positions (k,) -> (seqs.position_batch(positions, history), previous contexts (k, D))``: any
        positions of the split ``seqs`` as a position batch with its contexts (what a continuous cache's
        memory reads, :meth:`CVFPLanguageModel.score_positions`)."""
        def read(positions: Tensor) -> tuple[dict, Tensor]:
            batch = seqs.position_batch(positions, history)
            return batch, self.previous(split, batch["positions"], batch["is_start"])
        return read


class InMemoryContexts(Contexts):
    """Contexts held as one float32 ``(N_split, D)`` tensor per split (``cache: off``: 4 D bytes per position)."""

    def __init__(self, tensors: dict[str, Tensor]):
        self.tensors = tensors
        self.dim = int(next(iter(tensors.values())).shape[1])

    def gather(self, split: str, positions: Tensor) -> Tensor:
        return self.tensors[split][positions.to(self.tensors[split].device)].float().cpu()


class ContextCache(Contexts):
    """A cache folder read back: its meta and its shard files, memory-mapped read-only (see module doc)."""

    def __init__(self, folder: str | Path, meta: dict):
        self.folder, self.meta = Path(folder), meta
        self.dim = int(meta["dim"])
        self.dtype = context_dtype(meta["dtype"])
        self._maps: dict[str, list[tuple[int, int, np.ndarray]]] = {}

    @property
    def components(self) -> dict[str, str]:
        return self.meta["components"]

    def rows(self, split: str) -> int:
        return int(self.meta["splits"].get(split, {}).get("rows", 0))

    def _shards(self, split: str) -> list[tuple[int, int, np.ndarray]]:
        if split not in self._maps:
            raw = np.float32 if self.dtype == torch.float32 else np.uint16  # bf16 / fp16 read as their bits
            self._maps[split] = [(int(s["start"]), int(s["stop"]),
                                  np.memmap(self.folder / s["file"], dtype=raw, mode="r",
                                            shape=(int(s["stop"]) - int(s["start"]), self.dim))
                                  if int(s["stop"]) > int(s["start"]) else None)
                                 for s in self.meta["splits"][split]["shards"]]
        return self._maps[split]

    def gather(self, split: str, positions: Tensor) -> Tensor:
        positions = positions.reshape(-1).long().cpu()
        out = torch.empty(positions.numel(), self.dim, dtype=self.dtype)
        for start, stop, rows in self._shards(split):
            mine = (positions >= start) & (positions < stop)
            if rows is not None and bool(mine.any()):
                got = torch.from_numpy(np.ascontiguousarray(rows[(positions[mine] - start).numpy()]))
                out[mine] = got if self.dtype == torch.float32 else got.view(self.dtype)
        return out.float()

    # ---- reading and checking ------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> "ContextCache":
        """Read ``folder``'s meta and check its files; CVFPUserError (one line) when it is not a valid cache."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CVFPUserError(f"{str(folder)!r} is not a cvfp_lightning context cache ({type(exc).__name__}): "
                                "delete it, or point model.cache_path elsewhere.") from None
        ok = (isinstance(meta, dict) and meta.get("version") == CACHE_VERSION and isinstance(meta.get("splits"), dict)
              and isinstance(meta.get("components"), dict) and meta.get("dtype") in ("float32", "bfloat16", "float16"))
        check(ok, f"{str(folder)!r} is not a cvfp_lightning context cache of version {CACHE_VERSION}: delete it so it "
                  "is rebuilt.")
        check(meta.get("fingerprint") == fingerprint(meta["components"]),
              f"the context cache {str(folder)!r} has an inconsistent fingerprint: delete it so it is rebuilt.")
        cache = cls(folder, meta)
        itemsize = torch.empty((), dtype=cache.dtype).element_size()
        for split, info in meta["splits"].items():
            for shard in info["shards"]:
                path = folder / shard["file"]
                check(path.is_file(), f"the context cache {str(folder)!r} misses {shard['file']}: delete it so it is "
                                      "rebuilt.")
                stat = path.stat()
                size = (int(shard["stop"]) - int(shard["start"])) * cache.dim * itemsize
                changed = stat.st_size != size or (stat.st_mtime_ns != shard.get("mtime_ns")
                                                   and file_sha256(path) != shard["sha256"])
                check(not changed, f"the context cache {str(folder)!r} was modified after it was written "
                                   f"({shard['file']}: its size or digest differs): delete it so it is rebuilt.")
        return cache

    def stale_reasons(self, expected: dict[str, str], dim: int, num_tokens: dict[str, int]) -> list[str]:
        """Why this cache cannot stand for ``expected`` (empty: it matches)."""
        reasons = [f"{COMPONENT_NAMES.get(k, k)} {'differ' if k in PLURAL_COMPONENTS else 'differs'}"
                   for k in sorted(set(expected) | set(self.components)) if self.components.get(k) != expected.get(k)]
        if not reasons:
            if self.dim != dim:
                reasons.append(f"its contexts are {self.dim} wide, not {dim}")
            reasons += [f"it holds {self.rows(s)} {s} positions, not {n}" for s, n in num_tokens.items()
                        if self.rows(s) != n]
        return reasons


def final_contexts(embedding: TokenEmbedding, updater: ContextUpdater, splits: dict[str, TokenSequences],
                   batch_size: int = 256, trainer=None) -> InMemoryContexts:
    """The final contexts of ``splits`` in memory: float32 ``(N_split, D)`` each, on every rank.

    4 D bytes per position (not the ``4 sum(d_l)`` of every layer: a batch's per-layer
    outputs are recomputed from these, :meth:`Contexts.previous`). Under DDP
    (``trainer.world_size > 1``) each rank passes its share of the sequences
    (:func:`~cvfp_lightning.sequential_pass.sequential_pass`'s round robin, the other rows
    0) and a sum over ranks completes them, exactly.
    """
    world = trainer.world_size if trainer is not None else 1
    rank = trainer.global_rank if trainer is not None else 0
    tensors = {}
    for split, seqs in splits.items():
        rows = sequential_pass(updater, embedding, seqs, batch_size, rank=rank, world_size=world,
                               description=f"contexts: {split}").float()
        tensors[split] = trainer.strategy.reduce(rows, reduce_op="sum") if world > 1 else rows
    return InMemoryContexts(tensors)


class ContextSource:
    """What a context cache is computed from: a frozen embedding + context block and a data module.

    The one orchestration of the hand-off (:class:`~cvfp_lightning.callbacks.ContextCacheHandoff`
    at the end of Phase 1) and of Phase 2's contexts: the digests the contexts depend on
    (:attr:`components`, computed once), the sharded pass into a cache folder
    (:meth:`write`), or the contexts in memory (:meth:`compute`).

    Args:
        embedding: the embedding the context block reads.
        updater: the context block.
        datamodule: exposes ``train_sequences`` / ``val_sequences`` / ``test_sequences`` (after ``setup``).
        hparams: the Phase 1 hyperparameters (``vocab_size``, ``context``, ``embedding``).
    """

    def __init__(self, embedding: TokenEmbedding, updater: ContextUpdater, datamodule, hparams: dict):
        self.embedding, self.updater, self.datamodule = embedding, updater, datamodule
        self.config = contexts_config(hparams["vocab_size"], hparams["context"], hparams["embedding"])
        self._components: dict[str, str] | None = None

    @property
    def components(self) -> dict[str, str]:
        if self._components is None:
            self._components = cache_components(self.embedding, self.updater, self.datamodule, self.config)
        return self._components

    @property
    def splits(self) -> dict[str, TokenSequences]:
        """The data module's splits that exist (``test`` only with a test split)."""
        return {s: seqs for s in SPLITS if (seqs := getattr(self.datamodule, f"{s}_sequences", None)) is not None}

    @property
    def num_tokens(self) -> dict[str, int]:
        return {split: seqs.num_tokens for split, seqs in self.splits.items()}

    def _eval(self):
        was = self.updater.training, self.embedding.training
        self.updater.eval(), self.embedding.eval()
        return lambda: (self.updater.train(was[0]), self.embedding.train(was[1]))

    def compute(self, batch_size: int = 256, trainer=None) -> InMemoryContexts:
        """Every split's final contexts in memory (:func:`final_contexts`; eval mode)."""
        restore = self._eval()
        try:
            return final_contexts(self.embedding, self.updater, self.splits, batch_size, trainer)
        finally:
            restore()

    def write(self, folder: str | Path, trainer, batch_size: int = 256, dtype: str = "float32") -> ContextCache:
        """The cache folder of these contexts, written by all of ``trainer``'s ranks (each its shards).

        Written into a temporary folder next to ``folder``, then moved into place by rank 0,
        so a reader never sees half a cache; an existing cache there is replaced.
        """
        folder = Path(folder)
        rank, world = trainer.global_rank, trainer.world_size
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}") if rank == 0 else None
        tmp = Path(trainer.strategy.broadcast(str(tmp) if tmp else "", 0))
        tmp.mkdir(parents=True, exist_ok=True)
        store = context_dtype(dtype)
        row_bytes = self.updater.context_dim * torch.empty((), dtype=store).element_size()
        parts, sinks, mine = [], [], {}
        handles = []
        for split, seqs in self.splits.items():
            shard, view = shard_view(seqs, rank, world)
            name = f"{split}.rank{rank}-of-{world}.bin"
            fd = os.open(tmp / name, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, shard.num_tokens * row_bytes)
            handles.append(fd)

            def sink(first: int, rows: Tensor, fd=fd) -> None:
                raw = rows.detach().to(store).cpu().contiguous().view(torch.uint8).numpy()
                os.pwrite(fd, memoryview(raw), first * row_bytes)

            parts.append((shard, view))
            sinks.append(sink)
            mine[split] = {"file": name, "start": shard.start, "stop": shard.stop}
        start = time.perf_counter()
        restore = self._eval()
        try:
            sharded_sequential_pass(self.updater, self.embedding, parts, sinks, batch_size,
                                    broadcast=lambda t, src: trainer.strategy.broadcast(t, src),
                                    description="context cache: sequential pass")
        finally:
            restore()
            for fd in handles:
                os.fsync(fd)
                os.close(fd)
        for info in mine.values():
            path = tmp / info["file"]
            info.update(bytes=path.stat().st_size, sha256=file_sha256(path), mtime_ns=path.stat().st_mtime_ns)
        atomic_write_json(mine, tmp / f"shards.rank{rank}.json")
        trainer.strategy.barrier("context cache written")
        if rank == 0:
            splits = {split: {"rows": n, "shards": []} for split, n in self.num_tokens.items()}
            for r in range(world):
                for split, info in json.loads((tmp / f"shards.rank{r}.json").read_text()).items():
                    splits[split]["shards"].append(info)
                (tmp / f"shards.rank{r}.json").unlink()
            comps = dict(self.components)
            atomic_write_json({"version": CACHE_VERSION, "fingerprint": fingerprint(comps), "components": comps,
                               "dim": self.updater.context_dim, "dtype": dtype, "splits": splits,
                               "seconds": time.perf_counter() - start}, tmp / META)
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
                folder.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            tmp.rename(folder)
        trainer.strategy.barrier("context cache in place")
        return ContextCache.open(folder)


def resolve_contexts(folder: str | Path | None, mode: str, source: ContextSource, trainer, batch_size: int = 256,
                     write: bool = True, write_folder: str | Path | None = None) -> tuple[Contexts, str]:
    """The contexts of ``source``: the cache at ``folder`` if it matches, else computed (and written).

    Returns ``(contexts, message)``; the message says "cache hit" or why the contexts were
    computed. ``mode``: ``auto`` | ``require`` | ``off`` (see the module docstring).
    ``write``: a fit writes the contexts of a missing or stale cache (all ranks together) to
    ``write_folder`` (default ``folder``: rewritten); evaluation never writes and computes in
    memory. Raises CVFPUserError in ``require`` mode when the cache is missing, unreadable or
    stale.
    """
    check(mode in CACHE_MODES, f"model.cache={mode!r} is unknown: expected one of {', '.join(CACHE_MODES)}.")
    start = time.perf_counter()
    if mode == "off" or folder is None:
        contexts = source.compute(batch_size, trainer)
        return contexts, f"contexts computed in {time.perf_counter() - start:.1f}s (cache off)"
    folder = Path(folder)
    if not (folder / META).exists():
        why = f"no context cache at {folder}"
    else:
        try:
            cache = ContextCache.open(folder)
            reasons = cache.stale_reasons(source.components, source.updater.context_dim, source.num_tokens)
        except CVFPUserError as exc:  # unreadable: its reason without the advice to delete it (said below)
            reasons = [str(exc).split(": delete it")[0]]
        if not reasons:
            return cache, f"context cache hit: {folder}"
        why = f"the context cache {folder} is stale: " + "; ".join(reasons)
    if mode == "require":
        raise CVFPUserError(f"{why}, and model.cache=require: rerun Phase 1 with the ContextCacheHandoff callback "
                            "on this data, point model.cache_path at the right cache, or set model.cache: auto "
                            "to rebuild it.")
    if not write:
        contexts = source.compute(batch_size, trainer)
        return contexts, f"{why}; contexts computed in {time.perf_counter() - start:.1f}s (not written)"
    target = Path(write_folder) if write_folder is not None else folder
    try:
        cache = source.write(target, trainer, batch_size)
    except OSError as exc:
        contexts = source.compute(batch_size)
        seconds = time.perf_counter() - start
        return contexts, f"{why}; contexts computed in {seconds:.1f}s (could not write {target}: {exc})"
    where = "the cache rewritten" if target == folder else f"cached in {target}"
    return cache, f"{why}; contexts recomputed in {time.perf_counter() - start:.1f}s and {where}"
