"""Phase 2: next-token prediction on top of a frozen Phase 1 context block.

``Phase2LM`` loads the embedding and the context block from a Phase 1 Lightning
checkpoint (built from its hyperparameters, then its ``state_dict``), freezes the
context block and trains a token block and a head
(:class:`~cvfp_lightning.models.lm.CVFPLanguageModel`):

    t_0 = e_i,   t_l = LN(t_{l-1} + ReLU(W_l [c_il; t_{l-1}] + b_l)),   logits_i = head(t_L)

with ``c_il`` the output of context layer l after reading token i, and cross-entropy
against id i+1. Since the context block is frozen, every position's contexts are fixed: the
final context of every position comes from the context cache
(:mod:`cvfp_lightning.context_cache`: "cache hit", memory-mapped) or one sequential pass,
the per-layer outputs of a batch are recomputed from the final context of the position
before (``c_il`` depends only on ``c_{i-1}`` and ``e_i``: one forward of the frozen block
per position and epoch), and training draws shuffled batches of positions (``data_layout =
"positions"``, batch size ``data.chunk_size``).

Metrics, optimiser and best-weight handling: :class:`~cvfp_lightning.modules.lm_base.NextTokenModule`.
Generation (``cvfp predict``): every prompt (served by the data module, which receives
them through ``connect``) is read token by token with the update rule of training, then
``max_new_tokens`` ids are generated (greedy, or temperature, top-k and top-p sampling,
:mod:`cvfp_lightning.generation`); :class:`~cvfp_lightning.callbacks.GenerationWriter` prints the continuations and writes
``generations.jsonl`` in the run's log folder.

Only training options are saved as hyperparameters; where the Phase 1 checkpoint lies,
the cache settings and the generation options may change between fit, test and predict.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path
from typing import Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cvfp_lightning.context_cache import (
    CACHE_DIRNAME,
    CACHE_MODES,
    ContextSource,
    resolve_contexts,
    state_digest,
    weights_digest,
)
from cvfp_lightning.data.prompts import read_prompts
from cvfp_lightning.data.snapshot import find_data_snapshot
from cvfp_lightning.data.tokenizer import tokenizer_fingerprint
from cvfp_lightning.errors import CVFPUserError, check, check_positive
from cvfp_lightning.generation import check_sampling
from cvfp_lightning.io import safe_torch_load
from cvfp_lightning.models.context import build_context_updater
from cvfp_lightning.models.continuous_cache import ContinuousCache
from cvfp_lightning.models.embedding import build_embedding
from cvfp_lightning.models.legacy import upgrade_legacy_state_dict
from cvfp_lightning.models.lm import CVFPLanguageModel
from cvfp_lightning.modules.checkpoint_fit import shape_mismatches
from cvfp_lightning.modules.lm_base import NextTokenModule

STATE_KEY = "cvfp_phase2"
def resolve_checkpoint_path(path: str | None) -> Path:
    """``path``, or the newest file matching it when it is a glob pattern."""
    check(bool(path), "model.phase1_checkpoint is not set: give the Phase 1 checkpoint, e.g. "
                      "--model.phase1_checkpoint lightning_logs/phase1/version_0/checkpoints/last.ckpt "
                      "(run cvfp fit --config configs/phase1.yaml first).")
    expanded = os.path.expanduser(str(path))
    if any(ch in expanded for ch in "*?["):
        matches = [m for m in glob.glob(expanded) if os.path.isfile(m)]
        check(bool(matches), f"model.phase1_checkpoint={path!r} matches no file: run Phase 1 first "
                             "(cvfp fit --config configs/phase1.yaml) or give the checkpoint's path.")
        return Path(max(matches, key=os.path.getmtime))
    check(not os.path.isdir(expanded), f"model.phase1_checkpoint={path!r} is a folder: give the path of a checkpoint "
                                       "in it, e.g. .../checkpoints/last.ckpt.")
    check(os.path.isfile(expanded), f"model.phase1_checkpoint={path!r} does not exist: run Phase 1 first "
                                    "(cvfp fit --config configs/phase1.yaml) or give the path of its last.ckpt.")
    return Path(expanded)


def load_phase1(path: Path, vocab_size: int = 0, checkpoint: dict | None = None):
    """Embedding and context block of a Phase 1 checkpoint: ``(embedding, updater, hparams)``.

    Built from the checkpoint's hyperparameters without fetching a pretrained embedding
    (the weights are in the checkpoint), then loaded from its ``state_dict``.
    ``vocab_size`` (when > 0) must equal the checkpoint's. ``checkpoint``: the file's content when
    the caller has read it already.
    """
    ckpt = checkpoint if checkpoint is not None else safe_torch_load(path)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    is_phase1 = (isinstance(hp, dict) and isinstance(state, dict) and {"vocab_size", "context", "embedding"} <= set(hp)
                 and any(k.startswith("updater.") for k in state) and "embedding.embed.weight" in state)
    check(is_phase1, f"model.phase1_checkpoint={str(path)!r} is not a Phase 1 checkpoint (no context block and "
                     "embedding in it): give a checkpoint written by cvfp fit with Phase1FixedPoint.")
    check(vocab_size <= 0 or int(hp["vocab_size"]) == vocab_size,
          f"model.phase1_checkpoint={str(path)!r} was trained with a vocabulary of {hp['vocab_size']} ids but the data's "
          f"tokenizer has {vocab_size}: use the tokenizer (data settings) of that Phase 1 run.")
    try:
        embedding = build_embedding(int(hp["vocab_size"]), hp["embedding"],
                                    default_dim=int(hp["context"]["context_dim"]), load_pretrained=False)
        updater = build_context_updater(hp["context"], embedding.embed_dim)
        embedding.load_state_dict({k[len("embedding."):]: v for k, v in state.items() if k.startswith("embedding.")})
        updater_state = {k[len("updater."):]: v for k, v in state.items() if k.startswith("updater.")}
        upgrade_legacy_state_dict(updater_state, updater)  # a checkpoint from before ConcatLinear
        updater.load_state_dict(updater_state)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise CVFPUserError(f"model.phase1_checkpoint={str(path)!r}: its weights do not fit its own hyperparameters "
                            f"({first}); the file is damaged or was edited: use another checkpoint.") from exc
    return embedding, updater, hp


def phase1_from_record(record: dict, vocab_size: int = 0):
    """``(path, embedding, updater, hparams)`` of a recorded Phase 1 pairing, freshly initialised.

    The weights are not read from the Phase 1 file: they are part of the Phase 2
    checkpoint that carries the record and are loaded from it right after.
    """
    hp = record.get("hparams") if isinstance(record, dict) else None
    check(isinstance(hp, dict) and {"vocab_size", "context", "embedding"} <= set(hp),
          f"model.phase1={record!r} is not a Phase 1 pairing (expected the checkpoint, weights and hparams a "
          "Phase 2 checkpoint records): leave model.phase1 unset.")
    check(vocab_size <= 0 or int(hp["vocab_size"]) == vocab_size,
          f"this Phase 2 model was trained with a vocabulary of {hp['vocab_size']} ids but the data's tokenizer has "
          f"{vocab_size}: use the tokenizer (data settings) of that run.")
    embedding = build_embedding(int(hp["vocab_size"]), hp["embedding"], default_dim=int(hp["context"]["context_dim"]),
                                load_pretrained=False)
    updater = build_context_updater(hp["context"], embedding.embed_dim)
    return Path(str(record.get("checkpoint") or "")), embedding, updater, hp


class Phase2LM(NextTokenModule):
    """Phase 2 CVFP language model (see the module docstring).

    Args:
        vocab_size: number of ids (linked from ``data.vocab_size``); must equal Phase 1's.
        phase1_checkpoint: the Phase 1 ``.ckpt`` (a glob pattern picks the newest match).
        phase1: the Phase 1 pairing recorded in a Phase 2 checkpoint (``checkpoint``: the
            resolved Phase 1 path, ``weights``: the digest of its embedding and context block,
            ``hparams``: its ``vocab_size``, ``context``, ``embedding``). Leave it null: it is set
            from the checkpoint by ``--ckpt_path`` and ``load_from_checkpoint``, and then the model
            is built from it (weights from the checkpoint) instead of from ``phase1_checkpoint``.
        weight_tying: the head is the embedding matrix (shared storage) instead of a
            zero-initialised ``Linear(E, V)``.
        freeze_embedding: keep the embedding fixed (the seed documents' setting with GPT-2 ``wte``).
        lr: Adam learning rate.
        weight_decay: AdamW's decoupled weight decay of the weight matrices (0: Adam; see
            :func:`cvfp_lightning.optim.adam`).
        grad_clip: max gradient norm (0 disables).
        dropout: training-time dropout on the contexts and token embedding the token block reads and
            on its output before the head (:class:`~cvfp_lightning.models.lm.CVFPLanguageModel`);
            none in evaluation, so the exported model is the same function. 0 disables.
        token_history: K, the ids before each position whose (trained) embeddings the token block
            reads besides the contexts (:class:`~cvfp_lightning.models.token.TokenBlock`); the
            position batches carry them (``history``). 0: the seed documents' token block.
        continuous_cache: ``{size, theta, weight}`` of a continuous cache
            (:mod:`cvfp_lightning.models.continuous_cache`): validation and test score each split's
            text with it (the memory of the last ``size`` positions before each one, in the split's
            order), as do ``cvfp evaluate`` and generation of the exported model; training reads the
            model alone. null: none.
        cache: ``auto`` | ``require`` | ``off`` (see :mod:`cvfp_lightning.context_cache`).
        cache_path: cache folder, read and (when stale or missing) rewritten. Default: read from
            ``context_cache/`` next to ``phase1_checkpoint`` (Phase 1's ``ContextCacheHandoff``); a fit
            that has to compute its contexts writes them into its own run folder, never the Phase 1 run's.
        seq_batch_size: sequences per batch of the sequential pass.
        prompts: generation prompts (``cvfp predict``).
        prompt_file: a UTF-8 file with one prompt per non-empty line.
        max_new_tokens: ids generated per prompt.
        temperature: softmax temperature (> 0) of sampling.
        top_k: sample among the k most likely ids (null: all).
        top_p: sample among the most likely ids whose probabilities sum to top_p (null: all).
        greedy: take the most likely id instead of sampling.
        seed: seed of every prompt's samples (default 42, ``cvfp generate``'s default, so the two give
            the same continuations for the same options; null: the run's global RNG, set by
            ``seed_everything``); ``cvfp generate --seed`` of the exported model gives the same ones.
    """

    data_layout = "positions"
    RECORDED_ARGS = ("phase1",)  # written into the checkpoint's hyper_parameters by on_save_checkpoint
    READING_ARGS = ("continuous_cache",)  # how text is read, no weights: cvfp validate / test / predict may change it

    def __init__(self, vocab_size: int = 0, phase1_checkpoint: str | None = None, phase1: dict | None = None,
                 weight_tying: bool = False,
                 freeze_embedding: bool = True, lr: float = 1e-3, grad_clip: float = 1.0, dropout: float = 0.0,
                 cache: Literal["auto", "require", "off"] = "auto", cache_path: str | None = None,
                 seq_batch_size: int = 256, prompts: list[str] | str | None = None, prompt_file: str | None = None,
                 max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool = False, top_p: float | None = None, seed: int | None = 42,
                 weight_decay: float = 0.0, token_history: int = 0,
                 continuous_cache: ContinuousCache | None = None):
        super().__init__()
        check(cache in CACHE_MODES, f"model.cache={cache!r} is unknown: expected one of {', '.join(CACHE_MODES)}.")
        check_positive("model.lr", lr)
        check_positive("model.weight_decay", weight_decay, allow_zero=True)
        check_positive("model.grad_clip", grad_clip, allow_zero=True)
        check_positive("model.seq_batch_size", seq_batch_size)
        check_sampling(temperature, top_k, top_p, max_new_tokens, prefix="model.")
        self.prompts = read_prompts(prompts, prompt_file)
        self.max_new_tokens, self.temperature, self.top_k, self.greedy = max_new_tokens, temperature, top_k, greedy
        self.top_p, self.seed = top_p, seed
        self.cache_mode, self.cache_path, self.seq_batch_size = cache, cache_path, seq_batch_size

        self._phase1_snapshot: dict | None = None  # the Phase 1 run's data snapshot (its tokenizer), once read
        if phase1 is not None:  # the pairing of a Phase 2 checkpoint: its own weights follow
            self.phase1_path, embedding, updater, p1 = phase1_from_record(phase1, vocab_size)
        else:
            self.phase1_path = resolve_checkpoint_path(phase1_checkpoint)
            ckpt = safe_torch_load(self.phase1_path)
            embedding, updater, p1 = load_phase1(self.phase1_path, vocab_size, ckpt)
            self._phase1_snapshot = find_data_snapshot(ckpt) or {}
        self.phase1_hparams = p1
        self.lm = CVFPLanguageModel(embedding, updater, weight_tying=weight_tying, train_embedding=not freeze_embedding,
                                    dropout=dropout, token_history=token_history,
                                    continuous_cache=continuous_cache)
        # built from a record, the block is freshly initialised until the checkpoint's weights are loaded
        # (on_load_checkpoint checks them against the recorded digest): the digest is the record's
        self.phase1_digest = (str(phase1.get("weights") or "") if phase1 is not None
                              else weights_digest(*self.lm.context_modules()))
        self.save_hyperparameters({"vocab_size": int(p1["vocab_size"]), "weight_tying": weight_tying,
                                   "freeze_embedding": freeze_embedding, "lr": lr, "grad_clip": grad_clip,
                                   "dropout": dropout, "weight_decay": weight_decay, "token_history": token_history,
                                   "continuous_cache": (None if self.lm.continuous_cache is None
                                                        else self.lm.continuous_cache.to_dict())})
        self._contexts = None  # context_cache.Contexts: final contexts by position
        self._test_split = "test"
        self._contexts_for: tuple | None = None
        self.context_status = ""
        self.context_seconds = 0.0

    def _cache_folder(self) -> Path:
        return Path(self.cache_path) if self.cache_path else self.phase1_path.parent / CACHE_DIRNAME

    def _write_folder(self) -> Path | None:
        """Where a fit writes contexts it had to compute: ``cache_path`` when given, else this run's
        own log folder (None without a logger: not written); never the Phase 1 run's (its cache
        is that run's, for its own data)."""
        if self.cache_path:
            return Path(self.cache_path)
        has_folder = self.trainer.logger is not None and self.trainer.log_dir
        return Path(self.trainer.log_dir) / CACHE_DIRNAME if has_folder else None

    def _check_tokenizer(self) -> None:
        """The data's tokenizer must be the Phase 1 run's (with a fitted one, same size is not enough)."""
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        if tok is None or (self._phase1_snapshot is None and not self.phase1_path.is_file()):
            return
        if self._phase1_snapshot is None:  # built from a record: the Phase 1 file is read only now
            self._phase1_snapshot = find_data_snapshot(safe_torch_load(self.phase1_path)) or {}
        expected = (self._phase1_snapshot.get("tokenizer") or {}).get("fingerprint")
        check(expected is None or expected == tokenizer_fingerprint(tok),
              f"the data's tokenizer is not the one Phase 1 was trained with ({self.phase1_path}): give the data "
              "block (paths, splits, tokenizer) of that Phase 1 run.")

    # ---- contexts ----------------------------------------------------------------------------
    def _ensure_contexts(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or getattr(dm, "train_sequences", None) is None:
            if dm is not None and hasattr(dm, "setup"):
                dm.setup("fit")
            if getattr(dm, "train_sequences", None) is None:
                raise CVFPUserError("Phase2LM needs a TokenDataModule (data: class_path: "
                                    "cvfp_lightning.data.TextDataModule or similar) that provides train/val sequences.")
        key = tuple(id(getattr(dm, f"{s}_sequences", None)) for s in ("train", "val", "test"))
        if self._contexts_for == key:
            return
        source = ContextSource(*self.lm.context_modules(), dm, self.phase1_hparams)
        start = time.perf_counter()
        write_folder = self._write_folder() if self.trainer.state.fn == "fit" else None
        self._contexts, message = resolve_contexts(self._cache_folder(), self.cache_mode, source, self.trainer,
                                                   self.seq_batch_size, write=write_folder is not None,
                                                   write_folder=write_folder)
        self._test_split = "test" if getattr(dm, "test_sequences", None) is not None else "val"
        self._contexts_for = key
        self.context_status, self.context_seconds = message, time.perf_counter() - start
        rank_zero_info(f"Phase2LM: {message} (contexts ready in {self.context_seconds:.1f}s)")
        for logger in self.loggers:  # fingerprint + open (cache hit) or + sequential pass (rebuild)
            logger.log_metrics({"time/contexts_s": self.context_seconds}, step=self.global_step)

    def on_fit_start(self) -> None:
        self._check_tokenizer()
        self._ensure_contexts()

    def on_validation_start(self) -> None:
        self._ensure_contexts()

    def on_test_start(self) -> None:
        self._ensure_contexts()

    # ---- the model ---------------------------------------------------------------------------
    def forward(self, context: Tensor, ids: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One token: ``context (B, D), ids (B,)``, with a history the ids before ``(B, K)``
        ``-> (new context (B, D), logits (B, V))``."""
        return self.lm.step(context, ids, history)

    def logits_targets(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        """The frozen block's per-layer outputs at each position, recomputed from the cached final
        context of the position before (``c_{i-1}``, 0 where a sequence starts): ``[(n, d_l)]``;
        validation and test read with the continuous cache, if any (its memory: the split's positions)."""
        if self._contexts is None:
            raise RuntimeError("Phase2LM: contexts were not prepared (on_fit_start / on_validation_start).")
        name = self._test_split if split == "test" else split
        previous = self._contexts.previous(name, batch["positions"], batch["is_start"]).to(self.device)  # (n, D)
        if split == "train":
            return self.lm.step(previous, batch["ids"], batch.get("history"))[1], batch["targets"]  # (n, V), (n,)
        seqs = getattr(self.trainer.datamodule, f"{name}_sequences")
        rows = self._contexts.position_rows(name, seqs, self.lm.token_history)  # the cache's memory
        return self.lm.score_positions(batch, previous, rows), batch["targets"]

    def num_trainable_parameters(self) -> int:
        return self.lm.num_trainable_parameters()

    def summary_extra(self) -> dict:
        return {"phase1_checkpoint": str(self.phase1_path), "contexts": self.context_status,
                "contexts_s": self.context_seconds}

    # ---- checkpoints ---------------------------------------------------------------------------
    def phase1_record(self) -> dict:
        """The Phase 1 pairing: its resolved path, the digest of its weights and its hyperparameters."""
        p1 = self.phase1_hparams
        return {"checkpoint": str(self.phase1_path), "weights": self.phase1_digest,
                "hparams": {"vocab_size": int(p1["vocab_size"]), "context": dict(p1["context"]),
                            "embedding": dict(p1["embedding"])}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the Phase 1 pairing; as the ``phase1`` argument, ``load_from_checkpoint`` and
        ``--ckpt_path`` rebuild this model from it without the Phase 1 file."""
        record = self.phase1_record()
        checkpoint[STATE_KEY] = {"phase1_checkpoint": record["checkpoint"], "phase1_weights": record["weights"]}
        checkpoint.setdefault("hyper_parameters", {})["phase1"] = record

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        record = (checkpoint.get("hyper_parameters") or {}).get("phase1")
        if isinstance(record, dict) and record.get("weights"):
            prefixes = ("lm.embedding." if self.lm.context_embedding is None else "lm.context_embedding.",
                        "lm.updater.")
            found = state_digest(*({k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in prefixes))
            if found != record["weights"]:
                if "current_model_state" in checkpoint:  # written by a Lightning WeightAveraging callback
                    raise CVFPUserError("the checkpoint's averaged weights moved the frozen context block (Lightning's "
                                        "EMAWeightAveraging does not keep unchanged weights exact): train Phase 2 with "
                                        "cvfp_lightning.callbacks.EMAWeights, whose update leaves them bit-identical.")
                raise CVFPUserError(f"the checkpoint's context block is not the Phase 1 model it records "
                                    f"({record.get('checkpoint')}, weights digest differs): the file was altered; use "
                                    "the checkpoint its fit run wrote.")
        self._contexts_for = None  # weights may have changed: contexts are checked again

    def check_checkpoint_fits(self, checkpoint: dict) -> None:
        """The checkpoint's weights are this model's, name for name and shape for shape (one line if not)."""
        state = checkpoint.get("state_dict", {})
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = shape_mismatches(own, state)
        if missing or unexpected or shapes:
            detail = "; ".join(shapes[:4] + [f"missing {missing[:4]}"] * bool(missing)
                               + [f"unexpected {unexpected[:4]}"] * bool(unexpected))
            raise CVFPUserError(f"the checkpoint does not fit this Phase 2 model built from {str(self.phase1_path)!r} "
                                "(a Phase 1 model of another shape, or other weight_tying/freeze_embedding/"
                                f"token_history): {detail}. Use the phase1_checkpoint and settings of the run that "
                                "wrote it.")

    # ---- generation ----------------------------------------------------------------------------
    def data_request(self) -> dict:
        return {**super().data_request(), "prompts": self.prompts, "history": self.lm.token_history}

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """``{"prompt": str, "ids": (T,)} -> {"prompt", "ids": (max_new_tokens,) the generated ids}``."""
        new_ids = self.lm.generate(batch["ids"], self.max_new_tokens, self.temperature, self.top_k, self.greedy,
                                   top_p=self.top_p, seed=self.seed)
        return {"prompt": batch["prompt"], "ids": new_ids}
