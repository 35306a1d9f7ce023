"""``cvfp export``: a trained model leaves the project as a Hugging Face-style folder.

    cvfp export --ckpt_path lightning_logs/phase2/version_0/checkpoints/best.ckpt --out_dir exports/phase2

reads a Phase 2 (``Phase2LM``, or ``Phase2EndToEnd`` with its fine-tuned context block) or
baseline (``BaselineLM``) checkpoint with the class that wrote it (``load_from_checkpoint``:
every check of a resume applies, e.g. the Phase 1 weights digest), copies its weights into
the exported class (:mod:`cvfp_lightning.hub`) and writes ``out_dir`` with ``save_pretrained``:

    model.safetensors                      weights
    config.json                            constructor arguments + the "cvfp_export" record
    tokenizer.json, tokenizer_config.json  the training tokenizer, rebuilt from the checkpoint
    README.md                              the model card

No hub access is needed: the checkpoint carries the tokenizer and the arrangement of text
(:mod:`cvfp_lightning.data.snapshot`); a checkpoint written before it did needs
``--tokenizer`` (a hub name or folder). The model card states the architecture and sizes,
the data, Phase 1's convergence and effective rank (from the Phase 1 run's TensorBoard
scalars, when that folder is still there), the validation and test metrics of the run's
``summary.json`` (or the checkpoint's monitored score) and the training config
(``config.yaml`` of the run folder).

The folder is written next to ``out_dir`` and renamed into place: a failed export leaves
nothing, and a path that cannot be written is one error before the checkpoint is read. An
existing non-empty ``out_dir`` is replaced only with ``--overwrite true``, only when it is a
cvfp_lightning export itself and only when it holds nothing but an export's own files
(:data:`EXPORT_FILES`): a folder with anything else in it (notes, sub-folders) is refused
with those entries named, and left as it is.

:func:`load_model` opens either form (an exported folder or a checkpoint) for
``cvfp evaluate`` and ``cvfp generate``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from cvfp_lightning.data.snapshot import find_data_snapshot, restore_tokenizer
from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.hub import FORMAT, BaselineModel, CVFPModel, load_exported, read_export_config
from cvfp_lightning.io import check_writable_folder, current_umask, safe_torch_load

METRICS = ("loss", "ppl", "acc", "bpb")
# what save_pretrained writes (special_tokens_map.json and added_tokens.json: older transformers' tokenizers)
EXPORT_FILES = frozenset({"model.safetensors", "config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
                          "special_tokens_map.json", "added_tokens.json"})
PHASE1_TAGS = ("train/convergence_rate", "val/convergence_rate", "train/effective_rank_pct", "val/effective_rank_pct")


# ---- checkpoint -> exported model ------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint dict (weights-only load), or one clear error."""
    path = Path(path).expanduser()
    check(path.is_file(), f"--ckpt_path {str(path)!r} does not exist: give the best.ckpt of a Phase 2 or baseline "
                          "fit run, e.g. lightning_logs/phase2/version_0/checkpoints/best.ckpt.")
    ckpt = safe_torch_load(path)
    check(isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict),
          f"--ckpt_path {str(path)!r} is not a Lightning checkpoint (no state_dict).")
    return ckpt


def checkpoint_kind(ckpt: dict, path: str | Path) -> str:
    """``cvfp`` (a Phase2LM checkpoint) or ``baseline`` (a BaselineLM checkpoint)."""
    hp, state = ckpt.get("hyper_parameters") or {}, ckpt["state_dict"]
    if isinstance(hp.get("phase1"), dict) and any(k.startswith("lm.") for k in state):
        return "cvfp"
    if "arch" in hp and any(k.startswith("net.") for k in state):
        return "baseline"
    check(not any(k.startswith("updater.") for k in state),
          f"{str(path)!r} is a Phase 1 checkpoint: it has no head and predicts no tokens; train Phase 2 on it "
          "(cvfp fit --config configs/phase2.yaml) and export that run's best.ckpt.")
    raise CVFPUserError(f"{str(path)!r} is not a Phase 2 or baseline checkpoint (written before Phase 2 checkpoints "
                        "recorded their Phase 1 model, or by another model class): export a checkpoint of a Phase2LM "
                        "or BaselineLM fit.")


