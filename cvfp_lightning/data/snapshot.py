"""What a checkpoint must carry about its data so the model can leave the project.

A model is only usable with the tokenizer it was trained with, and its evaluation is
only comparable when text is cut into sequences the same way as in training. Both are
written into every checkpoint by ``TokenDataModule.state_dict`` (Lightning stores it under
the data module's class name) as ``state[SNAPSHOT_KEY]``::

    {"format": 1,
     "datamodule": "TextDataModule",
     "source": "text files [...]",                 # describe(), for the model card
     "tokenizer": {"files": {name: str | bytes},   # the folder tokenizer.save_pretrained writes
                   "fingerprint": sha256,          # tokenizer_fingerprint of the saved tokenizer
                   "vocab_size": V} | None,        # None: no tokenizer (synthetic ids)
     "arrangement": {"sample_by", "sequences", "max_seq_len", "add_eos", "seq_len",
                     "chunk_size", "batch_size"}}

The tokenizer files are the ones ``save_pretrained`` writes (``tokenizer.json`` and
``tokenizer_config.json`` for a fast tokenizer: 0.27 MB for the bundled one, more for large
vocabularies such as GPT-2's; 8 ms per checkpoint): no hub access is needed to rebuild it, and :func:`restore_tokenizer` checks the
rebuilt tokenizer's fingerprint against the recorded one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cvfp_lightning.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from cvfp_lightning.errors import CVFPUserError, check

SNAPSHOT_KEY = "portable"
FORMAT = 1
ARRANGEMENT = ("sample_by", "sequences", "max_seq_len", "add_eos", "seq_len", "chunk_size", "batch_size")


def tokenizer_snapshot(tokenizer) -> dict | None:
    """The files of ``tokenizer.save_pretrained`` (text as str, anything else as bytes), its fingerprint, V."""
    if tokenizer is None:
        return None
    with tempfile.TemporaryDirectory(prefix="cvfp-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        files = {}
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                raw = path.read_bytes()
                try:
                    files[str(path.relative_to(folder))] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    files[str(path.relative_to(folder))] = raw
    return {"files": files, "fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer)}


def data_snapshot(datamodule) -> dict:
    """The snapshot of a :class:`~cvfp_lightning.data.base.TokenDataModule` (see the module docstring)."""
    return {"format": FORMAT, "datamodule": type(datamodule).__name__, "source": datamodule.describe(),
            "tokenizer": tokenizer_snapshot(getattr(datamodule, "tokenizer", None)),
            "arrangement": {name: getattr(datamodule, name, None) for name in ARRANGEMENT}}


def find_data_snapshot(checkpoint: dict) -> dict | None:
    """The data snapshot inside a Lightning checkpoint dict, or None (a checkpoint written before it existed)."""
    for value in checkpoint.values():
        if isinstance(value, dict) and isinstance(value.get(SNAPSHOT_KEY), dict):
            return value[SNAPSHOT_KEY]
    return None


def write_tokenizer_files(snapshot: dict, folder: str | Path) -> Path:
    """Write the snapshot's tokenizer files into ``folder`` (created); returns it."""
    folder = Path(folder)
    files = (snapshot or {}).get("files")
    check(isinstance(files, dict) and files, "the checkpoint's data snapshot holds no tokenizer files.")
    for name, content in files.items():
        path = (folder / name).resolve()
        check(folder.resolve() in path.parents, f"the checkpoint's tokenizer file name {name!r} leaves its folder: "
                                                "the file was tampered with.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8") if isinstance(content, str) else bytes(content))
    return folder


def restore_tokenizer(snapshot: dict):
    """The tokenizer of a snapshot (written to a temporary folder, loaded without remote code, fingerprint checked)."""
    with tempfile.TemporaryDirectory(prefix="cvfp-tokenizer-") as folder:
        tokenizer = load_tokenizer(str(write_tokenizer_files(snapshot, folder)))
    if tokenizer_fingerprint(tokenizer) != snapshot.get("fingerprint"):
        raise CVFPUserError("the tokenizer rebuilt from the checkpoint differs from the one it was trained with "
                            "(fingerprint mismatch): this version of transformers reads it differently; export with "
                            "the transformers version of the training run.")
    return tokenizer
