"""Reliability: numerical faults stop cleanly, the last good checkpoint survives, writes are atomic."""

from __future__ import annotations

import os

import pytest
import torch

from cvfp_lightning.callbacks import NonFiniteGuard, TrainingDiverged
from cvfp_lightning.io import atomic_torch_save, atomic_write_text, safe_torch_load
from cvfp_lightning.errors import CVFPUserError
from helpers.cli import CONFIGS, run_cli

SMALL = ["--data.init_args.num_samples", "8", "--data.init_args.max_seq_len", "64",
         "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "1",
         "--model.init_args.embedding.embed_dim", "16", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.callbacks", "[]"]


@pytest.mark.slow
def test_nan_loss_stops_naming_epoch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import cvfp_lightning.modules.phase1.parallel as phase1

    real_mse = phase1.per_dim_mse
    real_start = phase1.Phase1Parallel.on_train_epoch_start
    poison = {"on": False}

    def start(self):
        poison["on"] = self.current_epoch == 2
        real_start(self)

    monkeypatch.setattr(phase1.Phase1Parallel, "on_train_epoch_start", start)
    monkeypatch.setattr(phase1, "per_dim_mse", lambda a, b: real_mse(a, b) * (float("nan") if poison["on"] else 1.0))
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(CONFIGS / "phase1.yaml"), *SMALL, "--trainer.max_epochs", "5",
                 "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "training stopped" in err[0] and "not finite at epoch 2" in err[0], err
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert ckpt["epoch"] == 1  # the last finished, finite iteration
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_guard_rejects_a_non_finite_gradient_before_the_step():
    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

    class Trainer:
        current_epoch, global_step, checkpoint_callback = 4, 17, None

    module = Module()
    module.w.grad = torch.tensor([1.0, float("inf"), 0.0])
    with pytest.raises(TrainingDiverged, match="gradient of w is not finite at epoch 4, step 17"):
        NonFiniteGuard().on_before_optimizer_step(Trainer(), module, None)
    module.w.grad = torch.ones(3)
    NonFiniteGuard().on_before_optimizer_step(Trainer(), module, None)  # finite: no error
    with pytest.raises(TrainingDiverged, match="training loss is nan"):
        NonFiniteGuard().on_train_batch_end(Trainer(), module, {"loss": torch.tensor(float("nan"))}, None, 0)


def test_atomic_writes_leave_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "cache.pt"
    atomic_torch_save({"a": torch.ones(2)}, target)

    def crash(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": torch.zeros(2)}, target)
    assert torch.equal(safe_torch_load(target)["a"], torch.ones(2))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["cache.pt"]  # no temp file left behind
    atomic_write_text("done\n", tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text() == "done\n"
    umask = os.umask(0o022)
    try:  # the mode open() would give, not mkstemp's owner-only 0600
        atomic_write_text("shared\n", tmp_path / "summary.json")
        os.umask(0o077)
        atomic_write_text("private\n", tmp_path / "meta.json")
    finally:
        os.umask(umask)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "meta.json").stat().st_mode & 0o777 == 0o600


def test_json_files_hold_no_nan(tmp_path):
    """A metric that is NaN (the bpb of synthetic ids, which have no text) is written as null."""
    import json

    from cvfp_lightning.io import atomic_write_json

    atomic_write_json({"val/bpb": float("nan"), "x": [1.0, float("inf")], "ok": 2.5}, tmp_path / "s.json")
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"val/bpb": None, "x": [1.0, None], "ok": 2.5}


def test_unreadable_files_are_named_in_one_line(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello world\n", encoding="utf-8")
    with pytest.raises(CVFPUserError) as info:
        safe_torch_load(text)  # torch says only "101" (a KeyError of the byte 'e')
    assert str(info.value).startswith(f"{str(text)!r} is not a readable cvfp_lightning file (KeyError: 101); ")
    with pytest.raises(CVFPUserError, match="is a folder, not a file"):
        safe_torch_load(tmp_path)


def test_a_long_load_error_is_cut_at_a_word_or_at_200_characters(tmp_path, monkeypatch):
    path = tmp_path / "x.ckpt"
    path.write_bytes(b"x")
    for message, kept in (("word " * 60, "word " * 39 + "word"), ("z" * 300, "z" * 200)):
        monkeypatch.setattr(torch, "load", lambda *a, message=message, **k: (_ for _ in ()).throw(ValueError(message)))
        with pytest.raises(CVFPUserError) as info:
            safe_torch_load(path)
        assert f"({kept} ...);" in str(info.value)


def test_untrusted_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CVFPUserError, match="not a readable"):
        safe_torch_load(path)


def _weights(ckpt) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _kill_after_first_checkpoint(args: list[str], logs, timeout: float = 240.0) -> None:
    """Start ``cvfp ARGS`` in a subprocess and SIGKILL it once an epoch's last.ckpt exists."""
    import os
    import signal
    import subprocess
    import sys
    import time

    # one thread like the in-process runs: the same kernels, so bit-identical results
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cvfp_lightning.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list(logs.rglob("last.ckpt"))
            if found and torch.load(found[0], weights_only=True)["epoch"] >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    config = ["fit", "--config", str(CONFIGS / "phase1.yaml"), *SMALL, "--trainer.max_epochs", "12"]
    run_cli([*config, "--trainer.logger.init_args.save_dir", str(tmp_path / "full")])
    killed = tmp_path / "killed"
    _kill_after_first_checkpoint([*config, "--trainer.logger.init_args.save_dir", str(killed)], killed)
    run_cli([*config, "--trainer.logger.init_args.save_dir", str(killed), "--ckpt_path", "last"])
    full = _weights(next((tmp_path / "full").rglob("last.ckpt")))
    resumed = [p for p in killed.rglob("last.ckpt") if "version_1" in str(p)]
    assert resumed, "the resumed run wrote no checkpoint"
    got = _weights(resumed[0])
    assert full.keys() == got.keys()
    for key in full:
        assert torch.equal(full[key], got[key]), key


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs in the dying process, not even an ``except Exception``."""


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch, store):
    """The window the SIGKILL test hits only sometimes: the contexts of epoch 2 are written, its checkpoint not."""
    import lightning.fabric.plugins.io.torch_io as torch_io

    config = ["fit", "--config", str(CONFIGS / "phase1.yaml"), *SMALL, "--trainer.max_epochs", "5",
              "--model.init_args.context_store", store]
    run_cli([*config, "--trainer.logger.init_args.save_dir", str(tmp_path / "full")])
    real_save = torch_io._atomic_save

    def save(checkpoint, path):
        if checkpoint["epoch"] >= 2:
            raise _Killed
        real_save(checkpoint, path)

    monkeypatch.setattr(torch_io, "_atomic_save", save)
    killed = tmp_path / "killed"
    with pytest.raises(_Killed):
        run_cli([*config, "--trainer.logger.init_args.save_dir", str(killed)])
    monkeypatch.setattr(torch_io, "_atomic_save", real_save)
    snapshot = killed / "phase1" / "version_0" / "contexts" / "snapshot"
    snapshots = sorted(p.name for p in snapshot.iterdir()) if store == "memory" else []
    if store == "memory":  # epoch 1's (kept) and epoch 2's; a disk store names its own generation files
        assert snapshots == ["step-0000000002", "step-0000000003"], snapshots
    last = killed / "phase1" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 1
    run_cli([*config, "--trainer.logger.init_args.save_dir", str(killed), "--ckpt_path", str(last)])
    full = _weights(tmp_path / "full" / "phase1" / "version_0" / "checkpoints" / "last.ckpt")
    got = _weights(killed / "phase1" / "version_1" / "checkpoints" / "last.ckpt")
    assert full.keys() == got.keys()
    for key in full:
        assert torch.equal(full[key], got[key]), key
    if store == "disk":
        return
    # the resumed run keeps its own newest two, and the killed run's files are left as they were
    assert sorted(p.name for p in (killed / "phase1" / "version_1" / "contexts" / "snapshot").iterdir()) == \
        ["step-0000000004", "step-0000000005"]
    assert sorted(p.name for p in (killed / "phase1" / "version_0" / "contexts" / "snapshot").iterdir()) == snapshots


@pytest.mark.slow
def test_soak_phase1_rss_stays_flat(tmp_path):
    """300 steps on a 100k-token corpus: resident memory does not grow after the first epoch."""
    import lightning as L

    from cvfp_lightning.data import SyntheticTokensDataModule
    from cvfp_lightning.modules import Phase1FixedPoint

    def rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    samples: list[float] = []

    class Rss(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            samples.append(rss_mb())

    import os

    dm = SyntheticTokensDataModule(vocab_size=4096, num_tokens=100_000, val_tokens=2_000, sequences="samples",
                                   max_seq_len=500, chunk_size=1000)
    model = Phase1FixedPoint(vocab_size=4096, context={"context_dim": 16, "num_layers": 1},
                             embedding={"embed_dim": 16})
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Rss()], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    assert trainer.global_step >= 3 and len(samples) == 3
    assert trainer.num_training_batches == 100  # 300 steps in all
    print("soak RSS after each epoch (MB):", [round(x, 1) for x in samples])
    assert samples[-1] - samples[0] < 20.0, samples  # MB, after the first epoch


QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _tiny_run(kind: str, tmp_path, corpus) -> list[str]:
    """``cvfp fit`` arguments of a tiny run of ``kind`` (phase2, repetition, baseline) without extra callbacks."""
    from helpers.lm import phase1_checkpoint

    quiet = [*QUIET, "--trainer.callbacks", "[]"]
    if kind == "phase2":
        ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", 4096)
        return ["--config", str(CONFIGS / "phase2.yaml"), "--model.init_args.phase1_checkpoint", str(ckpt),
                "--data.init_args.paths", f"[{corpus}]", "--data.init_args.chunk_size", "256",
                "--model.init_args.cache", "off", *quiet]
    if kind == "baseline":
        return ["--config", str(CONFIGS / "baseline_gru.yaml"), "--data.init_args.paths", f"[{corpus}]",
                "--model.init_args.match_params", "null", "--model.init_args.hidden_dim", "16",
                "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "8", *quiet]
    return ["--config", str(CONFIGS / "repetition.yaml"), "--data.init_args.max_stage", "2",
            "--data.init_args.epochs_per_stage", "2", "--data.init_args.repetitions", "12",
            "--data.init_args.batch_size", "4", "--model.init_args.context.context_dim", "16",
            "--model.init_args.context.hidden_dim", "16", "--model.init_args.embedding.embed_dim", "16",
            "--trainer.accelerator", "cpu", *quiet]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["phase2", "repetition", "baseline"])
def test_stop_and_resume_equals_uninterrupted_beyond_phase1(tmp_path, corpus, kind):
    """Shuffled position / window / phrase orders depend on (seed, epoch) only, so a resume is exact."""
    args = _tiny_run(kind, tmp_path, corpus)
    run_cli(["fit", *args, "--trainer.max_epochs", "4", "--trainer.logger.init_args.save_dir",
             str(tmp_path / "full")])
    run_cli(["fit", *args, "--trainer.max_epochs", "2", "--trainer.logger.init_args.save_dir",
             str(tmp_path / "part")])
    run_cli(["fit", *args, "--trainer.max_epochs", "4", "--ckpt_path", "last",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "part")])
    full = _weights(next((tmp_path / "full").rglob("last.ckpt")))
    got = _weights(next(p for p in (tmp_path / "part").rglob("last.ckpt") if "version_1" in str(p)))
    assert full.keys() == got.keys()
    for key in full:
        assert torch.equal(full[key], got[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("kind, stop, best_epoch", [("phase2", 4, 2), ("baseline", 3, 1)])
def test_a_resumed_run_keeps_the_best_of_the_epochs_before_its_resume(tmp_path, corpus, kind, stop, best_epoch):
    """lr 0.1: val/loss is lowest at ``best_epoch``, before the stop, and worse after it; the resumed
    run (a new version folder) ends on the uninterrupted run's best checkpoint, summary and test scores."""
    from cvfp_lightning.io import file_sha256
    from cvfp_lightning.runs import fit
    from helpers.cli import read_scalars

    args = [*_tiny_run(kind, tmp_path, corpus), "--model.init_args.lr", "0.1", "--trainer.max_epochs"]
    full = fit([*args, "6", "--trainer.logger.init_args.save_dir", str(tmp_path / "full")])
    part = ["--trainer.logger.init_args.save_dir", str(tmp_path / "part")]
    first = fit([*args, str(stop), *part])
    earlier = {p: file_sha256(p) for p in first.log_dir.rglob("*") if p.is_file()}
    resumed = fit([*args, "6", *part, "--ckpt_path", "last"])
    assert resumed.log_dir != first.log_dir
    assert {p: file_sha256(p) for p in first.log_dir.rglob("*") if p.is_file()} == earlier  # nothing written there
    assert full.summary["best_epoch"] == resumed.summary["best_epoch"] == best_epoch
    assert resumed.best_checkpoint == resumed.log_dir / "checkpoints" / "best.ckpt"
    want, got = (torch.load(r.best_checkpoint, weights_only=True) for r in (full, resumed))
    assert want["epoch"] == got["epoch"] == best_epoch
    assert want["state_dict"].keys() == got["state_dict"].keys()
    assert all(torch.equal(want["state_dict"][k], got["state_dict"][k]) for k in want["state_dict"])
    saved = [torch.load(r.last_checkpoint, weights_only=True)["callbacks"] for r in (full, resumed)]
    scores = [next(v for k, v in c.items() if k.startswith("ModelCheckpoint"))["best_model_score"] for c in saved]
    assert torch.equal(scores[0], scores[1])
    same = ("best_epoch", "epochs_run", "val/loss", "val/ppl", "val/acc", "val/bpb", "test/loss", "test/acc")
    assert {k: resumed.summary[k] for k in same} == {k: full.summary[k] for k in same}  # test/*: the best weights
    # last.ckpt is the stopped run's last epoch, not its best (Lightning 2.6's own writes it only with a new best)
    resumed_after = torch.load(first.last_checkpoint, weights_only=True)["epoch"]
    assert best_epoch < stop - 1 and resumed_after == stop - 1
    assert full.summary["epochs_run"] == 6 and resumed.summary["epochs_this_run"] == 6 - stop
    assert resumed.summary["val/loss"] == pytest.approx(float(scores[0]), abs=0)
    hp = [read_scalars(r.log_dir)["hp_metric"][-1][1] for r in (full, resumed)]
    assert hp[0] == hp[1] == pytest.approx(full.summary["val/bpb"], rel=1e-6)


@pytest.mark.slow
def test_a_resume_whose_best_checkpoint_is_gone_is_one_error_and_leaves_no_folder(tmp_path, corpus):
    from cvfp_lightning import CVFPUserError
    from cvfp_lightning.runs import fit

    args = [*_tiny_run("phase2", tmp_path, corpus), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    first = fit([*args, "--trainer.max_epochs", "2"])
    (first.log_dir / "checkpoints" / "best.ckpt").unlink()
    with pytest.raises(CVFPUserError, match="records .*best.ckpt as a best checkpoint .* but the file is missing"):
        fit([*args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])
    assert sorted(p.name for p in first.log_dir.parent.iterdir()) == [first.log_dir.name]  # no refused run folder


@pytest.mark.slow
def test_a_resumed_phase2_runs_checkpoints_export_evaluate_and_resume(tmp_path, corpus):
    """The Phase 1 digest a resumed run records is that of the weights it carries, not of a fresh block."""
    import json

    from cvfp_lightning.context_cache import weights_digest
    from cvfp_lightning.modules.phase2 import load_phase1

    args = [*_tiny_run("phase2", tmp_path, corpus), "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    runs = tmp_path / "logs" / "phase2"
    run_cli(["fit", *args, "--trainer.max_epochs", "1"])
    run_cli(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    digest = weights_digest(*load_phase1(tmp_path / "p1" / "last.ckpt")[:2])
    for name in ("version_0/checkpoints/best.ckpt", "version_1/checkpoints/best.ckpt",
                 "version_1/checkpoints/last.ckpt"):
        ckpt = torch.load(runs / name, weights_only=True)
        assert ckpt["hyper_parameters"]["phase1"]["weights"] == ckpt["cvfp_phase2"]["phase1_weights"] == digest, name
    best = runs / "version_1" / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True)["epoch"] == 1
    run_cli(["export", "--ckpt_path", str(best), "--out_dir", str(tmp_path / "export")])
    scores = {}
    for name, model in (("ckpt", best), ("export", tmp_path / "export")):
        run_cli(["evaluate", str(model), "--text", str(corpus), "--out", str(tmp_path / f"{name}.json"), *QUIET,
                 "--trainer.accelerator", "cpu"])
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert scores["ckpt"]["loss"] == scores["export"]["loss"] and 0 < scores["ckpt"]["loss"] < 9
    run_cli(["fit", *args, "--trainer.max_epochs", "3", "--ckpt_path", "last"])  # resumes version_1's last.ckpt
    assert torch.load(runs / "version_2" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


@pytest.mark.slow
def test_ckpt_path_best_finds_the_newest_best_checkpoint(tmp_path, corpus, capsys):
    from helpers.lm import phase1_checkpoint

    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", 4096)
    args = ["--config", str(CONFIGS / "phase2.yaml"), "--model.init_args.phase1_checkpoint", str(ckpt),
            "--data.init_args.paths", f"[{corpus}]", "--model.init_args.cache", "off",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    run_cli(["fit", *args, "--trainer.max_epochs", "1"])
    best = next((tmp_path / "logs").rglob("best.ckpt"))
    capsys.readouterr()
    run_cli(["test", *args, "--ckpt_path", "best"])
    captured = capsys.readouterr()
    assert f"cvfp: using {best}" in captured.err
    assert "test/ppl" in captured.out
