"""``cvfp evaluate MODEL --text FILE [FILE ...]``: next-token metrics of whole text files.

    cvfp evaluate exports/phase2 --text held_out.txt                    # an exported folder
    cvfp evaluate <run>/checkpoints/best.ckpt --text a.txt b.txt        # or a checkpoint
    cvfp evaluate exports/phase2 --text a.txt --trainer.devices 2 --trainer.strategy ddp

``MODEL`` is a folder written by ``cvfp export`` or a Phase 2 / baseline checkpoint. The
files are read, tokenised and cut into sequences exactly as the model's training data was
(the arrangement recorded in the export: ``sample_by``, ``sequences``, ``max_seq_len``,
``add_eos``, and for baselines windows of ``seq_len``), by the training data code
(:class:`~cvfp_lightning.data.text.TextDataModule`). Every position with a next id in its
sequence is scored, i.e. every token after the first of each sequence:

- CVFP: the final contexts are carried over each sequence from ``c = 0`` (one sequential
  pass, as Phase 2's contexts), then for chunks of ``chunk_size`` positions the logits of
  ``lm.step(c_{i-1}, id_i)`` (the per-layer outputs recomputed, as in Phase 2 training);
  a model exported with a continuous cache (:mod:`cvfp_lightning.models.continuous_cache`)
  scores its mixture, the memory being the ``size`` positions before each one in the files'
  order (``--continuous_cache.size / .theta / .weight`` override the exported settings;
  ``--continuous_cache.weight 0`` scores the model alone);
- baselines: windows of ``seq_len`` ids with the state restarting in every window, as in
  their validation.

The metrics are the training code's (:class:`~cvfp_lightning.modules.lm_base.NextTokenModule`
and :class:`~cvfp_lightning.metrics.NextTokenMetric`, run by ``Trainer.test``): ``loss``
(mean cross-entropy, nats per token), ``ppl = exp(loss)``, ``acc`` (top-1), ``bpb = sum CE /
(ln 2 * bytes)`` with ``bytes`` the UTF-8 bytes of the scored samples' text, and ``tokens``
(scored positions). On a file holding exactly the validation samples of a fit they equal
that fit's ``val/*``. ``--trainer.*`` flags shard the work over ranks (``--trainer.devices 2
--trainer.strategy ddp``); every token counts once, so the result equals one process's.

Output: the JSON object is printed on stdout and written to ``--out`` (default
``evaluation.json`` in the working directory); nothing else is written except the token
cache (``$CVFP_CACHE_DIR``, keyed by content, as in training). ``--out`` is checked before
the scoring: an existing file there is replaced only when it is an earlier evaluation (a
JSON object with the keys of :data:`EVALUATION_KEYS`) or empty; any other file is refused
and kept, as are a folder or a path that cannot be written. Repeated evaluations in one
folder thus replace their own ``evaluation.json``. A write that fails after the scoring is
one error too; the result was printed first.
"""

from __future__ import annotations

import codecs
import json
import sys
import time
from pathlib import Path
from typing import Literal, Optional

from torch import Tensor

from cvfp_lightning.context_cache import InMemoryContexts, final_contexts
from cvfp_lightning.data.text import TextDataModule
from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.hub import CVFPModel
from cvfp_lightning.io import check_output_file, read_text_upto, write_output
from cvfp_lightning.modules.lm_base import NextTokenModule

DEFAULT_OUT = "evaluation.json"
EVALUATION_KEYS = ("model", "files", "tokens", "loss", "ppl", "acc", "bpb")  # in every record main writes
EARLIER = "an earlier evaluation (a JSON object with the keys " + ", ".join(EVALUATION_KEYS) + ")"


def is_evaluation(path: Path) -> bool:
    """Whether ``path`` holds an earlier ``cvfp evaluate`` record (what ``--out`` may replace)."""
    text = read_text_upto(path, 16 << 20)
    try:
        record = json.loads(text) if text is not None else None
    except ValueError:
        return False
    return isinstance(record, dict) and all(key in record for key in EVALUATION_KEYS)


