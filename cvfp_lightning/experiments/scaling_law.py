"""The scaling-law experiment: ``cvfp scaling --config configs/scaling.yaml``.

For every size N of ``sizes`` (training sample counts, given to the runs as
``data.train_samples``: the validation samples stay the same at every size),
smallest first, it trains through :func:`cvfp_lightning.runs.fit`, the code of
``cvfp fit`` (no second training loop):

1. Phase 1: ``cvfp fit --config <phase1_config> --data.init_args.train_samples N ...``; its
   ``ContextCacheHandoff`` writes the context cache next to ``last.ckpt``;
2. Phase 2: ``cvfp fit --config <phase2_config> --model.init_args.phase1_checkpoint
   <that last.ckpt> ...``, which reads the cache ("cache hit");
3. with ``baseline`` (``gru``, ``lstm`` or ``transformer``): ``cvfp fit --config
   <baseline_config>`` on the same data, sized to Phase 2's trainable parameter count
   (``model.init_args.match_params``, unless ``baseline_overrides`` sets it).

``overrides`` (dotted keys, as on the ``cvfp fit`` command line) go to every run, so the
data settings of Phase 1 and Phase 2 agree (the cache needs that); ``phase1_overrides``,
``phase2_overrides`` and ``baseline_overrides`` go to one kind of run.

Recorded per size and model: train and validation tokens, the best epoch's val PPL, loss
and accuracy, Phase 1's effective rank (% of context_dim, validation and train) and
iterations, seconds per run and the size's wall time. Then, per model,
:func:`fit_power_law` fits ``log(PPL) = alpha * log(train tokens) + log(A)``.

``out_dir`` (``--out_dir``) receives:

- ``scaling.csv`` (one row per size and model), ``scaling.json`` (rows, fits, settings;
  ``wall_s``: the sum of the rows' seconds, ``run_s``: this invocation's, less on resume),
  ``scaling.png`` (log-log PPL against train tokens with the fitted lines), and the same in
  TensorBoard under ``tensorboard/``;
- ``samples_<N>/<run>/``: the Lightning logs and checkpoints of each run (``run`` =
  ``phase1``, ``phase2`` or the baseline's arch) and ``samples_<N>/<run>.json``, written
  atomically when the run has finished.

Resume: a rerun with the same settings skips every run that has its ``<run>.json`` and
starts the others afresh (a half-written run folder is deleted first). A record written
with other settings (config file contents or overrides) is refused, never mixed in;
display-only overrides (:data:`DISPLAY_KEYS`, e.g. ``trainer.enable_progress_bar``) are not
settings. Each run uses one process: keep ``trainer.devices`` at 1.

Progress: one line per run with the overall bar (runs done / to do, elapsed, ETA from the
mean time per run so far) above each run's own Lightning bars; ``--progress false`` turns
both off (it passes ``--trainer.enable_progress_bar=false`` to every run).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

from cvfp_lightning import progress
from cvfp_lightning.errors import CVFPUserError, check
from cvfp_lightning.io import _atomic_write, atomic_write_csv, atomic_write_json, file_sha256
from cvfp_lightning.lightning_cli import CVFPCLI, CVFPArgumentParser
from cvfp_lightning.runs import FitResult, fit, program_argv

CVFP = "cvfp"
BASELINES = ("gru", "lstm", "transformer")
COLUMNS = ["model", "samples", "train_tokens", "val_tokens", "val_ppl", "val_acc", "val_loss", "effective_rank_pct",
           "train_effective_rank_pct", "phase1_iterations", "phase1_s", "lm_s", "wall_s", "trainable_params",
           "best_epoch"]
# overrides that change what a run shows, not what it computes: left out of the resume records' settings
DISPLAY_KEYS = ("trainer.enable_progress_bar", "trainer.enable_model_summary")


# ---- the fit ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerLawFit:
    """``PPL = A * tokens ** alpha`` fitted on ``points`` sizes; ``r2`` in log space."""

    alpha: float
    A: float
    r2: float
    points: int

    @property
    def ppl_reduction_2x(self) -> float:
        """Share by which PPL falls when the data doubles: ``1 - 2 ** alpha``."""
        return 1.0 - 2.0 ** self.alpha

    def predict(self, tokens: float) -> float:
        return self.A * float(tokens) ** self.alpha

    def as_dict(self) -> dict:
        return {**asdict(self), "ppl_reduction_2x": self.ppl_reduction_2x}

    def describe(self) -> str:
        return (f"log(PPL) = {self.alpha:.4f} * log(tokens) + log({self.A:.4g}): alpha {self.alpha:.4f}, "
                f"A {self.A:.4g}, R^2 {self.r2:.4f} ({self.points} sizes); 2x data -> "
                f"{100 * self.ppl_reduction_2x:.1f}% lower PPL")


def fit_power_law(tokens: Sequence[float], ppl: Sequence[float]) -> PowerLawFit:
    """Least-squares fit of ``log(PPL) = alpha * log(tokens) + log(A)``.

    With ``x = ln(tokens)``, ``y = ln(PPL)`` over n >= 2 points (means ``x̄``, ``ȳ``):

        alpha = sum((x - x̄) (y - ȳ)) / sum((x - x̄)^2)
        ln A  = ȳ - alpha * x̄
        R^2   = 1 - sum((y - ŷ)^2) / sum((y - ȳ)^2),   ŷ = alpha * x + ln A   (1 when all y are equal)

    so ``PPL = A * tokens^alpha``; doubling the data multiplies PPL by ``2^alpha``, a
    ``1 - 2^alpha`` reduction.
    """
    check(len(tokens) == len(ppl), f"fit_power_law: {len(tokens)} token counts but {len(ppl)} perplexities.")
    check(len(tokens) >= 2, f"fit_power_law needs at least 2 points, got {len(tokens)}.")
    bad = [(t, p) for t, p in zip(tokens, ppl)
           if not (math.isfinite(t) and math.isfinite(p) and t > 0 and p > 0)]
    check(not bad, f"fit_power_law needs positive finite token counts and perplexities, got {bad[:3]}.")
    x = [math.log(t) for t in tokens]
    y = [math.log(p) for p in ppl]
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    check(sxx > 0, f"fit_power_law needs at least 2 different token counts, got {list(tokens)}.")
    alpha = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx
    log_a = my - alpha * mx
    ss_res = sum((yi - (alpha * xi + log_a)) ** 2 for xi, yi in zip(x, y))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLawFit(alpha=alpha, A=math.exp(log_a), r2=r2, points=n)


# ---- settings -------------------------------------------------------------------------------------
def build_parser():
    from jsonargparse import ActionConfigFile
    from jsonargparse.typing import Path_fr

    parser = CVFPArgumentParser(prog="cvfp scaling", description=(
        "The scaling-law experiment: Phase 1 + Phase 2 (and optionally a baseline) for every size, then the fit "
        "log(PPL) = alpha * log(train tokens) + log(A). Paths in a config file are relative to that file."))
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML config, e.g. configs/scaling.yaml")
    parser.add_argument("--sizes", type=list[int], default=[10, 20, 40, 79],
                        help="training sample counts (data.train_samples), strictly increasing, at least 2")
    parser.add_argument("--out_dir", type=str, default="lightning_logs/scaling",
                        help="where the results, the runs and the resume records go")
    parser.add_argument("--phase1_config", type=Path_fr, default=None, help="the Phase 1 config (cvfp fit)")
    parser.add_argument("--phase2_config", type=Path_fr, default=None, help="the Phase 2 config (cvfp fit)")
    parser.add_argument("--overrides", type=dict[str, Any], default={},
                        help="dotted keys -> values for every run, e.g. {data.init_args.max_seq_len: 512}")
    parser.add_argument("--phase1_overrides", type=dict[str, Any], default={}, help="for the Phase 1 runs")
    parser.add_argument("--phase2_overrides", type=dict[str, Any], default={}, help="for the Phase 2 runs")
    parser.add_argument("--baseline", type=Optional[Literal["gru", "lstm", "transformer"]], default=None,
                        help="also train this baseline LM at every size (same data, Phase 2's parameter count)")
    parser.add_argument("--baseline_config", type=Optional[Path_fr], default=None,
                        help="the baseline config; default baseline_<arch>.yaml (lstm: baseline_gru.yaml) "
                             "beside phase1_config")
    parser.add_argument("--baseline_overrides", type=dict[str, Any], default={}, help="for the baseline runs")
    parser.add_argument("--progress", type=bool, default=True,
                        help="show the overall progress over the runs and each run's progress bars")
    return parser


@dataclass
class ScalingSettings:
    """What ``cvfp scaling`` runs (see the module docstring); paths are absolute."""

    sizes: list[int]
    out_dir: Path
    phase1_config: Path
    phase2_config: Path
    overrides: dict
    phase1_overrides: dict
    phase2_overrides: dict
    baseline: str | None = None
    baseline_config: Path | None = None
    baseline_overrides: dict | None = None
    progress: bool = True

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        self.overrides = dict(self.overrides or {})
        self.phase1_overrides = dict(self.phase1_overrides or {})
        self.phase2_overrides = dict(self.phase2_overrides or {})
        self.baseline_overrides = dict(self.baseline_overrides or {})
        check_sizes(self.sizes)
        for name in ("phase1_config", "phase2_config"):
            value = getattr(self, name)
            check(value is not None, f"{name} is not set: give the config of that phase, e.g. "
                                     f"--{name} configs/{name.split('_')[0]}.yaml (see configs/scaling.yaml).")
            setattr(self, name, Path(value))
        check(self.baseline is None or self.baseline in BASELINES,
              f"baseline={self.baseline!r} is unknown: expected one of {', '.join(BASELINES)} or null.")
        if self.baseline and self.baseline_config is None:
            name = "baseline_transformer.yaml" if self.baseline == "transformer" else "baseline_gru.yaml"
            self.baseline_config = self.phase1_config.parent / name
        if self.baseline_config is not None:
            self.baseline_config = Path(self.baseline_config)
            check(self.baseline_config.is_file(), f"baseline_config {str(self.baseline_config)!r} does not exist: "
                                                  "give the config of the baseline (e.g. configs/baseline_gru.yaml).")

    @classmethod
    def from_namespace(cls, cfg) -> "ScalingSettings":
        def path(value):
            return None if value is None else Path(os.fspath(value))

        return cls(sizes=list(cfg.sizes or []), out_dir=Path(cfg.out_dir), phase1_config=path(cfg.phase1_config),
                   phase2_config=path(cfg.phase2_config), overrides=cfg.overrides,
                   phase1_overrides=cfg.phase1_overrides, phase2_overrides=cfg.phase2_overrides,
                   baseline=cfg.baseline, baseline_config=path(cfg.baseline_config),
                   baseline_overrides=cfg.baseline_overrides, progress=cfg.progress)


def check_sizes(sizes: Sequence[int]) -> None:
    """At least 2 positive sample counts, strictly increasing."""
    sizes = list(sizes or [])
    check(len(sizes) >= 2, f"sizes={sizes} has fewer than 2 sizes: a scaling law needs at least 2 sample counts, "
                           "e.g. --sizes '[10, 20, 40, 79]'.")
    check(all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes),
          f"sizes={sizes} is invalid: expected positive integers (sample counts).")
    bad = next((i for i in range(1, len(sizes)) if sizes[i] <= sizes[i - 1]), None)
    check(bad is None, f"sizes={sizes} is not strictly increasing ({sizes[bad - 1] if bad else ''} then "
                       f"{sizes[bad] if bad else ''}): list each sample count once, smallest first.")


def settings_only(args: list[str]) -> list[str]:
    """``args`` without the display-only overrides (:data:`DISPLAY_KEYS`)."""
    return [a for a in args if not any(a.startswith(f"--{key}=") for key in DISPLAY_KEYS)]


def cli_args(overrides: dict) -> list[str]:
    """``{"a.b": v}`` -> ``["--a.b=v"]``: strings as they are, other values as JSON (read as YAML).

    ``...class_path`` keys come first, so the options that follow apply to the new class.
    """
    keys = sorted(overrides, key=lambda key: not key.endswith("class_path"))
    return [f"--{key}={overrides[key] if isinstance(overrides[key], str) else json.dumps(overrides[key])}"
            for key in keys]


# ---- one run ---------------------------------------------------------------------------------------
def _metric(metrics, key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _collect_phase1(result: FitResult) -> dict:
    m = result.metrics
    return {"checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
            "context_cache": str(result.context_cache) if result.context_cache else None,
            "iterations": result.epochs, "converged": result.converged,
            "convergence_rate": _metric(m, "train/convergence_rate"),
            "effective_rank_pct": _metric(m, "val/effective_rank_pct"),
            "train_effective_rank_pct": _metric(m, "train/effective_rank_pct"),
            "train_tokens": result.tokens.get("train"), "val_tokens": result.tokens.get("val")}


def _collect_lm(result: FitResult) -> dict:
    summary = result.summary
    check(summary.get("val/ppl") is not None, f"the {summary.get('model', 'LM')} run logged no val/ppl: the LM "
                                              "configs of cvfp scaling must validate every epoch.")
    keep = ("val/ppl", "val/acc", "val/loss", "val/bpb", "train_tokens", "val_tokens", "trainable_params",
            "best_epoch", "epochs_run", "best_model_path", "contexts")
    return {k: summary.get(k) for k in keep}


def run_fit(kind: str, args: list[str]) -> dict:
    """``cvfp fit ARGS`` in this process; the metrics of a ``phase1`` or ``lm`` run."""
    result = fit(args)
    return _collect_phase1(result) if kind == "phase1" else _collect_lm(result)


Runner = Callable[[str, list[str]], dict]


# ---- the experiment --------------------------------------------------------------------------------
class ScalingExperiment:
    """Runs (or resumes) the experiment of ``settings``; ``runner`` trains one run (tests replace it)."""

    def __init__(self, settings: ScalingSettings, runner: Runner = run_fit, log: Callable[[str], None] | None = None):
        self.s = settings
        self.runner = runner
        self._bar: progress.ProgressTask | None = None  # the overall bar while run() runs
        self.log = log or (lambda msg: print(f"cvfp scaling: {msg}", file=sys.stderr, flush=True))

    # ---- layout ---------------------------------------------------------------------------------
    def size_dir(self, size: int) -> Path:
        return self.s.out_dir / f"samples_{size:05d}"

    def record_path(self, size: int, run: str) -> Path:
        return self.size_dir(size) / f"{run}.json"

    def runs(self) -> list[str]:
        return ["phase1", "phase2"] + ([self.s.baseline] if self.s.baseline else [])

    # ---- checks before training -----------------------------------------------------------------
    def check_inputs(self) -> None:
        """Parse every config with its overrides and check the largest size fits the data."""
        size = self.s.sizes[-1]
        args = self._args("phase1", size)[:-1] + ["--trainer.logger=false"]
        with program_argv():
            cli = CVFPCLI(args=args, run=False)
        dm = cli.datamodule
        check(hasattr(dm, "train_samples"), f"{self.s.phase1_config}: the data module {type(dm).__name__} has no "
                                            "train_samples: cvfp scaling sizes are training sample counts.")
        try:
            dm.prepare_data()
            dm.setup()
        except CVFPUserError as exc:
            if "but the source has only" not in str(exc):
                raise
            found = re.search(r"only (\d+) samples", str(exc))
            n = found.group(1) if found else "fewer"
            raise CVFPUserError(f"sizes={self.s.sizes}: size {size} is larger than the data (the source has only "
                                f"{n} samples): give sizes up to {n}.") from None
        for run in self.runs()[1:]:  # parse only: the Phase 1 checkpoint does not exist yet
            cli.parser.parse_args(self._args(run, size, phase1_checkpoint="unused.ckpt")[:-1])

    # ---- command lines --------------------------------------------------------------------------
    def _config(self, run: str) -> Path:
        return {"phase1": self.s.phase1_config, "phase2": self.s.phase2_config}.get(run, self.s.baseline_config)

    def _settings_args(self, run: str, size: int) -> list[str]:
        """What defines a run (recorded, and compared on resume)."""
        own = {"phase1": self.s.phase1_overrides, "phase2": self.s.phase2_overrides}.get(run, self.s.baseline_overrides)
        extra = {"model.init_args.arch": run} if run in BASELINES else {}
        return cli_args({**self.s.overrides, **own, **extra, "data.init_args.train_samples": size})

    def _args(self, run: str, size: int, phase1_checkpoint: str | None = None, match_params: int | None = None):
        """``cvfp fit`` arguments; the last one is the logger (put in this size's folder)."""
        args = ["--config", str(self._config(run)), *self._settings_args(run, size)]
        if run == "phase2":
            args.append(f"--model.init_args.phase1_checkpoint={phase1_checkpoint}")
        if match_params is not None and "model.init_args.match_params" not in self.s.baseline_overrides:
            args.append(f"--model.init_args.match_params={int(match_params)}")
        if not self.s.progress:
            args.append("--trainer.enable_progress_bar=false")
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                  "init_args": {"save_dir": str(self.s.out_dir), "name": self.size_dir(size).name, "version": run}}
        return [*args, f"--trainer.logger={json.dumps(logger)}"]

    def _fingerprint(self, run: str, size: int) -> dict:
        config = self._config(run)
        return {"run": run, "size": size, "config": str(config), "config_sha256": file_sha256(config),
                "args": settings_only(self._settings_args(run, size))}

    # ---- runs -----------------------------------------------------------------------------------
    def _finished(self, run: str, size: int) -> dict | None:
        path = self.record_path(size, run)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CVFPUserError(f"{path} is not a readable scaling record ({exc}): delete it to rerun that run.") from None
        want = self._fingerprint(run, size)
        got = dict(record.get("settings", {}))
        if isinstance(got.get("args"), list):  # records written before display keys were left out
            got["args"] = settings_only(got["args"])
        diffs = [k for k in ("config", "config_sha256", "args") if got.get(k) != want[k]]
        check(not diffs, f"{path} was written with other settings ({', '.join(diffs)} differ: "
                         f"{got.get('args') if 'args' in diffs else got.get('config')!r} vs "
                         f"{want['args'] if 'args' in diffs else want['config']!r}); a resume must use the same ones: "
                         f"use another --out_dir, or delete {self.size_dir(size)} to rerun that size.")
        return record

    def _run(self, run: str, size: int, **kwargs) -> dict:
        record = self._finished(run, size)
        if record is not None:
            self.log(f"samples {size}: {run} already done ({self.record_path(size, run)}), skipped")
            return record
        run_dir = self.size_dir(size) / run
        if run_dir.exists():  # an interrupted run: start it again from scratch
            shutil.rmtree(run_dir)
        self.log(f"samples {size}: {run} ...")
        start = time.perf_counter()
        metrics = self.runner("phase1" if run == "phase1" else "lm", self._args(run, size, **kwargs))
        record = {"settings": self._fingerprint(run, size), "metrics": metrics,
                  "seconds": time.perf_counter() - start}
        atomic_write_json(record, self.record_path(size, run))
        self.log(f"samples {size}: {run} done in {record['seconds']:.0f}s")
        if self._bar is not None:
            self._bar.advance(1, description=f"cvfp scaling: samples {size} {run} done")
        return record

    def run_size(self, size: int) -> list[dict]:
        """Train (or read back) every run of one size; its table rows."""
        p1 = self._run("phase1", size)
        ckpt = p1["metrics"].get("checkpoint")
        check(bool(ckpt) and Path(ckpt).is_file(),
              f"the Phase 1 checkpoint of samples {size} ({ckpt}) is missing: delete {self.size_dir(size)} to rerun "
              "that size (the Phase 1 config must save last.ckpt: checkpoint.save_last true).")
        p2 = self._run("phase2", size, phase1_checkpoint=ckpt)
        rows = [self._row(CVFP, size, p2, p1)]
        if self.s.baseline:
            base = self._run(self.s.baseline, size, match_params=p2["metrics"].get("trainable_params"))
            rows.append(self._row(self.s.baseline, size, base))
        return rows

    @staticmethod
    def _row(model: str, size: int, lm: dict, p1: dict | None = None) -> dict:
        m, q = lm["metrics"], (p1 or {}).get("metrics", {})
        phase1_s = p1["seconds"] if p1 else 0.0
        return {"model": model, "samples": size, "train_tokens": m.get("train_tokens") or q.get("train_tokens"),
                "val_tokens": m.get("val_tokens"), "val_ppl": m.get("val/ppl"), "val_acc": m.get("val/acc"),
                "val_loss": m.get("val/loss"), "effective_rank_pct": q.get("effective_rank_pct"),
                "train_effective_rank_pct": q.get("train_effective_rank_pct"),
                "phase1_iterations": q.get("iterations"), "phase1_s": phase1_s, "lm_s": lm["seconds"],
                "wall_s": phase1_s + lm["seconds"], "trainable_params": m.get("trainable_params"),
                "best_epoch": m.get("best_epoch")}

    def run(self) -> dict:
        """Every size, then the fits and the result files; returns the ``scaling.json`` content."""
        start = time.perf_counter()
        with progress.switched(self.s.progress):
            self.check_inputs()
            todo = sum(self._finished(run, size) is None for size in self.s.sizes for run in self.runs())
            rows = []
            with progress.task("cvfp scaling", total=todo, unit="runs", live=False) as self._bar:
                for size in self.s.sizes:
                    rows += self.run_size(size)
            self._bar = None
        return write_results(self.s, rows, time.perf_counter() - start)


