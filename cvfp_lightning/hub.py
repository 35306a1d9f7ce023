"""Exported models: plain ``nn.Module`` s that save to and load from a Hugging Face-style folder.

``cvfp export`` (:mod:`cvfp_lightning.export`) writes a trained model as::

    model.safetensors        the weights (safetensors: no pickle; a tied head is stored once)
    config.json              the constructor arguments, plus "cvfp_export": what kind of model,
                             how text was arranged in training, the tokenizer's fingerprint
    tokenizer.json, tokenizer_config.json   the training tokenizer (save_pretrained)
    README.md                the model card

and both classes load it back with ``from_pretrained(folder or hub id)``
(``huggingface_hub.PyTorchModelHubMixin``: ``save_pretrained``, ``push_to_hub`` as well):

- :class:`CVFPModel`: the Phase 2 model, a :class:`~cvfp_lightning.models.lm.CVFPLanguageModel`
  (embedding, context block, token block, head) built from ``vocab_size``, ``context``,
  ``embedding``, ``weight_tying``, ``train_embedding``, ``token_history`` and
  ``continuous_cache`` (how it reads text; no weights). A tied head is the embedding's
  Parameter by construction, so it stays tied after loading.
- :class:`BaselineModel`: a GRU / LSTM / Transformer baseline
  (:func:`~cvfp_lightning.models.baselines.build_baseline`).

A loaded model carries ``tokenizer`` (the folder's tokenizer, checked against the recorded
fingerprint) and ``export_info`` (the ``cvfp_export`` entry of ``config.json``);
``save_pretrained`` of a loaded model writes them again. :func:`load_exported` reads a folder
of either kind. Loading runs no remote code and refuses missing or unexpected weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from torch import Tensor, nn

from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.generation import decode
from cvfp_lightning.models.baselines import RecurrentLM, build_baseline
from cvfp_lightning.models.context import build_context_updater
from cvfp_lightning.models.embedding import build_embedding
from cvfp_lightning.models.lm import CVFPLanguageModel

EXPORT_KEY = "cvfp_export"
FORMAT = 1
LIBRARY = "cvfp_lightning"
MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

{{ body | default("A language model exported by cvfp_lightning (`cvfp export`).", true) }}
"""


class ExportMixin(PyTorchModelHubMixin, library_name=LIBRARY, tags=["cvfp_lightning", "text-generation"],
                  model_card_template=MODEL_CARD_TEMPLATE):
    """``PyTorchModelHubMixin`` with strict loading, the tokenizer and the export record.

    Attributes:
        tokenizer: the tokenizer saved with the model (None until set or loaded).
        export_info: the ``cvfp_export`` record of ``config.json`` (kind of model, arrangement of text,
            tokenizer fingerprint, source checkpoint).
    """

    tokenizer = None
    export_info: dict | None = None
    kind = ""

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)  # model.safetensors
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        if self.export_info is not None and isinstance(self._hub_mixin_config, dict):
            config = {**self._hub_mixin_config, EXPORT_KEY: self.export_info}
            (save_directory / constants.CONFIG_NAME).write_text(json.dumps(config, sort_keys=True, indent=2) + "\n")

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, map_location: str = "cpu", strict: bool = True,
                         config: dict | None = None, **model_kwargs):
        """Build from ``config.json``, load ``model.safetensors`` (strict by default), attach the tokenizer."""
        from cvfp_lightning.data.tokenizer import load_tokenizer, tokenizer_fingerprint

        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, constants.SAFETENSORS_SINGLE_FILE)
        else:
            weights = hf_hub_download(repo_id=model_id, filename=constants.SAFETENSORS_SINGLE_FILE, revision=revision,
                                      cache_dir=cache_dir, force_download=force_download, token=token,
                                      local_files_only=local_files_only)
        model = cls._load_as_safetensor(model, weights, map_location, strict)
        info = (config or {}).get(EXPORT_KEY)
        if isinstance(info, dict):
            model.export_info = info
            if info.get("tokenizer_fingerprint"):
                model.tokenizer = load_tokenizer(model_id)
                check(tokenizer_fingerprint(model.tokenizer) == info["tokenizer_fingerprint"],
                      f"the tokenizer files in {model_id!r} are not the ones the model was exported with "
                      "(fingerprint differs): export the model again.")
        return model

    @property
    def arrangement(self) -> dict:
        """How training arranged text into sequences (``data.snapshot.ARRANGEMENT``), ``{}`` when unknown."""
        return dict((self.export_info or {}).get("arrangement") or {})


class CVFPModel(CVFPLanguageModel, ExportMixin):
    """The exported Phase 2 CVFP language model (see :class:`~cvfp_lightning.models.lm.CVFPLanguageModel`).

    Args:
        vocab_size: V, ids of the tokenizer.
        context: the Phase 1 context block's options (``ContextConfig`` fields).
        embedding: the embedding's options (``EmbeddingConfig`` fields, ``embed_dim`` set); a
            ``pretrained`` name is never fetched, the weights are in the folder.
        weight_tying: the head is the embedding matrix.
        train_embedding: the embedding trained in Phase 2; the context block reads the frozen
            Phase 1 copy ``context_embedding``.
        token_history: the ids before each position the token block reads (0: none).
        continuous_cache: ``{size, theta, weight}`` of the continuous cache that scoring and
            generation read text with (:mod:`cvfp_lightning.models.continuous_cache`); None: none.
    """

    kind = "cvfp"

    def __init__(self, vocab_size: int, context: dict, embedding: dict, weight_tying: bool = False,
                 train_embedding: bool = False, token_history: int = 0, continuous_cache: dict | None = None):
        emb = build_embedding(int(vocab_size), embedding, default_dim=int(context["context_dim"]), load_pretrained=False)
        super().__init__(emb, build_context_updater(context, emb.embed_dim), weight_tying=weight_tying,
                         train_embedding=train_embedding, token_history=int(token_history),
                         continuous_cache=continuous_cache)