def _load_module(cls, path: Path):
    try:
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        if isinstance(exc, CVFPUserError):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CVFPUserError(f"{str(path)!r} does not load as a {cls.__name__} ({first}): the file is damaged or "
                            "was edited; export the checkpoint its fit run wrote.") from exc


def continuous_cache_line(cache) -> str:
    """The model card's line on the continuous cache (:mod:`cvfp_lightning.models.continuous_cache`)."""
    if cache is None or cache.weight == 0:
        return "- Continuous cache: none; text is scored with `softmax(head(t_L))`."
    return (f"- Continuous cache (Grave et al., 2017): text is scored and generated with "
            f"`p = {1 - cache.weight:g} softmax(head(t_i)) + {cache.weight:g} p_cache`, where `p_cache` puts "
            f"`softmax_j({cache.theta:g} cos(t_i, t_j))` on the id after each of the last {cache.size} positions `j` "
            "read; `cvfp evaluate` / `cvfp generate` with `--continuous_cache.weight 0` read with the model alone.")


def model_from_checkpoint(path: str | Path, tokenizer: str | None = None):
    """``(model, checkpoint dict, LightningModule)``: the exported class with the checkpoint's weights.

    The model carries ``tokenizer`` (rebuilt from the checkpoint's data snapshot, or loaded
    from ``tokenizer`` when the checkpoint has none) and ``export_info``.
    """
    from cvfp_lightning.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from cvfp_lightning.modules import BaselineLM, Phase2EndToEnd, Phase2LM

    path = Path(path).expanduser()
    ckpt = read_checkpoint(path)
    kind = checkpoint_kind(ckpt, path)
    if kind == "cvfp":
        end_to_end = (ckpt.get("cvfp_phase2") or {}).get("module") == Phase2EndToEnd.__name__
        module = _load_module(Phase2EndToEnd if end_to_end else Phase2LM, path)
        p1, hp = module.phase1_hparams, module.hparams
        model = CVFPModel(vocab_size=int(p1["vocab_size"]), context=dict(p1["context"]),
                          embedding=dict(p1["embedding"]), weight_tying=bool(hp["weight_tying"]),
                          train_embedding=not hp["freeze_embedding"], token_history=int(hp.get("token_history", 0)),
                          continuous_cache=hp.get("continuous_cache"))
        model.load_state_dict(module.lm.state_dict())
    else:
        module = _load_module(BaselineLM, path)
        hp = module.hparams
        model = BaselineModel(arch=hp["arch"], vocab_size=int(hp["vocab_size"]), hidden_dim=int(module.hidden_dim),
                              num_layers=int(hp["num_layers"]), num_heads=int(hp["num_heads"]),
                              max_len=int(hp["max_len"]), dropout=float(hp["dropout"]))
        model.net.load_state_dict(module.net.state_dict())
    model.eval()

    snapshot = find_data_snapshot(ckpt) or {}
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        check(bool(snapshot.get("tokenizer")),
              f"{str(path)!r} carries no tokenizer (a checkpoint written before checkpoints did, or trained on "
              "synthetic ids): pass --tokenizer with the tokenizer of its training run (a hub name such as gpt2, or "
              "a folder; 'bundled' for the bundled one).")
        tok = restore_tokenizer(snapshot["tokenizer"])
    check(len(tok) == model.vocab_size,
          f"the tokenizer has {len(tok)} ids but the model {model.vocab_size}: use the tokenizer of its training run.")
    model.tokenizer = tok
    model.export_info = {"format": FORMAT, "model": kind, "checkpoint": str(path.resolve()),
                         "datamodule": snapshot.get("datamodule"), "source": snapshot.get("source"),
                         "arrangement": snapshot.get("arrangement") or {},
                         "tokenizer_fingerprint": tokenizer_fingerprint(tok)}
    return model, ckpt, module


