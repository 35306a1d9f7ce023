"""What a user sees while things run: progress lines (cvfp_lightning.progress) and the package's log lines."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from cvfp_lightning import progress
from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.models.context import ContextConfig, build_context_updater
from cvfp_lightning.models.embedding import build_embedding
from cvfp_lightning.runtime import configure_logging
from cvfp_lightning.sequential_pass import sequential_pass
from helpers.cli import CONFIGS, ROOT, run_cli

LINE = re.compile(r"^sequential pass: ([\d,]+)/([\d,]+) tokens \((\d+)%\)")


@pytest.fixture
def shown():
    """Progress switched on for the test (pytest's captured stderr is not a terminal: plain lines)."""
    with progress.switched(True):
        yield


def _tiny_pass_inputs():
    torch.manual_seed(0)
    upd = build_context_updater(ContextConfig(context_dim=8, num_layers=2), 8)
    emb = build_embedding(40, {"embed_dim": 8}, 8)
    gen = torch.Generator().manual_seed(1)
    lists = [torch.randint(0, 40, (int(n),), generator=gen).tolist() for n in (700, 300, 50, 9, 1)]
    return upd, emb, TokenSequences.from_lists(lists)


def test_a_sequential_pass_prints_its_progress_as_lines_when_stderr_is_not_a_terminal(shown, capsys):
    upd, emb, seqs = _tiny_pass_inputs()
    rng = torch.get_rng_state()
    with_lines = sequential_pass(upd, emb, seqs, batch_size=2)
    err = capsys.readouterr().err.splitlines()
    found = [LINE.match(line) for line in err if LINE.match(line)]
    done = [int(m.group(1).replace(",", "")) for m in found]
    assert int(found[0].group(2).replace(",", "")) == seqs.num_tokens == 1060
    assert done[0] == 0 and done[-1] == 1060 and done == sorted(done)  # from the start to the end, in order
    assert 3 <= len(found) <= 12  # the start, about every 10%, the end: not one line per block
    assert "tokens/s" in err[-1] and "elapsed" in err[-1]
    assert "ETA" in next(line for line in err if LINE.match(line) and 0 < int(LINE.match(line).group(3)) < 100)
    # no random numbers drawn, the same contexts as without progress
    assert torch.equal(torch.get_rng_state(), rng)
    with progress.switched(False):
        quiet = sequential_pass(upd, emb, seqs, batch_size=2)
    assert capsys.readouterr().err == ""
    assert torch.equal(with_lines, quiet)


def test_progress_shows_only_on_rank_zero(shown, capsys, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with progress.task("work", total=10, unit="items") as bar:
        bar.advance(10)
    assert capsys.readouterr().err == ""


def test_plain_lines_every_tenth_and_one_per_step_without_a_live_bar(shown, capsys):
    with progress.task("loop", total=200, unit="items") as bar:
        for _ in range(200):
            bar.advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "loop: 0/200 items (0%), elapsed 0:00:00"
    assert [int(re.search(r"\((\d+)%\)", line).group(1)) for line in lines][:11] == list(range(0, 101, 10))
    assert lines[-1].startswith("loop: 200/200 items (100%), ") and "ETA" not in lines[-1]

    with progress.task("runs", total=3, unit="runs", live=False) as bar:
        for k in range(3):
            bar.advance(1, description=f"runs: run {k + 1} done")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["runs: 0/3 runs (0%)", "runs: run 1 done: 1/3 runs (33%)",
                                                      "runs: run 2 done: 2/3 runs (67%)",
                                                      "runs: run 3 done: 3/3 runs (100%)"]
    assert "ETA" in lines[1]  # from the mean time per step so far


def test_log_level_warning_and_no_progress_bar_make_a_run_quiet(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    try:
        with progress.switched(True):
            run_cli(["fit", "--log_level", "WARNING", "--config", str(CONFIGS / "phase1.yaml"),
                     "--data.init_args.num_samples", "8", "--data.init_args.max_seq_len", "64",
                     "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "1",
                     "--model.init_args.embedding.embed_dim", "16", "--trainer.max_epochs", "1",
                     "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
            assert progress.is_enabled()  # the run's switch is restored after it
    finally:
        configure_logging()
    err = capsys.readouterr().err
    assert "sequential pass:" not in err and "tokens/s" not in err
    info = [r for r in caplog.records if r.levelno < logging.WARNING and r.name.startswith(("cvfp_lightning", "lightning"))]
    assert info == []  # neither the package's lines (sequential pass, tokenising) nor Lightning's (GPU available)


@pytest.fixture
def bare_root(monkeypatch):
    """Logging restored after the test; the test calls ``monkeypatch.setattr(root, "handlers", [])`` itself
    (pytest adds its capture handlers to the root logger after the fixtures ran)."""
    package = logging.getLogger("cvfp_lightning")
    saved = (package.level, list(package.handlers), logging.getLogger("lightning.pytorch").level)
    yield
    package.setLevel(saved[0])
    package.handlers[:] = saved[1]
    logging.getLogger("lightning.pytorch").setLevel(saved[2])


def test_configure_logging_prints_the_package_info_lines_once_on_rank_zero(bare_root, capsys, monkeypatch):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a plain `cvfp` process
    log = logging.getLogger("cvfp_lightning.modules.phase1.parallel")
    configure_logging()
    configure_logging("info")  # again: the handler is replaced, not added twice
    log.info("sequential pass over %d tokens in %.2fs", 9745, 0.08)
    log.warning("token cache stale")
    assert capsys.readouterr().err.splitlines() == ["cvfp: sequential pass over 9745 tokens in 0.08s",
                                                    "cvfp: warning: token cache stale"]
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    log.warning("on rank 1")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    configure_logging("WARNING")
    log.info("quiet")
    assert capsys.readouterr().err == ""
    assert logging.getLogger("lightning.pytorch").level == logging.WARNING  # Lightning's lines too
    monkeypatch.setenv("CVFP_LOG_LEVEL", "ERROR")
    assert configure_logging() == logging.ERROR
    with pytest.raises(ValueError, match="log level 'loud' is unknown: expected one of DEBUG, INFO"):
        configure_logging("loud")


def test_cli_strips_log_level_and_refuses_an_unknown_one(capsys):
    from cvfp_lightning.cli import take_option

    argv = ["fit", "--log_level", "WARNING", "--config", "a.yaml", "--log_level=ERROR"]
    assert take_option(argv, "--log_level") == "ERROR" and argv == ["fit", "--config", "a.yaml"]
    with pytest.raises(SystemExit) as info:
        run_cli(["--log_level", "LOUD", "--help"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == ("cvfp: error: --log_level: log level 'LOUD' is unknown: expected one "
                                               "of DEBUG, INFO, WARNING, ERROR, CRITICAL.")
    configure_logging()


def _cvfp(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """A tiny Phase 1 fit in a fresh `cvfp` process, stderr a pipe."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CVFP_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("CVFP_LOG_LEVEL", None)
    env.pop("CVFP_PROGRESS", None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = ["fit", "--config", str(CONFIGS / "phase1.yaml"), "--data.init_args.num_samples", "8",
            "--data.init_args.max_seq_len", "64", "--model.init_args.context.context_dim", "16",
            "--model.init_args.context.num_layers", "1", "--model.init_args.embedding.embed_dim", "16",
            "--trainer.max_epochs", "1", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *extra]
    done = subprocess.run([sys.executable, "-m", "cvfp_lightning", *args], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_cvfp_shows_progress_and_info_lines_on_stderr(tmp_path):
    err = _cvfp(tmp_path).stderr
    lines = err.splitlines()
    assert any(re.match(r"iteration 0: sequential pass: 0/[\d,]+ tokens \(0%\)", line) for line in lines)
    assert any(re.match(r"iteration 0: sequential pass: ([\d,]+)/\1 tokens \(100%\), [\d,.]+ tokens/s", line)
               for line in lines)
    assert any(re.match(r"cvfp: sequential pass over \d+ tokens in [\d.]+s$", line) for line in lines)  # log.info
    assert any(line.startswith("cvfp: tokenising 8 samples") for line in lines)
    assert sum(line.startswith("cvfp: sequential pass over") for line in lines) == 1  # no duplicate handler
    assert any(line.startswith("context cache: sequential pass: ") for line in lines)  # the hand-off