class BaselineModel(nn.Module, ExportMixin):
    """An exported baseline language model, ``ids (B, T) -> logits (B, T, V)`` (see :mod:`cvfp_lightning.models.baselines`).

    Generation (:meth:`step`): a GRU / LSTM carries its recurrent state from token to
    token; a Transformer reruns its causal forward on the last ``max_len`` ids (a sliding
    window once the text is longer than ``max_len``).
    """

    kind = "baseline"

    def __init__(self, arch: str, vocab_size: int, hidden_dim: int, num_layers: int = 1, num_heads: int = 4,
                 max_len: int = 512, dropout: float = 0.0):
        super().__init__()
        self.arch = arch
        self.net = build_baseline(arch, int(vocab_size), int(hidden_dim), num_layers, num_heads, max_len, dropout)

    @property
    def vocab_size(self) -> int:
        return int(self.net.head.out_features)

    def forward(self, ids: Tensor) -> Tensor:
        """``(B, T) -> (B, T, V)`` logits; the state starts at 0 (as in every training window)."""
        return self.net(ids)

    def step(self, state, ids: Tensor):
        """Read ``ids (B, t)`` after ``state`` (None at the start): ``-> (state, logits of the last id (B, V))``."""
        ids = ids.to(self.net.head.weight.device)
        if isinstance(self.net, RecurrentLM):
            logits, state = self.net(ids, state, return_state=True)
            return state, logits[:, -1]
        state = ids if state is None else torch.cat([state, ids], dim=1)  # the ids so far
        return state, self.net(state[:, -self.net.max_len:])[:, -1]

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool = False, generator: torch.Generator | None = None, top_p: float | None = None,
                 seed: int | None = None) -> Tensor:
        """Continue ``prompt_ids (T,)`` by ``max_new_tokens`` ids (:func:`cvfp_lightning.generation.decode`)."""
        return decode(self.step, None, prompt_ids, max_new_tokens, greedy=greedy, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed, generator=generator)


MODEL_CLASSES: dict[str, type[ExportMixin]] = {"cvfp": CVFPModel, "baseline": BaselineModel}


def read_export_config(path: str | Path) -> dict:
    """``config.json`` of an exported folder (or hub repository), checked to be a cvfp_lightning export."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        config_file = folder / constants.CONFIG_NAME
        check(config_file.is_file(), f"{str(path)!r} is not a cvfp_lightning export (no config.json in it): give a "
                                     "folder written by cvfp export --ckpt_path <best.ckpt> --out_dir <folder>.")
    else:
        check(not str(path).startswith((".", "/", "~")) and str(path).count("/") == 1,
              f"{str(path)!r} does not exist: give a folder written by cvfp export, or a checkpoint (.ckpt).")
        try:
            config_file = Path(hf_hub_download(repo_id=str(path), filename=constants.CONFIG_NAME))
        except Exception as exc:  # noqa: BLE001 - offline, missing repository, network errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise CVFPUserError(f"{str(path)!r} is neither a local folder nor a hub repository that could be read "
                                f"({first}).") from exc
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CVFPUserError(f"{str(config_file)!r} is not valid JSON ({exc}): export the model again.") from None
    info = config.get(EXPORT_KEY) if isinstance(config, dict) else None
    check(isinstance(info, dict) and info.get("model") in MODEL_CLASSES,
          f"{str(path)!r} is not a cvfp_lightning export (its config.json has no {EXPORT_KEY!r} record of a "
          f"{' or '.join(MODEL_CLASSES)} model): give a folder written by cvfp export.")
    check(int(info.get("format", 0)) <= FORMAT,
          f"{str(path)!r} was exported by a newer cvfp_lightning (format {info.get('format')}, this one reads "
          f"{FORMAT}): upgrade cvfp_lightning.")
    if folder.is_dir():
        check((folder / constants.SAFETENSORS_SINGLE_FILE).is_file(),
              f"{str(path)!r} has no {constants.SAFETENSORS_SINGLE_FILE}: the export is incomplete; export it again.")
    return config


def load_exported(path: str | Path, map_location: str = "cpu") -> CVFPModel | BaselineModel:
    """The model of an exported folder (or hub repository), of the class its ``config.json`` names."""
    info = read_export_config(path)[EXPORT_KEY]
    cls = MODEL_CLASSES[info["model"]]
    folder = Path(path).expanduser()
    try:
        return cls.from_pretrained(str(folder) if folder.is_dir() else str(path), map_location=map_location)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, CVFPUserError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CVFPUserError(f"{str(path)!r}: the exported weights do not load ({first}); the folder is damaged or "
                            "was edited: export the model again.") from exc
