"""``--lr_scheduler`` alone: it schedules the module's own optimizer, resumes exactly, and a resume
with another scheduler is refused in one line."""

from __future__ import annotations

import pytest
import torch

from helpers.cli import CONFIGS, cli_error, run_cli

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.callbacks", "[]"]
PHASE1 = ["--config", str(CONFIGS / "phase1.yaml"), "--data.init_args.num_samples", "8",
          "--data.init_args.max_seq_len", "64", "--model.init_args.context.context_dim", "16",
          "--model.init_args.context.num_layers", "1", "--model.init_args.embedding.embed_dim", "16", *QUIET]
STEP = ["--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5"]


def _phase2(tmp_path, corpus) -> list[str]:
    from helpers.lm import phase1_checkpoint

    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", 4096)
    return ["--config", str(CONFIGS / "phase2.yaml"), "--model.init_args.phase1_checkpoint", str(ckpt),
            "--data.init_args.paths", f"[{corpus}]", "--data.init_args.chunk_size", "256",
            "--model.init_args.cache", "off", "--model.init_args.weight_decay", "0.1", *QUIET]


def _last(folder):
    return torch.load(next(folder.rglob("last.ckpt")), weights_only=True)


@pytest.mark.slow
def test_phase2_scheduler_alone_decays_its_own_adamw_every_epoch(tmp_path, corpus):
    run_cli(["fit", *_phase2(tmp_path, corpus), *STEP, "--trainer.max_epochs", "3",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    ckpt = _last(tmp_path / "logs")
    groups = ckpt["optimizer_states"][0]["param_groups"]
    # the module's own AdamW: weight matrices decayed, biases and LayerNorm gains not (a --optimizer would decay all)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3 * 0.5 ** 3)] * 2  # stepped after each of 3 epochs
    (state,) = ckpt["lr_schedulers"]
    assert (state["last_epoch"], state["base_lrs"], state["gamma"]) == (3, [1e-3, 1e-3], 0.5)


@pytest.mark.slow
def test_phase1_scheduler_steps_once_per_iteration_and_resumes_exactly(tmp_path):
    run_cli(["fit", *PHASE1, *STEP, "--trainer.max_epochs", "4", "--trainer.logger.init_args.save_dir",
             str(tmp_path / "full")])
    run_cli(["fit", *PHASE1, *STEP, "--trainer.max_epochs", "2", "--trainer.logger.init_args.save_dir",
             str(tmp_path / "part")])
    run_cli(["fit", *PHASE1, *STEP, "--trainer.max_epochs", "4", "--ckpt_path", "last",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "part")])
    full = _last(tmp_path / "full")
    part = torch.load(next(p for p in (tmp_path / "part").rglob("last.ckpt") if "version_1" in str(p)),
                      weights_only=True)
    assert full["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2e-3 * 0.5 ** 4)
    assert full["lr_schedulers"] == part["lr_schedulers"]
    assert full["lr_schedulers"][0]["last_epoch"] == 4
    assert full["state_dict"].keys() == part["state_dict"].keys()
    for key, value in full["state_dict"].items():
        assert torch.equal(value, part["state_dict"][key]), key


@pytest.mark.slow
def test_a_resume_with_another_or_no_scheduler_is_one_error(tmp_path, capsys):
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    run_cli(["fit", *PHASE1, *STEP, "--trainer.max_epochs", "1", *logs])
    resume = ["fit", *PHASE1, "--trainer.max_epochs", "2", "--ckpt_path", str(next(tmp_path.rglob("last.ckpt"))),
              *logs]
    err = cli_error([*resume, *STEP[:-1], "0.7"], capsys)
    assert "other --lr_scheduler settings" in err and "gamma: checkpoint 0.5 vs config 0.7" in err
    err = cli_error([*resume, "--lr_scheduler", "CosineAnnealingLR", "--lr_scheduler.T_max", "5"], capsys)
    assert "another --lr_scheduler than CosineAnnealingLR" in err
    err = cli_error(resume, capsys)
    assert "trained with an --lr_scheduler and this run has none" in err
    assert len(list(tmp_path.rglob("version_*"))) == 1  # the refused resumes made no run folder

    plain = tmp_path / "plain"
    run_cli(["fit", *PHASE1, "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir", str(plain)])
    err = cli_error(["fit", *PHASE1, *STEP, "--trainer.max_epochs", "2", "--ckpt_path",
                     str(next(plain.rglob("last.ckpt"))), "--trainer.logger.init_args.save_dir", str(plain)], capsys)
    assert "trained without an --lr_scheduler and this run has StepLR" in err


@pytest.mark.slow
def test_phase1_plateau_scheduler_reads_its_monitor_or_names_the_logged_metrics(tmp_path, capsys):
    plateau = ["--lr_scheduler", "ReduceLROnPlateau", "--lr_scheduler.mode", "max", "--lr_scheduler.patience", "0",
               "--lr_scheduler.factor", "0.5"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # after the first iteration: Lightning's INFO lines came before it
        run_cli(["fit", *PHASE1, *plateau, "--lr_scheduler.monitor", "val/nope", "--trainer.max_epochs", "2",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "bad")])
    assert info.value.code == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cvfp:")]
    assert "monitor 'val/nope' is not logged" in err and "'train/convergence_rate'" in err
    # a monitor that never improves (patience 0): the rate halves after every iteration but the first
    run_cli(["fit", *PHASE1, *plateau, "--lr_scheduler.monitor", "train/iteration", "--lr_scheduler.mode", "min",
             "--trainer.max_epochs", "3", "--trainer.logger.init_args.save_dir", str(tmp_path / "ok")])
    ckpt = _last(tmp_path / "ok")
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2e-3 * 0.5 ** 2)
    assert ckpt["lr_schedulers"][0]["num_bad_epochs"] == 0 and ckpt["lr_schedulers"][0]["best"] == 1.0
