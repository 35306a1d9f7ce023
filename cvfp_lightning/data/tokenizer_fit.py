"""A byte-level BPE fitted to the training split: ``data.tokenizer: {train: {vocab_size: N}}``.

The bundled tokenizer is fitted on Python documentation; on other text it cuts words into
short pieces (English prose: about 2.35 UTF-8 bytes per token with it, 3.9 with 2048 ids
fitted to the prose itself). With ``tokenizer: {train: {vocab_size: N, min_frequency: 2}}``
the data module fits a byte-level BPE (``tokenizers.ByteLevelBPETokenizer``, as the bundled
one, GPT-2's pre-tokenisation) on exactly the samples of its training split
(:meth:`~cvfp_lightning.data.base.TokenDataModule.train_texts`: never a validation or test
sample), with ``<|endoftext|>`` as EOS (the id the data module appends to every sample),
BOS and UNK, and wraps it as a ``transformers.PreTrainedTokenizerFast``.

The fit is stored content-keyed in ``<cache_dir>/tokenizers/<key>/`` (the folder
``save_pretrained`` writes, plus ``fit.json``: options, training samples and bytes,
fingerprint), key = sha256 of the training texts, the options and the ``tokenizers``
version. A second run on the same training text (Phase 2 after Phase 1, another rank,
``cvfp evaluate``) reads that folder: one tokenizer per training text. The BPE trainer is
deterministic, so the same text refits to the same tokenizer (same fingerprint) on another
machine. From there it is a tokenizer like any other: fingerprinted
(:func:`~cvfp_lightning.data.tokenizer.tokenizer_fingerprint`) into the token cache key and
the context cache, carried in every checkpoint (:mod:`cvfp_lightning.data.snapshot`) and
written into exports, so Phase 2, evaluation and export all use it.

The vocabulary has at most ``vocab_size`` ids: fewer when the text runs out of pairs seen
``min_frequency`` times (the byte alphabet, 256 ids, and EOS are always there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cvfp_lightning.errors import ConfigMixin, check

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
BYTE_ALPHABET = 256
FIT_RECORD = "fit.json"


@dataclass
class BPETraining(ConfigMixin):
    """Options of the fit (``data.tokenizer: {train: {...}}``).

    Args:
        vocab_size: the most ids of the tokenizer (256 bytes + EOS + merges).
        min_frequency: a pair is merged only when it occurs at least this often.
    """

    _name = "data.tokenizer.train"
    vocab_size: int = 4096
    min_frequency: int = 2

    def __post_init__(self) -> None:
        check(isinstance(self.vocab_size, int) and not isinstance(self.vocab_size, bool)
              and self.vocab_size > BYTE_ALPHABET + 1,
              f"data.tokenizer.train.vocab_size={self.vocab_size!r} is invalid: expected an integer above "
              f"{BYTE_ALPHABET + 1} (the 256 bytes and EOS), e.g. 4096.")
        check(isinstance(self.min_frequency, int) and not isinstance(self.min_frequency, bool)
              and self.min_frequency >= 1,
              f"data.tokenizer.train.min_frequency={self.min_frequency!r} is invalid: expected an integer >= 1.")


def training_spec(value) -> BPETraining | None:
    """The fit that ``data.tokenizer`` asks for (a mapping ``{train: {...}}``), None for a name, folder or null."""
    if not isinstance(value, dict):
        return None
    check(set(value) == {"train"}, f"data.tokenizer={value!r} is invalid: a mapping must be "
                                   "{train: {vocab_size: N}} (fit a BPE on the training split); otherwise give a hub "
                                   "name, a folder, or null for the bundled tokenizer.")
    return BPETraining.coerce(value["train"])


def fit_byte_level_bpe(texts: Iterable[str], spec: BPETraining):
    """A byte-level BPE fitted on ``texts``, as a ``PreTrainedTokenizerFast`` with EOS = BOS = UNK = ``<|endoftext|>``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                            special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                   model_max_length=1 << 30)


def fit_key(texts: Iterable[str], spec: BPETraining) -> tuple[str, int, int]:
    """``(key, samples, bytes)`` of a fit: sha256 of the options, the tokenizers version and every text."""
    import tokenizers

    h = hashlib.sha256(json.dumps({"spec": spec.to_dict(), "tokenizers": tokenizers.__version__,
                                   "kind": "byte-level-bpe"}, sort_keys=True).encode())
    samples = nbytes = 0
    for text in texts:
        raw = text.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
        samples, nbytes = samples + 1, nbytes + len(raw)
    return h.hexdigest()[:32], samples, nbytes


def fitted_tokenizer(texts: Callable[[], Iterable[str]], spec: BPETraining, cache_dir: str | Path,
                     what: str = "the training split"):
    """The tokenizer fitted on the texts ``texts()`` yields, from the cache or fitted now.

    ``texts`` is called once for the key and once more for a fit, so the texts are streamed
    (never held as one list). The folder is written under a temporary name and renamed into
    place: concurrent ranks and an interrupted fit never leave a half-written one.
    """
    from cvfp_lightning.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    key, samples, nbytes = fit_key(texts(), spec)
    check(nbytes > 0, f"{what} holds no text to fit data.tokenizer.train on.")
    folder = Path(cache_dir) / "tokenizers" / key
    if not (folder / FIT_RECORD).is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = fit_byte_level_bpe(texts(), spec)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
        try:
            tokenizer.save_pretrained(str(tmp))
            record = {"spec": spec.to_dict(), "samples": samples, "bytes": nbytes, "fitted_on": what,
                      "vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}
            (tmp / FIT_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if folder.exists():  # another rank was first: its fit is the same
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            check((folder / FIT_RECORD).is_file(), f"could not write the fitted tokenizer to {folder}.")
        log.info("fitted a %d-id byte-level BPE on %d samples (%d bytes) of %s: %s", len(tokenizer), samples,
                 nbytes, what, folder)
    return load_tokenizer(str(folder))
