"""The Phase 1 -> Phase 2 context cache.

The Phase 2 context block is the frozen Phase 1 updater, so the contexts of a fixed text
never change: one sequential pass (:func:`~cvfp_lightning.sequential_pass.sequential_pass`, the
one update rule) gives every layer's context at every train and validation position,
and Phase 2 trains on those. The cache stores them with a fingerprint of everything they
depend on, so a cache made from other weights, other data or another tokenizer is never
used by mistake.

File (``torch.save`` of plain tensors, dicts and strings, read with
``torch.load(weights_only=True)``)::

    version      int
    fingerprint  sha256 of the components below
    components   {"version", "phase1_weights", "config", "data_source", "tokenizer",
                  "train_tokens", "val_tokens"}: one sha256 / key each
    layer_dims   [d_1 .. d_L]
    train, val   [(N_split, d_l) float32 for each layer l]: the contexts after reading
                 the token at each position (the last layer is the context itself)
    embeddings   (V, E) float32: the embedding of every id (after its LayerNorm), the
                 token-block input when the embedding is frozen
    content_sha  sha256 of the tensors above (a tampered file is refused)

Modes (``cache`` of :class:`~cvfp_lightning.modules.phase2.Phase2LM`): ``auto`` reads a
matching cache ("cache hit"), otherwise says why, recomputes and rewrites it; ``require``
refuses a missing or stale cache with the reason; ``off`` recomputes in memory and never
reads or writes a file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.data.tokenizer import tokenizer_fingerprint
from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.io import atomic_torch_save, safe_torch_load
from cvfp_lightning.models.context import ContextUpdater
from cvfp_lightning.models.embedding import TokenEmbedding
from cvfp_lightning.progress import task
from cvfp_lightning.sequential_pass import sequential_pass

CACHE_VERSION = 1
CACHE_FILENAME = "context_cache.pt"
SPLITS = ("train", "val")
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
}
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

    ``datamodule`` must expose ``train_sequences`` / ``val_sequences`` (after ``setup``);
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
        "train_tokens": sequences_digest(datamodule.train_sequences),
        "val_tokens": sequences_digest(datamodule.val_sequences),
    }


def fingerprint(components: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


def _content_digest(layers: dict[str, list[Tensor]], embeddings: Tensor,
                    description: str = "context cache: digest") -> str:
    named = [(f"{split}.{k}", t) for split in SPLITS for k, t in enumerate(layers[split])] + [("embeddings", embeddings)]
    megabytes = [t.numel() * t.element_size() / 1e6 for _, t in named]
    h = hashlib.sha256()
    with task(description, total=sum(megabytes), unit="MB") as bar:
        for (name, t), mb in zip(named, megabytes):
            _update_tensor(h, name, t)
            bar.advance(mb)
    return h.hexdigest()


@dataclass
class ContextCache:
    """Every layer's contexts of the train and val positions, with what they depend on.

    Attributes:
        components: digests of what the contexts depend on (``COMPONENT_NAMES``).
        layers: ``{"train": [(N_train, d_l)], "val": [(N_val, d_l)]}``, float32, CPU.
        embeddings: ``(V, E)`` embedding of every id (after LayerNorm), float32, CPU.
        seconds: time spent computing (0 for a cache read from disk).
    """

    components: dict[str, str]
    layers: dict[str, list[Tensor]]
    embeddings: Tensor
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.components)

    @property
    def layer_dims(self) -> list[int]:
        return [int(t.shape[1]) for t in self.layers["train"]]

    def to_file(self) -> dict:
        return {"version": CACHE_VERSION, "fingerprint": self.fingerprint, "components": dict(self.components),
                "layer_dims": self.layer_dims, "train": list(self.layers["train"]), "val": list(self.layers["val"]),
                "embeddings": self.embeddings, "content_sha": _content_digest(self.layers, self.embeddings)}


def compute_context_cache(updater: ContextUpdater, embedding: TokenEmbedding, train: TokenSequences,
                          val: TokenSequences, components: dict[str, str], batch_size: int = 256, rank: int = 0,
                          world_size: int = 1, reduce: Callable[[Tensor], Tensor] | None = None) -> ContextCache:
    """One sequential pass over both splits with ``return_all_layers`` (fp32, no autocast).

    The train and validation sequences run together (their steps share the batched
    products, as in Phase 1's iteration 0); the rows are split afterwards. Under DDP every
    rank computes its share of the sequences and ``reduce`` (a sum over ranks) completes
    the tensors.
    """
    start = time.perf_counter()
    was_training = updater.training, embedding.training
    updater.eval(), embedding.eval()
    try:
        _, per_layer = sequential_pass(updater, embedding, TokenSequences.concat([train, val]), batch_size,
                                       return_all_layers=True, rank=rank, world_size=world_size,
                                       description="context cache: sequential pass")
        if reduce is not None and world_size > 1:
            per_layer = [reduce(t) for t in per_layer]
        sizes = [train.num_tokens, val.num_tokens]
        parts = [t.float().cpu().split(sizes) for t in per_layer]  # per layer: (train rows, val rows)
        layers = {split: [part[k].clone() for part in parts] for k, split in enumerate(SPLITS)}
        with torch.no_grad():
            ids = torch.arange(embedding.vocab_size, device=embedding.weight.device)
            embeddings = embedding(ids).float().cpu()
    finally:
        updater.train(was_training[0]), embedding.train(was_training[1])
    return ContextCache(dict(components), layers, embeddings, seconds=time.perf_counter() - start)


class ContextSource:
    """What a context cache is computed from: a frozen embedding + context block and a data module.

    The one orchestration of the hand-off (:class:`~cvfp_lightning.callbacks.ContextCacheHandoff`
    at the end of Phase 1) and of Phase 2's contexts: the digests the contexts depend on
    (:attr:`components`, computed once) and one sequential pass over both splits, shared
    over the trainer's DDP ranks (:meth:`compute`).

    Args:
        embedding: the embedding the context block reads.
        updater: the context block.
        datamodule: exposes ``train_sequences`` / ``val_sequences`` (after ``setup``).
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
    def num_tokens(self) -> dict[str, int]:
        return {split: getattr(self.datamodule, f"{split}_sequences").num_tokens for split in SPLITS}

    def compute(self, trainer, batch_size: int = 256) -> ContextCache:
        """:func:`compute_context_cache` over ``trainer``'s ranks (each its share, summed)."""
        dm, strategy = self.datamodule, trainer.strategy
        return compute_context_cache(self.updater, self.embedding, dm.train_sequences, dm.val_sequences,
                                     self.components, batch_size, rank=trainer.global_rank,
                                     world_size=trainer.world_size,
                                     reduce=lambda t: strategy.reduce(t, reduce_op="sum"))


def save_context_cache(cache: ContextCache, path: str | Path) -> Path:
    """Write atomically (temp file + rename): a crash never leaves half a cache."""
    return atomic_torch_save(cache.to_file(), path)


def read_context_cache(path: str | Path) -> ContextCache:
    """Read and check a cache file (weights-only load); CVFPUserError when it is not one."""
    size = Path(path).stat().st_size / 1e6 if Path(path).is_file() else None
    with task(f"context cache: reading {Path(path).name}", total=size, unit="MB") as bar:
        data = safe_torch_load(path)
        bar.advance(size or 0)
    ok = (isinstance(data, dict) and {"components", "train", "val", "embeddings", "content_sha"} <= set(data)
          and isinstance(data["components"], dict) and isinstance(data["train"], list)
          and isinstance(data["val"], list) and isinstance(data["embeddings"], Tensor)
          and all(isinstance(t, Tensor) and t.dim() == 2 for t in data["train"] + data["val"]))
    check(ok, f"{str(path)!r} is not a cvfp_lightning context cache: delete it, or point model.cache_path elsewhere.")
    layers = {"train": data["train"], "val": data["val"]}
    check(_content_digest(layers, data["embeddings"], "context cache: checking its digest") == data["content_sha"],
          f"the context cache {str(path)!r} was modified after it was written (its content digest does not match): "
          "delete it so it is rebuilt.")
    check(data.get("fingerprint") == fingerprint(data["components"]),
          f"the context cache {str(path)!r} has an inconsistent fingerprint: delete it so it is rebuilt.")
    return ContextCache(data["components"], layers, data["embeddings"])


def stale_reasons(cache: ContextCache, expected: dict[str, str], layer_dims: list[int],
                  num_tokens: dict[str, int]) -> list[str]:
    """Why ``cache`` cannot stand for ``expected`` (empty list: it matches)."""
    reasons = [f"{COMPONENT_NAMES.get(k, k)} differ" for k in sorted(set(expected) | set(cache.components))
               if cache.components.get(k) != expected.get(k)]
    if not reasons:
        if cache.layer_dims != list(layer_dims):
            reasons.append(f"its layer widths {cache.layer_dims} are not {list(layer_dims)}")
        for split in SPLITS:
            rows = {int(t.shape[0]) for t in cache.layers[split]}
            if rows != {num_tokens[split]}:
                reasons.append(f"it holds {sorted(rows)} {split} positions, not {num_tokens[split]}")
    return reasons


def resolve_context_cache(path: str | Path | None, mode: str, expected: dict[str, str], layer_dims: list[int],
                          num_tokens: dict[str, int], build: Callable[[], ContextCache],
                          write: bool = True) -> tuple[ContextCache, str]:
    """Read the cache at ``path`` if it matches ``expected``, else build (and write) it.

    Returns ``(cache, message)``; the message says "cache hit" or why it was rebuilt.
    ``mode``: ``auto`` | ``require`` | ``off`` (see the module docstring). ``write``: this
    process writes the rebuilt cache (rank 0 of a fit; evaluation never writes). Raises CVFPUserError in
    ``require`` mode when the cache is missing, unreadable or stale.
    """
    check(mode in CACHE_MODES, f"model.cache={mode!r} is unknown: expected one of {', '.join(CACHE_MODES)}.")
    if mode == "off" or path is None:
        cache = build()
        return cache, f"contexts computed in {cache.seconds:.1f}s (cache off)"
    path = Path(path)
    if not path.exists():
        why = f"no context cache at {path}"
    else:
        try:
            cache = read_context_cache(path)
            reasons = stale_reasons(cache, expected, layer_dims, num_tokens)
        except CVFPUserError as exc:
            reasons = [str(exc)]
        if not reasons:
            return cache, f"context cache hit: {path}"
        why = f"the context cache {path} is stale: " + "; ".join(reasons)
    if mode == "require":
        raise CVFPUserError(f"{why}, and model.cache=require: rerun Phase 1 with the ContextCacheHandoff callback "
                            "on this data, point model.cache_path at the right cache, or set model.cache: auto "
                            "to rebuild it.")
    cache = build()
    if not write:
        return cache, f"{why}; contexts recomputed in {cache.seconds:.1f}s (not written)"
    try:
        save_context_cache(cache, path)
    except OSError as exc:
        return cache, f"{why}; contexts recomputed in {cache.seconds:.1f}s (could not write {path}: {exc})"
    return cache, f"{why}; contexts recomputed in {cache.seconds:.1f}s and the cache rewritten"
