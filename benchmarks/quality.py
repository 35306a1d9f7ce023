"""Quality on real text: CVFP (frozen, end-to-end) against GRU / LSTM / Transformer, and the recipe against the demo.

One table per corpus, every row on the same train / validation / test files and scored on the
test split by ``cvfp evaluate`` (whole sequences, every token after the first of each
sequence, bits per UTF-8 byte of the test text):

    demo            configs/phase1.yaml + configs/phase2.yaml: bundled tokenizer, 128 x 3, frozen block
    recipe          configs/text_phase1.yaml + configs/text_phase2.yaml: fitted tokenizer, 384 x 2,
                    frozen block, trained embedding tied to the head, weight decay, the id before
                    each position, a continuous cache (CVFP frozen)
    recipe_e2e      configs/text_phase2_e2e.yaml on the recipe's Phase 1: the context block trained
                    end to end (CVFP end-to-end; wall time is its Phase 2 alone)
    gru, lstm, transformer
                    BaselineLM (configs/baseline_gru.yaml, baseline_transformer.yaml: whole sequences
                    as windows), match_params = the recipe's trainable parameters, the recipe's fitted
                    tokenizer and data, Adam at ``--baseline_lr`` (default 0.002; AdamW with
                    ``--baseline_weight_decay``; weight EMA with ``--baseline_ema``)

Corpora (split files written to ``--work_dir``):

- ``bundled``: the bundled corpus (CPython pydoc topics, PSF licence), its 79 topics laid out
  ``[train | val | test]`` = 63 / 8 / 8 topics (329 / 96 / 38 KB), as ``val_fraction`` and
  ``test_fraction`` 0.1 would hold them out.
- ``licenses``: English licence texts read from this machine's ``/usr/share/common-licenses``
  (Debian's copies; each licence allows verbatim copies; they are read from there and never
  written into the repository), whole documents held out: train GPL-1, GPL-2, GPL-3, LGPL-2.1,
  GFDL-1.3, MPL-1.1, Artistic, BSD (149 KB); validation Apache-2.0, LGPL-3 (19 KB); test
  MPL-2.0, CC0-1.0 (24 KB). LGPL-2 and GFDL-1.2 are left out (near copies of LGPL-2.1 and GFDL-1.3).

Every row is also scored the other way round (column "other cache reading"): the recipe
without its continuous cache (``--continuous_cache.weight 0``), every other row with the
recipe's cache (CVFP rows by ``cvfp evaluate --continuous_cache.*``, the GRU / LSTM by
:func:`recurrent_with_cache` over their hidden states; not the Transformer), so the cache's
share of a gain is seen apart from the model's.

Wall time is each ``cvfp fit``'s, in this process (no interpreter start-up): Phase 1 + Phase 2
for CVFP rows. Every run's record is kept in ``--work_dir/<corpus>/<row>.json``; a rerun skips
finished rows (delete the file to redo one). Writes ``results/quality_<date>.json``.

    python benchmarks/quality.py                          # both corpora, every row (over 1 h on 2 busy cores)
    python benchmarks/quality.py --corpora licenses --rows demo recipe gru
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from report import write_report

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LICENSES = Path("/usr/share/common-licenses")
LICENSE_SPLITS = {"train": ["GPL-1", "GPL-2", "GPL-3", "LGPL-2.1", "GFDL-1.3", "MPL-1.1", "Artistic", "BSD"],
                  "val": ["Apache-2.0", "LGPL-3"], "test": ["MPL-2.0", "CC0-1.0"]}
ROWS = ("demo", "recipe", "recipe_e2e", "gru", "lstm", "transformer")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ---- the split files -----------------------------------------------------------------------------
def write_splits(corpus: str, folder: Path) -> dict[str, Path]:
    """``{"train", "val", "test"}`` files of ``corpus``: samples (paragraphs) joined by blank lines."""
    folder.mkdir(parents=True, exist_ok=True)
    if corpus == "bundled":
        from cvfp_lightning.data import TextDataModule
        from cvfp_lightning.data.base import held_out

        rows = list(TextDataModule().load_texts()["text"])
        k = held_out(len(rows), 0.1)
        parts = {"train": rows[:len(rows) - 2 * k], "val": rows[len(rows) - 2 * k:len(rows) - k],
                 "test": rows[len(rows) - k:]}
    else:
        parts = {}
        for split, names in LICENSE_SPLITS.items():
            paragraphs = []
            for name in names:
                text = (LICENSES / name).read_text(encoding="utf-8")
                paragraphs += [p.strip("\n") for p in text.split("\n\n") if p.strip()]
            parts[split] = paragraphs
    files = {}
    for split, rows in parts.items():
        files[split] = folder / f"{split}.txt"
        files[split].write_text("\n\n".join(rows) + "\n", encoding="utf-8")
    return files


# ---- one run ------------------------------------------------------------------------------------------
def data_args(files: dict[str, Path], tokenizer: str | None = None) -> list[str]:
    out = ["--data.init_args.paths", f"[{files['train']}]", "--data.init_args.val_paths", f"[{files['val']}]",
           "--data.init_args.test_paths", f"[{files['test']}]"]
    return out + (["--data.init_args.tokenizer", tokenizer] if tokenizer else [])


def fit_run(name: str, config: Path, args: list[str], logs: Path) -> dict:
    """``cvfp fit --config CONFIG ARGS`` in this process: seconds, best checkpoint, summary."""
    from cvfp_lightning.runs import fit

    start, load = time.perf_counter(), os.getloadavg()
    result = fit(["--config", str(config), *args, *QUIET, "--trainer.logger.init_args.save_dir", str(logs),
                  "--trainer.logger.init_args.name", name])
    return {"seconds": round(time.perf_counter() - start, 1), "loadavg_before": load, "loadavg_after": os.getloadavg(),
            "epochs": result.epochs, "log_dir": str(result.log_dir),
            "best": str(result.best_checkpoint or result.last_checkpoint), "summary": result.summary,
            "phase1": {k: v for k, v in result.metrics.items() if "convergence" in k or "effective_rank" in k}}


def test_metrics(checkpoint: str, test_file: Path, cache: dict | None = None) -> dict:
    """``cvfp evaluate CHECKPOINT --text TEST`` in this process; with ``cache``, ``--continuous_cache.*``
    of those settings (``{"weight": 0}``: the model alone)."""
    import lightning as L

    from cvfp_lightning.evaluate import evaluate
    from cvfp_lightning.export import load_model, read_with_cache

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = load_model(checkpoint)
    read_with_cache(model, **(cache or {}))
    return evaluate(model, [test_file], trainer)


def recurrent_with_cache(checkpoint: str, test_file: Path, cache: dict) -> dict:
    """A GRU / LSTM baseline's test bpb with the recipe's continuous cache over its hidden states.

    Benchmark-side (the library's cache reads CVFP models): the same :class:`ContinuousCache`
    on the recurrent layer's output ``h_i`` (what its head reads), each test sequence read whole
    from a zero state as in the baseline's own evaluation (whole sequences as windows), the memory
    the ``size`` positions before each one in the file's order; bytes as ``cvfp evaluate``'s.
    """
    import torch

    from continuous_cache_grid import bpb
    from cvfp_lightning.evaluate import evaluation_data
    from cvfp_lightning.export import load_model
    from cvfp_lightning.models.continuous_cache import ContinuousCache

    model, settings = load_model(checkpoint), ContinuousCache.coerce(cache)
    data = evaluation_data(model, [test_file])
    data.setup()
    seqs, net = data.val_sequences, model.net
    keys, logits, nexts = [], [], []
    with torch.no_grad():
        for s in range(seqs.num_sequences):
            ids = seqs.sequence(s).long().reshape(1, -1)
            h = net.rnn(net.embed(ids))[0][0]  # (T, H)
            keys.append(h), logits.append(net.head(h))
            nexts.append(torch.cat([ids[0, 1:], torch.tensor([-100])]))
    feats = {"keys": torch.cat(keys), "logits": torch.cat(logits), "next": torch.cat(nexts), "bytes": seqs.num_bytes}
    return {"bpb": bpb(feats, settings), "tokens": int((feats["next"] >= 0).sum()), "bytes": int(seqs.num_bytes),
            "continuous_cache": settings.to_dict()}


BASELINE = {  # every baseline row: its config's windows (whole sequences), one layer (two for the transformer)
    "gru": ("baseline_gru.yaml", ["--model.init_args.arch", "gru"]),
    "lstm": ("baseline_gru.yaml", ["--model.init_args.arch", "lstm"]),
    "transformer": ("baseline_transformer.yaml", []),
}


def recipe_settings() -> dict:
    """The recipe's tokenizer, read from its config (so the baselines use it), and its continuous cache."""
    import yaml

    p1 = yaml.safe_load((CONFIGS / "text_phase1.yaml").read_text())
    p2 = yaml.safe_load((CONFIGS / "text_phase2.yaml").read_text())
    return {"tokenizer": json.dumps(p1["data"]["init_args"]["tokenizer"]),
            "continuous_cache": p2["model"]["init_args"].get("continuous_cache")}


def other_cache_test(row: str, record: dict, test_file: Path) -> dict | None:
    """The test metrics of the row's model read the other way: the recipe (cache on) without its cache,
    every other row with the recipe's cache, so that the cache's share of each gain is seen."""
    cache = recipe_settings()["continuous_cache"]
    if not cache:
        return None
    if row in BASELINE:
        return recurrent_with_cache(record["phase2"]["best"], test_file, cache) if row != "transformer" else None
    return test_metrics(record["phase2"]["best"], test_file, {"weight": 0.0} if row == "recipe" else cache)


def run_row(row: str, corpus: str, files: dict[str, Path], work: Path, done: dict, baseline_lr: float,
            baseline_minutes: int | None = None, baseline_weight_decay: float = 0.0,
            baseline_ema: float | None = None) -> dict:
    logs = work / corpus / "logs"
    if row == "demo":
        p1 = fit_run("demo_phase1", CONFIGS / "phase1.yaml", data_args(files), logs)
        p2 = fit_run("demo_phase2", CONFIGS / "phase2.yaml",
                     data_args(files) + ["--model.init_args.phase1_checkpoint", p1["best"]], logs)
        return {"phase1": p1, "phase2": p2}
    settings = recipe_settings()
    if row == "recipe":
        p1 = fit_run("recipe_phase1", CONFIGS / "text_phase1.yaml", data_args(files), logs)
        p2 = fit_run("recipe_phase2", CONFIGS / "text_phase2.yaml",
                     data_args(files) + ["--model.init_args.phase1_checkpoint", p1["best"]], logs)
        return {"phase1": p1, "phase2": p2}
    recipe = done.get("recipe") or run_row("recipe", corpus, files, work, done, baseline_lr)
    if row == "recipe_e2e":
        p2 = fit_run("recipe_e2e_phase2", CONFIGS / "text_phase2_e2e.yaml",
                     data_args(files) + ["--model.init_args.phase1_checkpoint", recipe["phase1"]["best"]], logs)
        return {"phase1": recipe["phase1"], "phase2": p2, "phase1_shared_with": "recipe"}
    config, extra = BASELINE[row]
    params = int(recipe["phase2"]["summary"]["trainable_params"])
    lm = fit_run(row, CONFIGS / config,
                 data_args(files, settings["tokenizer"]) + extra
                 + ["--model.init_args.match_params", str(params), "--model.init_args.lr", str(baseline_lr),
                    "--model.init_args.weight_decay", str(baseline_weight_decay)]
                 + (["--trainer.max_time", f"00:00:{int(baseline_minutes):02d}:00"] if baseline_minutes else [])
                 + (["--trainer.callbacks+=cvfp_lightning.callbacks.EMAWeights",
                     f"--trainer.callbacks.decay={baseline_ema}"] if baseline_ema else []),
                 logs)
    return {"phase2": lm, "match_params": params, "time_cap_minutes": baseline_minutes,
            "weight_decay": baseline_weight_decay, "ema_decay": baseline_ema}


def table(corpus: str, rows: dict) -> list[str]:
    lines = [f"### {corpus}", "", "| model | tokenizer (ids) | trainable params | test bpb | test ppl | test acc | "
             "test bpb, other cache reading | best epoch | Phase 1 convergence | wall (fit) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        record = rows.get(name)
        if not record:
            continue
        s, t = record["phase2"]["summary"], record["test"]
        wall = record["phase2"]["seconds"] + (record["phase1"]["seconds"] if name in ("demo", "recipe") else 0)
        conv = "-"
        cap = f" (stopped at {record['time_cap_minutes']} min)" if record.get("time_cap_minutes") else ""
        if "phase1/convergence_rate" in s:  # end-to-end: after fine-tuning (before it)
            conv = f"{s['phase1/convergence_rate']:.3f} ({s.get('phase1/convergence_rate_phase1', float('nan')):.3f})"
        elif "phase1" in record and record["phase1"]["phase1"].get("train/convergence_rate") is not None:
            conv = f"{record['phase1']['phase1']['train/convergence_rate']:.3f}"
        other = record.get("test_other_cache")
        other = (f"{other['bpb']:.4f} ({'without' if name == 'recipe' else 'with'} the recipe's cache)"
                 if other else "-")
        lines.append(f"| {name} | {t['vocab_size']} | {s['trainable_params']:,} | {t['bpb']:.4f} | {t['ppl']:.2f} | "
                     f"{t['acc']:.4f} | {other} | {s.get('best_epoch')} of {s.get('epochs_run')}{cap} | {conv} | "
                     f"{wall:.0f} s |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", default=["licenses", "bundled"], choices=["licenses", "bundled"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--baseline_lr", type=float, default=0.002, help="Adam learning rate of the baselines")
    parser.add_argument("--baseline_weight_decay", type=float, default=0.0,
                        help="model.weight_decay of the baselines (AdamW on the weight matrices; 0: Adam)")
    parser.add_argument("--baseline_ema", type=float, default=None,
                        help="EMA decay of the baselines' weights (cvfp_lightning.callbacks.EMAWeights; default: none)")
    parser.add_argument("--baseline_minutes", type=int, default=None,
                        help="stop each baseline's fit after this many minutes (trainer.max_time; default: no cap)")
    parser.add_argument("--work_dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cvfp_quality")
    args = parser.parse_args()
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("CVFP_CACHE_DIR", str(args.work_dir / "cache"))
    import torch

    from cvfp_lightning.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "loadavg_start": os.getloadavg(), "corpora": {}}
    markdown = []
    for corpus in args.corpora:
        files = write_splits(corpus, args.work_dir / corpus / "text")
        done: dict = {}
        for row in ROWS:
            record_file = args.work_dir / corpus / f"{row}.json"
            if record_file.is_file():
                done[row] = json.loads(record_file.read_text())
                if "test_other_cache" not in done[row]:  # a record of before the cache: add its other reading
                    done[row]["test_other_cache"] = other_cache_test(row, done[row], files["test"])
                    record_file.write_text(json.dumps(done[row], indent=2, default=str))
            elif row in args.rows:
                record = run_row(row, corpus, files, args.work_dir, done, args.baseline_lr, args.baseline_minutes,
                                 args.baseline_weight_decay, args.baseline_ema)
                record["test"] = test_metrics(record["phase2"]["best"], files["test"])
                from cvfp_lightning.export import load_model

                record["test"]["vocab_size"] = load_model(record["phase2"]["best"]).vocab_size
                record["test_other_cache"] = other_cache_test(row, record, files["test"])
                record_file.write_text(json.dumps(record, indent=2, default=str))
                done[row] = record
        report["corpora"][corpus] = {"files": {k: [str(v), v.stat().st_size] for k, v in files.items()}, "rows": done}
        markdown += table(corpus, done) + [""]
    report["loadavg_end"] = os.getloadavg()
    report["table"] = markdown
    write_report("quality", report)
    print("\n".join(markdown))


if __name__ == "__main__":
    main()
