"""The Lightning side of ``cvfp``: ``CVFPCLI`` (fit / validate / test / predict) and its parser.

``CVFPCLI`` is a ``LightningCLI`` with the cvfp defaults: any LightningModule /
LightningDataModule named by ``class_path``, ``data.vocab_size`` linked to the model,
``last.ckpt`` after every epoch (:class:`~cvfp_lightning.callbacks.EpochCheckpoint`), RNG
seed 42, a rich progress bar, a ``NonFiniteGuard``, a ``HeadlineMetric`` (``hp_metric``)
and a ``CarryBest`` on every run, the data settings among the logged hyperparameters,
``--ckpt_path last|best`` resolved over earlier runs (a resumed run keeps the earlier run's
best checkpoint, copied into its own folder) and a resume with changed settings refused.
``trainer.enable_progress_bar`` also switches the package's own progress
(:mod:`cvfp_lightning.progress`: sequential pass, context cache, Top-K loops) for the run.
``CVFPArgumentParser`` (also the parser of the other subcommands) prints parse
errors as one line on stderr with exit code 2 (the full report with ``--debug``).

The subcommand table and the entry point are in :mod:`cvfp_lightning.cli`; runs called
from Python (the scaling law, tests) go through :func:`cvfp_lightning.runs.fit`.
"""

from __future__ import annotations

import glob
import inspect
import os
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from cvfp_lightning import progress
from cvfp_lightning.callbacks import (CarryBest, EpochCheckpoint, GenerationWriter, HeadlineMetric, NonFiniteGuard,
                                      ResidualMonitor, RunSummary, TopKReport, TrainingDiverged)
