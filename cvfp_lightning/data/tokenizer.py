"""The one tokenizer loader: a HF hub name, a local folder, or the bundled tokenizer.

The bundled tokenizer is a byte-level BPE (4096 ids) trained on the bundled corpus by
``scripts/make_bundled_data.py`` and shipped as package data in
``cvfp_lightning/data/bundled/tokenizer``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cvfp_lightning.errors import CVFPUserError

BUNDLED = "bundled"


PACKAGE_DATA = Path(__file__).resolve().parent / "bundled"


def bundled_data_dir() -> Path:
    """The bundled corpus and tokenizer: the package's ``data/bundled`` (override with ``CVFP_DATA_DIR``)."""
    env = os.environ.get("CVFP_DATA_DIR")
    path = Path(env) if env else PACKAGE_DATA
    if not (path / "tokenizer").is_dir():
        raise CVFPUserError(f"bundled data not found in {path}: reinstall cvfp_lightning (its wheel ships "
                            "data/bundled), or set CVFP_DATA_DIR to a folder with tokenizer/ and pydoc_topics.txt.")
    return path


def load_tokenizer(name_or_path: str | None = None, trust_remote_code: bool = False):
    """Load a ``transformers`` tokenizer.

    Args:
        name_or_path: None or ``"bundled"`` for the bundled tokenizer, else a hub name
            (``gpt2``) or a local folder saved with ``save_pretrained``.
        trust_remote_code: passed through; off unless the user sets it.
    Raises:
        CVFPUserError: one line saying what to pass instead when it cannot be loaded
        (offline hub miss, missing folder, not a tokenizer).
    """
    from transformers import AutoTokenizer

    source = str(bundled_data_dir() / "tokenizer") if name_or_path in (None, BUNDLED) else str(name_or_path)
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise CVFPUserError(f"tokenizer folder {source!r} does not exist: pass a folder saved with "
                                "tokenizer.save_pretrained(folder), a hub name such as gpt2, or omit it for the "
                                "bundled tokenizer.")
        source = str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or "offline" in first.lower()
        hint = ("the hub is offline here (HF_HUB_OFFLINE=1): pass a local folder saved with "
                "tokenizer.save_pretrained(folder), or omit --data.tokenizer to use the bundled tokenizer"
                if offline and not looks_local else
                "pass a hub name (e.g. gpt2), a local folder saved with tokenizer.save_pretrained(folder), "
                "or omit it to use the bundled tokenizer")
        raise CVFPUserError(f"tokenizer {name_or_path!r} could not be loaded ({first[:200]}): {hint}.") from exc
    if getattr(tokenizer, "model_max_length", 0) < (1 << 30):
        tokenizer.model_max_length = 1 << 30  # we chunk ourselves; silence the length warning
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """A sha256 of the tokenizer's full definition (vocab, merges, normaliser, specials)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizer: fall back to its vocabulary
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()