def check_text_files(paths: list[str]) -> list[Path]:
    """Each ``--text`` file exists, holds some non-blank text and is UTF-8 (read in 1 MB blocks)."""
    check(len(paths) > 0, "--text is empty: give one or more UTF-8 text files to score.")
    out = []
    for name in paths:
        path = Path(name).expanduser()
        check(path.is_file(), f"--text {name!r} does not exist or is not a file: give a UTF-8 text file.")
        decoder, blank, offset = codecs.getincrementaldecoder("utf-8")(), True, 0
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as exc:
                    raise CVFPUserError(f"--text {name!r} is not UTF-8 text (byte {offset + exc.start}: {exc.reason}): "
                                        "convert it to UTF-8 (e.g. iconv -t utf-8).") from None
                blank = blank and not text.strip()
                offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise CVFPUserError(f"--text {name!r} is not UTF-8 text (it ends inside a character: {exc.reason}): "
                                "convert it to UTF-8 (e.g. iconv -t utf-8).") from None
        check(not blank, f"--text {name!r} is empty (no text to score): give a file with text in it.")
        out.append(path)
    return out


class EvaluationText(TextDataModule):
    """Text files as the split ``Trainer.test`` scores: every sample, arranged as in training.

    Built with ``val_subset_of_train``, so the training split is every sample of the files
    with their exact byte count; that split is the one tested. Takes the model's tokenizer
    object (no second load).
    """

    def __init__(self, tokenizer_object, **kwargs):
        self._tokenizer_object = tokenizer_object
        super().__init__(val_subset_of_train=True, **kwargs)

    def _load_tokenizer(self, name, trust_remote_code):
        return self._tokenizer_object

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.val_sequences = self.train_sequences  # what validate / test score: all of it