def load_model(path: str | Path, tokenizer: str | None = None):
    """The model of an exported folder, or of a Phase 2 / baseline checkpoint (``.ckpt``), with its tokenizer."""
    p = Path(path).expanduser()
    if p.is_file():
        model = model_from_checkpoint(p, tokenizer)[0]
    else:
        model = load_exported(path)
        if tokenizer is not None:
            from cvfp_lightning.data.tokenizer import load_tokenizer

            model.tokenizer = load_tokenizer(tokenizer)
    check(model.tokenizer is not None, f"{str(path)!r} has no tokenizer: export the model again.")
    return model


# ---- the model card ----------------------------------------------------------------------------------
def _run_folder(ckpt_path: Path) -> Path | None:
    """``<run>`` of ``<run>/checkpoints/<name>.ckpt``."""
    ckpt_path = ckpt_path.resolve()
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _monitored(ckpt: dict) -> tuple[str, float] | None:
    """The ModelCheckpoint monitor and best score recorded in the checkpoint's callback state."""
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(state, dict) and state.get("monitor"):
            score = state.get("best_model_score")
            if score is not None:
                return str(state["monitor"]), float(score)
    return None


def phase1_facts(record: dict) -> dict:
    """Phase 1 convergence and effective rank: the last value of each :data:`PHASE1_TAGS` in the
    TensorBoard scalars of the Phase 1 run folder, and its number of iterations ({} when the folder is gone)."""
    folder = _run_folder(Path(str(record.get("checkpoint") or "")))
    if folder is None or not folder.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    facts: dict = {"checkpoint": str(record.get("checkpoint"))}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0, "histograms": 1, "images": 1, "tensors": 1})
        try:
            acc.Reload()
        except Exception:  # noqa: BLE001 - a damaged events file only loses the card's Phase 1 lines
            continue
        for tag in PHASE1_TAGS:
            if tag in acc.Tags()["scalars"]:
                values = acc.Scalars(tag)
                facts[tag] = float(values[-1].value)
                if tag == "train/convergence_rate":
                    facts["iterations"] = len(values)
    return facts if len(facts) > 1 else {}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def model_card(model, ckpt: dict, module, ckpt_path: Path) -> str:
    """The README.md body: architecture, data, Phase 1, metrics, training config, usage."""
    info = model.export_info
    folder = _run_folder(ckpt_path)
    summary = _read_json(folder / "summary.json") if folder else {}
    config_text = ""
    if folder and (folder / "config.yaml").is_file():
        config_text = (folder / "config.yaml").read_text(encoding="utf-8", errors="replace")
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    trained = module.num_trainable_parameters()
    cls = type(model).__name__
    lines = []
    if info["model"] == "cvfp":
        trained_block = any(p.requires_grad for p in module.lm.updater.parameters())
        p1 = module.phase1_hparams
        ctx, emb = dict(p1["context"]), dict(p1["embedding"])
        lines += ["# CVFP language model (Phase 2)", "",
                  "A CVFP (context vector fixed-point) language model trained with cvfp_lightning "
                  "(`cvfp fit`), exported by `cvfp export`.", "",
                  "## Architecture", "",
                  f"- Embedding: {model.vocab_size} ids x {model.embedding.embed_dim} dims, "
                  f"{'LayerNorm (no affine) on lookup, ' if emb.get('layer_norm', True) else ''}"
                  f"{'trained in Phase 2' if model.context_embedding is not None else 'frozen (Phase 1)'}"
                  f"{', initialised from ' + str(emb['pretrained']) if emb.get('pretrained') else ''}.",
                  f"- Context block (Phase 1, {'fine-tuned end to end in Phase 2' if trained_block else 'frozen'}): "
                  f"`{ctx.get('updater')}` updater, {ctx.get('num_layers')} layers, "
                  f"context {ctx.get('context_dim')} dims, layer widths {model.updater.layer_dims}"
                  + (f", stacking {ctx.get('stacking')}" if ctx.get("updater") == "gated" else "")
                  + (f", token input in all layers: {ctx.get('token_input_all_layers')}"
                     if ctx.get("updater") == "residual" else "") + ". "
                  "The context is carried token by token, `c_i = f(c_{i-1}, e_i)` from `c = 0`.",
                  f"- Token block: {model.token_block.num_layers} layers, "
                  "`t_l = LN(t_{l-1} + ReLU(W [c_l; t_{l-1}] + b))`, "
                  + (f"`t_0 = LN(e + ReLU(W_0 [e; h_1..h_{model.token_history}] + b_0))` over the embeddings "
                     f"`h_j` of the {model.token_history} ids before the position." if model.token_history
                     else "`t_0 = e`."),
                  f"- Head: {'tied to the embedding matrix' if model.weight_tying else 'Linear(E, V), zero-initialised'}.",
                  continuous_cache_line(model.continuous_cache),
                  f"- Parameters: {total:,} in all, {trained:,} trained in Phase 2."]
    else:
        hp = module.hparams
        lines += [f"# {hp['arch'].upper()} baseline language model", "",
                  "A baseline language model trained with cvfp_lightning (`cvfp fit`) on the same data and metrics "
                  "as the CVFP models, exported by `cvfp export`.", "",
                  "## Architecture", "",
                  f"- `{hp['arch']}`, width {model.net.head.in_features}, {hp['num_layers']} layers"
                  + (f", {hp['num_heads']} heads, {hp['max_len']} positions" if hp["arch"] == "transformer" else "")
                  + f"; vocabulary {model.vocab_size}.",
                  f"- Parameters: {total:,} (all trained)."]
    arr = info.get("arrangement") or {}
    lines += ["", "## Data", "",
              f"- Source: {info.get('source') or 'unknown'} ({info.get('datamodule') or 'unknown data module'}).",
              f"- Tokenizer: {len(model.tokenizer)} ids, saved in this folder (sha256 "
              f"`{info['tokenizer_fingerprint'][:16]}...`).",
              f"- Arrangement: samples by {arr.get('sample_by') or '-'}, sequences `{arr.get('sequences')}`, "
              f"max_seq_len {arr.get('max_seq_len')}, add_eos {arr.get('add_eos')}"
              + (f", windows of {arr.get('seq_len')}" if info["model"] == "baseline" else "") + "."]
    if summary.get("train_tokens") is not None:
        lines.append(f"- Tokens: {summary['train_tokens']:,} train, {summary.get('val_tokens') or 0:,} validation.")
    if info["model"] == "cvfp":
        facts = phase1_facts(module.phase1_record())
        lines += ["", "## Phase 1 (fixed-point learning)", ""]
        if facts:
            lines.append(f"- Run: `{facts['checkpoint']}`, {facts.get('iterations', '?')} iterations.")
            lines += [f"- `{tag}`: {_fmt(facts[tag])}" for tag in PHASE1_TAGS if tag in facts]
        else:
            lines.append(f"- Checkpoint `{module.phase1_record()['checkpoint']}` (its run folder was not found: "
                         "convergence and effective rank unknown).")
        tuned = {k: v for k, v in summary.items() if k.startswith("phase1/")}
        if trained_block and tuned:
            lines.append("- After end-to-end fine-tuning, on the validation split (Phase 1's definitions; "
                         "`_phase1`: the block before fine-tuning):")
            lines += [f"  - `{k}`: {_fmt(v)}" for k, v in sorted(tuned.items())]
    lines += ["", "## Results", ""]
    rows = []
    for split in ("val", "test"):
        values = {m: summary.get(f"{split}/{m}") for m in METRICS}
        if any(v is not None for v in values.values()):
            rows.append(f"| {split} | " + " | ".join(_fmt(values[m]) if values[m] is not None else "-" for m in METRICS)
                        + " |")
    if rows:
        lines += ["| split | loss (nats/token) | ppl | acc | bpb |", "|---|---|---|---|---|", *rows, "",
                  f"Best epoch {summary.get('best_epoch')} of {summary.get('epochs_run')} (`summary.json` of the run)."]
        best = summary.get("best_model_path")
        if best and Path(best).resolve() != ckpt_path.resolve():
            lines.append(f"These are the metrics of `{best}`; the exported checkpoint is `{ckpt_path}`.")
    elif _monitored(ckpt):
        monitor, score = _monitored(ckpt)
        lines.append(f"- Best `{monitor}` of the run: {score:.4f} (the checkpoint's ModelCheckpoint state).")
    else:
        lines.append("- No recorded metrics (no summary.json in the run folder).")
    lines += ["", "## Use", "", "```bash",
              "cvfp evaluate <this folder> --text some.txt          # loss, ppl, acc, bpb of whole files",
              "cvfp generate <this folder> --prompt \"The for statement\" --temperature 0.8 --top_k 40 --seed 0",
              "```", "", "```python", f"from cvfp_lightning.hub import {cls}", "",
              f"model = {cls}.from_pretrained(\"<this folder or hub id>\")",
              "ids = model.tokenizer(\"The for statement\", add_special_tokens=False, return_tensors=\"pt\").input_ids[0]",
              "print(model.tokenizer.decode(model.generate(ids, 40, temperature=0.8, top_k=40, seed=0)))", "```"]
    if config_text:
        lines += ["", "## Training", "", f"`cvfp fit --config config.yaml` with the run's `config.yaml` "
                  f"(`{folder / 'config.yaml'}`):", "", "```yaml", config_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


# ---- writing the folder ------------------------------------------------------------------------------
def _is_export(folder: Path) -> bool:
    try:
        read_export_config(folder)
        return True
    except CVFPUserError:
        return False


def check_out_dir(out: Path, overwrite: bool) -> None:
    """That ``out`` may be written: new or empty, or (``overwrite``) an earlier export holding only its own files."""
    if out.exists() or out.is_symlink():
        check(out.is_dir(), f"--out_dir {str(out)!r} is a file: give a folder (it is created).")
        entries = sorted(os.listdir(out))
        if entries:
            check(overwrite, f"--out_dir {str(out)!r} exists and is not empty: give a new folder, or pass "
                             "--overwrite true to replace an earlier export.")
            check(_is_export(out), f"--out_dir {str(out)!r} is not a cvfp_lightning export: it is not replaced; "
                                   "give a new folder.")
            extra = [e + ("/" if (out / e).is_dir() else "") for e in entries
                     if e not in EXPORT_FILES or not (out / e).is_file() or (out / e).is_symlink()]
            listed = ", ".join(extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
            check(not extra, f"--out_dir {str(out)!r} holds {listed}, which an export does not write: it is not "
                             "replaced, so they are kept; move them out of the folder, or give a new folder.")
    check_writable_folder(out.parent, "--out_dir", out)


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, overwrite: bool = False,
                      tokenizer: str | None = None) -> Path:
    """Write the export of ``ckpt_path`` to ``out_dir`` (see the module docstring); returns ``out_dir``."""
    ckpt_path, out = Path(ckpt_path).expanduser(), Path(out_dir).expanduser()
    check_out_dir(out, overwrite)
    model, ckpt, module = model_from_checkpoint(ckpt_path, tokenizer)
    body = model_card(model, ckpt, module, ckpt_path)
    tmp = old = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        model.save_pretrained(tmp, model_card_kwargs={"body": body})
        umask = current_umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp and safetensors create private files: an export is for sharing
        for path in tmp.iterdir():
            os.chmod(path, 0o666 & ~umask)
        check_out_dir(out, overwrite)  # again: what was added to it meanwhile is not lost either
        if out.exists():  # set aside, not deleted, until the new export is in place
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        raise CVFPUserError(f"--out_dir {str(out)!r} could not be written ({exc.strerror or type(exc).__name__}); "
                            "nothing there was changed.") from exc
    finally:
        if tmp is not None:  # it failed: the new folder goes, an earlier export set aside comes back
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                os.rmdir(old) if out.exists() else os.replace(old, out)
                old = None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def model_parser(prog: str, description: str):
    """The parser of a subcommand that takes a model: ``MODEL`` (an exported folder or a checkpoint),
    ``--tokenizer`` (the arguments of :func:`load_model`) and ``--continuous_cache.*`` (:func:`read_with_cache`)."""
    from cvfp_lightning.lightning_cli import CVFPArgumentParser

    parser = CVFPArgumentParser(prog=prog, description=description)
    parser.add_argument("model", type=str, help="a folder written by cvfp export, or a Phase 2 / baseline .ckpt")
    parser.add_argument("--tokenizer", type=Optional[str], default=None,
                        help="only for checkpoints that carry no tokenizer: its hub name or folder ('bundled')")
    for name, kind, what in (("size", int, "positions in its memory"), ("theta", float, "sharpness of its attention"),
                             ("weight", float, "share of the mixture (0: the model alone)")):
        parser.add_argument(f"--continuous_cache.{name}", type=Optional[kind], default=None,
                            help=f"CVFP models: the continuous cache's {what}; default: the model's")
    return parser


def read_with_cache(model, size: int | None = None, theta: float | None = None, weight: float | None = None) -> None:
    """Replace the continuous cache settings of a CVFP ``model`` where given (None: keep the model's;
    a model without a cache takes :class:`ContinuousCache`'s defaults for the others)."""
    from cvfp_lightning.models.continuous_cache import ContinuousCache

    given = {k: v for k, v in {"size": size, "theta": theta, "weight": weight}.items() if v is not None}
    if not given:
        return
    check(isinstance(model, CVFPModel), "--continuous_cache.* is for CVFP models; this one is a baseline.")
    current = model.continuous_cache.to_dict() if model.continuous_cache is not None else {}
    model.continuous_cache = ContinuousCache.coerce({**current, **given})


def build_parser():
    from cvfp_lightning.lightning_cli import CVFPArgumentParser

    parser = CVFPArgumentParser(prog="cvfp export", description=(
        "Write a Phase 2 or baseline checkpoint as a Hugging Face-style folder: model.safetensors, config.json, "
        "the tokenizer and a README.md model card; load it with CVFPModel.from_pretrained(folder) "
        "(cvfp_lightning.hub) or use it with cvfp evaluate / cvfp generate."))
    parser.add_argument("--ckpt_path", type=str, required=True, help="the checkpoint, e.g. <run>/checkpoints/best.ckpt")
    parser.add_argument("--out_dir", type=str, required=True, help="the folder to write (created)")
    parser.add_argument("--overwrite", type=bool, default=False, help=(
        "replace an earlier export in out_dir; a folder holding anything else is refused and kept"))
    parser.add_argument("--tokenizer", type=Optional[str], default=None,
                        help="only for checkpoints that carry no tokenizer: its hub name or folder ('bundled')")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``cvfp export --ckpt_path CKPT --out_dir DIR``."""
    cfg = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    out = export_checkpoint(cfg.ckpt_path, cfg.out_dir, cfg.overwrite, cfg.tokenizer)
    files = sorted(p.name for p in out.iterdir())
    print(f"cvfp export: {cfg.ckpt_path} -> {out} ({', '.join(files)})")