# ---- results ---------------------------------------------------------------------------------------
def fits_of(rows: list[dict]) -> dict[str, PowerLawFit]:
    """One fit per model over its rows (models with fewer than 2 sizes are left out)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == model]
        if len(own) >= 2:
            out[model] = fit_power_law([r["train_tokens"] for r in own], [r["val_ppl"] for r in own])
    return out


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    cols = ["model", "samples", "train_tokens", "val_tokens", "val_ppl", "val_acc", "effective_rank_pct", "phase1_iterations",
            "wall_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def plot_figure(rows: list[dict], fits: dict[str, PowerLawFit]):
    """Log-log val PPL against train tokens, one colour per model, with the fitted lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.subplots()
    for k, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        own = [r for r in rows if r["model"] == model]
        xs, ys = [r["train_tokens"] for r in own], [r["val_ppl"] for r in own]
        colour = f"C{k}"
        ax.plot(xs, ys, "o", color=colour, label=f"{model} (measured)")
        fit = fits.get(model)
        if fit is not None:
            lo, hi = min(xs), max(xs)
            grid = [lo * (hi / lo) ** (i / 50) for i in range(51)]
            ax.plot(grid, [fit.predict(x) for x in grid], "-", color=colour,
                    label=f"{model}: PPL = {fit.A:.3g} $T^{{{fit.alpha:.3f}}}$ ($R^2$ {fit.r2:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("train tokens T")
    ax.set_ylabel("best val PPL")
    ax.set_title("Scaling: val perplexity against training tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_results(settings: ScalingSettings, rows: list[dict], seconds: float | None = None) -> dict:
    """``scaling.csv``, ``scaling.json``, ``scaling.png`` and TensorBoard in ``out_dir``; prints the table."""
    out = settings.out_dir
    fits = fits_of(rows)
    atomic_write_csv(rows, COLUMNS, out / "scaling.csv")
    result = {"rows": rows, "fits": {m: f.as_dict() for m, f in fits.items()},
              "fit_formula": "log(PPL) = alpha * log(train_tokens) + log(A)", "run_s": seconds,
              "wall_s": sum(r["wall_s"] or 0.0 for r in rows),
              "settings": {"sizes": settings.sizes, "phase1_config": str(settings.phase1_config),
                           "phase2_config": str(settings.phase2_config), "overrides": settings.overrides,
                           "phase1_overrides": settings.phase1_overrides,
                           "phase2_overrides": settings.phase2_overrides, "baseline": settings.baseline,
                           "baseline_config": str(settings.baseline_config) if settings.baseline_config else None,
                           "baseline_overrides": settings.baseline_overrides}}
    atomic_write_json(result, out / "scaling.json")
    fig = plot_figure(rows, fits)
    _atomic_write(out / "scaling.png", lambda handle: fig.savefig(handle, format="png"))
    table = markdown_table(rows)
    fit_lines = [f"{model}: {fit.describe()}" for model, fit in fits.items()]
    _write_tensorboard(out / "tensorboard", rows, fits, fig, table + "\n\n" + "\n\n".join(fit_lines))
    print(table)
    for line in fit_lines:
        print(line)
    print(f"results: {out / 'scaling.csv'}, {out / 'scaling.json'}, {out / 'scaling.png'}, {out / 'tensorboard'}")
    return result


def _write_tensorboard(folder: Path, rows: list[dict], fits: dict, fig, text: str) -> None:
    """Scalars per model at step = train tokens, the fit as scalars and text, the plot as an image."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("events.out.tfevents.*"):  # a resumed run rewrites the summary, not appends to it
        old.unlink()
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for r in rows:
            for key in ("val_ppl", "val_acc", "effective_rank_pct", "phase1_iterations", "wall_s"):
                if r.get(key) is not None:
                    writer.add_scalar(f"scaling/{r['model']}/{key}", float(r[key]), global_step=int(r["train_tokens"]))
        for model, fit in fits.items():
            for key, value in (("alpha", fit.alpha), ("A", fit.A), ("r2", fit.r2),
                               ("ppl_reduction_2x", fit.ppl_reduction_2x)):
                writer.add_scalar(f"fit/{model}/{key}", value, global_step=0)
        writer.add_text("scaling/table", text, global_step=0)
        writer.add_figure("scaling/plot", fig, global_step=0, close=False)
    finally:
        writer.close()


def main(argv: list[str]) -> dict:
    """``cvfp scaling ARGS`` (see the module docstring)."""
    cfg = build_parser().parse_args(list(argv))
    return ScalingExperiment(ScalingSettings.from_namespace(cfg)).run()