class Evaluation(NextTokenModule):
    """Scores an exported model (:mod:`cvfp_lightning.hub`) with the training metrics; ``test/*`` plus ``test/tokens``.

    CVFP models read the ``positions`` layout as Phase 2 does: ``on_test_start`` computes
    the final context of every position (:func:`~cvfp_lightning.context_cache.final_contexts`:
    float32 ``(N, D)``, 4 D bytes per token on every rank; under DDP each rank passes its
    share of the sequences and a sum over ranks completes them) and a batch's per-layer
    outputs are recomputed from the context before each position (``CVFPLanguageModel.step``);
    baselines read ``windows``.
    """

    def __init__(self, model, seq_batch_size: int = 256):
        super().__init__()
        self.model = model
        self.is_cvfp = isinstance(model, CVFPModel)
        self.data_layout = "positions" if self.is_cvfp else "windows"
        self.seq_batch_size = seq_batch_size
        self._contexts: InMemoryContexts | None = None
        self._has_weights = True

    def on_test_start(self) -> None:
        if self.is_cvfp:
            splits = {"test": self.trainer.datamodule.val_sequences}
            self._contexts = final_contexts(*self.model.context_modules(), splits, self.seq_batch_size, self.trainer)

    def logits_targets(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        if self.is_cvfp:
            previous = self._contexts.previous("test", batch["positions"], batch["is_start"]).to(self.device)
            rows = self._contexts.position_rows("test", self.trainer.datamodule.val_sequences, self.model.token_history)
            return self.model.score_positions(batch, previous, rows), batch["targets"]  # (n, V), (n,)
        return self.model(batch["input_ids"]), batch["targets"]  # (B, T, V), (B, T)

    def data_request(self) -> dict:
        """A CVFP model with a token history asks the position batches for it."""
        return {**super().data_request(), "history": self.model.token_history if self.is_cvfp else 0}


def evaluation_data(model, files: list[Path], sample_by: str | None = None) -> EvaluationText:
    """The data module of ``files`` arranged as the model's training data (its recorded arrangement)."""
    arr = model.arrangement
    options = {"sample_by": sample_by or arr.get("sample_by") or "paragraph",
               "sequences": arr.get("sequences") or "samples", "max_seq_len": arr.get("max_seq_len"),
               "add_eos": arr.get("add_eos", True)}
    for name in ("chunk_size", "batch_size", "seq_len"):  # batching only; seq_len is a baseline's window
        if arr.get(name):
            options[name] = int(arr[name])
    return EvaluationText(model.tokenizer, paths=[str(f) for f in files], **options)


def evaluate(model, files: list[Path], trainer, sample_by: str | None = None, seq_batch_size: int = 256) -> dict:
    """Score ``files`` with ``model`` on ``trainer`` (``Trainer.test``); the result record (see the module docstring)."""
    dm = evaluation_data(model, files, sample_by)
    start = time.perf_counter()
    results = trainer.test(Evaluation(model, seq_batch_size), datamodule=dm, verbose=False)
    seconds = time.perf_counter() - start
    metrics = {k.split("/", 1)[1]: float(v) for k, v in (results[0] if results else {}).items() if k.startswith("test/")}
    dm.setup()
    seqs = dm.val_sequences
    return {"files": [str(f) for f in files], "model_kind": model.kind, "arrangement": {
                "sample_by": dm.sample_by, "sequences": dm.sequences, "max_seq_len": dm.max_seq_len,
                "add_eos": dm.add_eos, **({"seq_len": dm.seq_len} if not isinstance(model, CVFPModel) else {})},
            "sequences": seqs.num_sequences, "positions": seqs.num_tokens, "tokens": int(metrics.pop("tokens", 0)),
            "bytes": int(seqs.num_bytes), **{k: metrics.get(k) for k in ("loss", "ppl", "acc", "bpb")},
            "continuous_cache": (model.continuous_cache.to_dict() if getattr(model, "continuous_cache", None) is not None
                                 else None),
            "devices": int(trainer.world_size), "seconds": round(seconds, 3)}


def build_parser():
    import lightning as L

    from cvfp_lightning.export import model_parser

    parser = model_parser("cvfp evaluate", (
        "Score whole UTF-8 text files with an exported model (cvfp export) or a Phase 2 / baseline checkpoint: "
        "tokens, bytes, loss, ppl, acc, bpb, as JSON on stdout and in --out. Text is arranged as in training."))
    parser.add_argument("--text", type=str, nargs="+", required=True, help="the UTF-8 text files to score")
    parser.add_argument("--out", type=str, default=DEFAULT_OUT, help=(
        "where the JSON result is written; an existing file there is replaced only when it is an earlier "
        "evaluation (or empty), any other is refused and kept"))
    parser.add_argument("--sample_by", type=Optional[Literal["paragraph", "line", "document"]], default=None,
                        help="how files split into samples; default: as in training")
    parser.add_argument("--seq_batch_size", type=int, default=256, help="sequences per batch of the context pass")
    parser.add_lightning_class_args(L.Trainer, "trainer")
    parser.set_defaults({"trainer.logger": False, "trainer.enable_checkpointing": False,
                         "trainer.enable_model_summary": False})
    return parser


def main(argv: list[str] | None = None) -> None:
    """``cvfp evaluate MODEL --text FILE [FILE ...] [--out evaluation.json] [--trainer.* ...]``."""
    import lightning as L

    from cvfp_lightning.export import load_model, read_with_cache

    parser = build_parser()
    cfg = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    files = check_text_files(cfg.text)
    check(cfg.seq_batch_size > 0, f"--seq_batch_size={cfg.seq_batch_size!r} is invalid: expected a positive integer.")
    check_output_file(cfg.out, "--out", is_evaluation, EARLIER)  # before the scoring, so that no work is lost
    model = load_model(cfg.model, cfg.tokenizer)
    read_with_cache(model, **cfg.continuous_cache.as_dict())
    trainer = L.Trainer(**parser.instantiate_classes(cfg).trainer)
    record = {"model": str(cfg.model), **evaluate(model, files, trainer, cfg.sample_by, cfg.seq_batch_size)}
    if trainer.is_global_zero:
        text = json.dumps(record, indent=2, sort_keys=True)
        print(text, flush=True)  # first: a failed write still leaves the result
        write_output(text + "\n", cfg.out, "--out", is_evaluation, EARLIER, note="; the result is printed above")