from cvfp_lightning.errors import CVFPUserError
from cvfp_lightning.models.legacy import RESUME_REFUSED, is_legacy_state_dict
from cvfp_lightning.modules.lm_base import NextTokenModule
from cvfp_lightning.modules.phase1.base import Phase1Base
from cvfp_lightning.modules.topk import TopKBase
from cvfp_lightning.schedulers import add_scheduler, check_resumed_schedulers


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _to_plain(value):
    """Namespaces / dataclasses of a parsed config -> plain dicts and lists."""
    from dataclasses import asdict, is_dataclass

    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        value = value.as_dict()
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _loggable(value):
    """Plain values as they are, anything else (paths, objects) as its text: safe for logs and checkpoints."""
    if isinstance(value, dict):
        return {str(k): _loggable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_loggable(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def one_line(message: str) -> str:
    """Collapse a (jsonargparse) error message to one line without the value dumps."""
    lines = [line.strip().lstrip("- ").strip() for line in str(message).splitlines()]
    noise = ("Given value", "Expected a <class 'NoneType'>", "Does not validate against any of the Union",
             "Subtypes:", "Errors:")
    keep = [line for line in lines if line and not line.startswith(noise)]
    return " ".join(keep)[:800]


def find_user_error(exc: BaseException | None) -> CVFPUserError | None:
    """The user error behind ``exc``.

    jsonargparse re-raises errors of ``__init__`` as a ValueError whose text embeds ours
    but whose cause is another union member's error, so the message is matched too.
    Lightning's MisconfigurationException (bad trainer flags) counts as a user error.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    top, seen = exc, set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CVFPUserError):
            return exc
        if isinstance(exc, MisconfigurationException):
            return CVFPUserError(one_line(str(exc)))
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    last = CVFPUserError.last
    if top is not None and last is not None and str(last) and str(last) in str(top):
        return last
    return None


class CVFPArgumentParser(LightningArgumentParser):
    """Parse errors as one line on stderr, exit code 2 (the full report with ``--debug``)."""

    debug = False

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_epoch is a typo, not --trainer.max_epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if self.debug or not self.exit_on_error:
            return super().error(message, ex)
        user = find_user_error(ex)
        sys.stderr.write(f"cvfp: error: {user if user is not None else one_line(message)}\n")
        self.exit(2)


class CVFPCLI(LightningCLI):
    """LightningCLI with the cvfp defaults (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", L.LightningModule)
        kwargs.setdefault("datamodule_class", L.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 42)
        kwargs.setdefault("save_config_kwargs", {"overwrite": False})
        kwargs.setdefault("parser_class", CVFPArgumentParser)
        with progress.kept_switch():  # this run's trainer.enable_progress_bar applies to this run only
            super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(EpochCheckpoint, "checkpoint")  # last.ckpt after every epoch
        parser.set_defaults({"checkpoint.save_last": True})
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        """Add a NonFiniteGuard, a HeadlineMetric, a CarryBest (a resumed run keeps the earlier run's
        best checkpoint), the reports of the model's kind (RunSummary for next-token models,
        TopKReport for Top-K, ResidualMonitor for Phase 1, GenerationWriter for predict) and a
        RichProgressBar unless progress bars are off or one is configured; switch the package's
        progress on or off with the progress bar."""
        configured = list(config.get("callbacks") or []) + list(callbacks)
        reports = {NextTokenModule: RunSummary, TopKBase: TopKReport, Phase1Base: ResidualMonitor}
        if self.subcommand == "predict":
            reports = {NextTokenModule: GenerationWriter}
        defaults = [NonFiniteGuard, HeadlineMetric, CarryBest] + [report for kind, report in reports.items()
                                                       if isinstance(self.model, kind)]
        callbacks = [*callbacks, *(kind() for kind in defaults if not any(isinstance(c, kind) for c in configured))]
        bars = config.get("enable_progress_bar", True) is not False
        progress.set_enabled(bars)
        if bars and not any(isinstance(c, ProgressBar) for c in configured):
            callbacks = [*callbacks, RichProgressBar()]
        try:
            return super()._instantiate_trainer(config, callbacks)
        except ValueError as exc:  # Lightning's check of a flag's value, e.g. strategy='foo', accelerator='foo'
            raise CVFPUserError(f"trainer: {one_line(str(exc))}") from exc

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """Lightning's ``--optimizer`` (with its ``--lr_scheduler``), or ``--lr_scheduler`` alone on
        the model's own optimizer (Lightning would ignore it: :mod:`cvfp_lightning.schedulers`)."""
        super()._add_configure_optimizers_method_to_model(subcommand)
        scheduler = self._configured_scheduler(subcommand)
        if scheduler is None or self._get(self.config_init, "optimizer"):
            return
        add_scheduler(self.model, scheduler)

    def _configured_scheduler(self, subcommand: str | None, config=None) -> dict | None:
        """The run's ``lr_scheduler`` as ``{"class_path", "init_args"}`` (None without one)."""
        if not self.auto_configure_optimizers or "lr_scheduler" not in self._parser(subcommand)._lr_schedulers:
            return None
        config = self.config_init if config is None else config
        value = config.get(subcommand, config).get("lr_scheduler") if subcommand else config.get("lr_scheduler")
        return _to_plain(value) or None

    def _run_subcommand(self, subcommand: str) -> None:
        """Run it; a fit refused with a user error before its first step leaves no run folder."""
        try:
            super()._run_subcommand(subcommand)
        except CVFPUserError as exc:
            if subcommand == "fit" and not isinstance(exc, TrainingDiverged) and self.trainer.global_step == 0:
                self._remove_refused_run_folder()  # refused before any training step (a diverged run keeps its logs)
            raise

    # what a fit writes into its new run folder before its first checkpoint
    _SETUP_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.")

    def _remove_refused_run_folder(self) -> None:
        """The run folder this fit created, when it holds only set-up files (no checkpoint, no
        summary): a refused run is not an empty ``version_N`` in TensorBoard and ``--ckpt_path last``."""
        trainer = self.trainer
        # the logger's own log_dir: Trainer.log_dir is a broadcast, which would wait for ranks that do not come here
        log_dir = getattr(trainer.logger, "log_dir", None) if trainer.is_global_zero else None
        if not log_dir:
            return
        folder = Path(log_dir)
        if not folder.is_dir():
            return
        files = [p for p in folder.rglob("*") if not p.is_dir()]
        if all(p.parent in (folder, folder / "checkpoints") and p.name.startswith(self._SETUP_FILES) for p in files):
            import shutil

            shutil.rmtree(folder, ignore_errors=True)

    def after_fit(self) -> None:
        """Score the test split with the best weights (``RunSummary`` has restored them): the
        ``test/*`` metrics go to the logger and to ``summary.json``. Only for next-token models
        whose data module holds a test split (``test_fraction`` or ``test_paths``), after a fit
        that ran to its end."""
        dm, trainer = self.datamodule, self.trainer
        if not isinstance(self.model, NextTokenModule) or getattr(dm, "test_sequences", None) is None:
            return
        if trainer.interrupted or trainer.fast_dev_run:
            return
        trainer.test(self.model, datamodule=dm, verbose=False)

    def after_instantiate_classes(self) -> None:
        """The data config (class and init args) as the data module's hyperparameters, unless it
        saved its own: Lightning logs them with the model's (TensorBoard's HPARAMS tab, ``data/*``)
        and stores them in checkpoints."""
        dm, data = self.datamodule, self._get(self.config, "data")
        if dm is None or data is None or getattr(dm, "hparams", None):
            return
        settings = _to_plain(data)
        if isinstance(settings, dict) and "class_path" in settings:
            settings = {"class": str(settings["class_path"]).rsplit(".", 1)[-1], **(settings.get("init_args") or {})}
        if isinstance(settings, dict) and settings:
            dm.save_hyperparameters({"data": _loggable(settings)}, frame=inspect.currentframe())

    def _set_seed(self) -> None:
        """Lightning's seeding, without the log line (user errors stay one line on stderr)."""
        from lightning.fabric.utilities.seed import seed_everything

        seed = self._get(self.config, "seed_everything")
        if seed is False:
            return
        seed = seed_everything(None if seed is True else seed, workers=True, verbose=False)
        (self.config[self.subcommand] if self.subcommand else self.config)["seed_everything"] = seed

    # ---- resume: find `last`, refuse changed hyperparameters ---------------------------
    def _logger_dirs(self) -> list[Path]:
        cfg = self.config[self.config.subcommand]
        logger = cfg.get("trainer", {}).get("logger")
        root = Path(cfg.get("trainer", {}).get("default_root_dir") or ".")
        dirs = []
        for item in (logger if isinstance(logger, list) else [logger]):
            init = getattr(item, "init_args", None) or (item.get("init_args") if isinstance(item, dict) else None)
            if init is not None:
                init = _to_plain(init)
                save_dir = init.get("save_dir") or init.get("root_dir")
                if save_dir:
                    dirs.append(Path(save_dir) / (init.get("name") or ""))
        return dirs or [root / "lightning_logs"]

    def _resolve_newest(self, which: str) -> str:
        """The newest ``last.ckpt`` (``which="last"``) or ``best*.ckpt`` of earlier runs."""
        pattern = "last.ckpt" if which == "last" else "best*.ckpt"
        candidates = []
        for d in self._logger_dirs():
            candidates += glob.glob(str(d / "**" / "checkpoints" / pattern), recursive=True)
        if not candidates:
            where = ", ".join(str(d) for d in self._logger_dirs())
            raise CVFPUserError(f"--ckpt_path {which}: no {pattern} found under {where}: nothing to load; "
                                "give the checkpoint's path (or train first).")
        return max(candidates, key=os.path.getmtime)

    def _parse_ckpt_path(self) -> None:
        """Check the checkpoint before anything is built (replaces Lightning's silent merge).

        ``last`` resolves to the newest ``last.ckpt`` of earlier runs in the logger folder,
        and (for validate / test / predict) ``best`` to the newest ``best*.ckpt``.
        A checkpoint whose hyperparameters differ from the config is refused with the
        differences named (Lightning would silently keep the checkpoint's values).
        """
        if not self.config.get("subcommand"):
            return
        sub = self.config.subcommand
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("hpc", "registry") or (ckpt_path == "best" and sub == "fit"):
            return
        if ckpt_path in ("last", "best"):
            ckpt_path = self._resolve_newest(ckpt_path)
            self.config[sub]["ckpt_path"] = ckpt_path
            print(f"cvfp: using {ckpt_path}", file=sys.stderr)
        from cvfp_lightning.io import safe_torch_load

        if not Path(ckpt_path).is_file():
            raise CVFPUserError(f"--ckpt_path {ckpt_path!r} does not exist: give the path of a .ckpt file "
                                "(e.g. lightning_logs/.../checkpoints/last.ckpt) or 'last'.")
        ckpt = safe_torch_load(ckpt_path)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise CVFPUserError(f"--ckpt_path {ckpt_path!r} is not a Lightning checkpoint (no state_dict).")
        if sub == "fit" and ckpt.get("optimizer_states") and is_legacy_state_dict(ckpt["state_dict"]):
            raise CVFPUserError(f"--ckpt_path {ckpt_path!r}: {RESUME_REFUSED}")
        if sub == "fit" and ckpt.get("optimizer_states"):
            check_resumed_schedulers(ckpt_path, ckpt.get("lr_schedulers") or [],
                                     self._configured_scheduler(sub, self.config))
        saved_hp = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
        model_cfg = self.config[sub].get("model")
        init_args = getattr(model_cfg, "init_args", None)
        plain = _to_plain(init_args or {})
        # options the model records at save time for its rebuild (Phase 2's Phase 1 pairing), when left null
        recorded = getattr(_model_class(model_cfg), "RECORDED_ARGS", ())
        taken = {k: v for k, v in saved_hp.items() if k in recorded and plain.get(k) is None and v is not None}
        for key, value in taken.items():
            init_args[key] = value
        # options of how a trained model reads text (no weights): validate / test / predict may change them
        free = getattr(_model_class(model_cfg), "READING_ARGS", ()) if sub != "fit" else ()
        saved = _flatten({k: v for k, v in saved_hp.items() if k not in taken and k not in free})
        current = _flatten({k: v for k, v in plain.items() if k not in free})
        for top in set(saved_hp) & set(plain) - set(free) - set(taken):  # a nested option null on one side only:
            a, b = saved_hp[top], plain[top]                                # one difference, compared whole
            if (a is None) != (b is None) and isinstance(b if a is None else a, dict):
                saved = {k: v for k, v in saved.items() if k != top and not k.startswith(top + ".")}
                current = {k: v for k, v in current.items() if k != top and not k.startswith(top + ".")}
                saved[top], current[top] = a, b
        diffs = [f"{k}: checkpoint {saved[k]!r} vs config {current[k]!r}" for k in sorted(saved)
                 if k in current and k != "vocab_size" and saved[k] != current[k]]
        missing = sorted(k for k in saved if k not in current and k != "vocab_size")
        if missing and current:
            raise CVFPUserError(f"--ckpt_path {ckpt_path!r} was written by another model class (its "
                                f"hyperparameters {missing[:5]} are not options of {model_cfg.class_path}).")
        if diffs:
            raise CVFPUserError(f"--ckpt_path {ckpt_path!r} was trained with other settings; a resume must use the "
                                f"same ones (the run's config.yaml holds them: --config <run>/config.yaml). "
                                f"Differences: {'; '.join(diffs)}.")


def _model_class(model_cfg) -> type | None:
    """The class named by ``model.class_path`` (None when it cannot be imported)."""
    import importlib

    path = getattr(model_cfg, "class_path", None)
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def check_config_files(args: list[str]) -> None:
    """Name the file when a ``--config`` is missing or not YAML (jsonargparse does not)."""
    import yaml

    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path is None:
            continue
        if not Path(path).is_file():
            raise CVFPUserError(f"--config {path!r} does not exist: give the path of a YAML config (see configs/).")
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CVFPUserError(f"--config {path!r} is not valid YAML: {one_line(str(exc))}") from exc
