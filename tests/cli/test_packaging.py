"""The wheel: bundled data as package data, and the demo config running outside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers.cli import CONFIGS, ROOT


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd[:3]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_demo_config_outside_the_repository(tmp_path):
    # build from a copy of the sources, so no build/ or egg-info lands in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT / "cvfp_lightning", src / "cvfp_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               CVFP_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("CVFP_DATA_DIR", None)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
         tmp_path, env)
    wheel = next((tmp_path / "dist").glob("cvfp_lightning-*.whl"))
    # a fresh venv without pip; pip of this interpreter installs into it, offline; the
    # dependencies (torch, lightning, ...) come from this environment through a .pth line
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    (site / "deps_of_the_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run = tmp_path / "run"  # outside the repository: no configs/, no data/, no sources on the path
    run.mkdir()
    shutil.copy(CONFIGS / "phase1.yaml", run / "phase1.yaml")
    where = _run([str(python), "-c", "import cvfp_lightning.data.tokenizer as t; print(t.__file__); "
                                     "print(t.bundled_data_dir())"], run, env).stdout.split()
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where
    _run([str(venv / "bin" / "cvfp"), "fit", "--config", "phase1.yaml", "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false"], run, env)
    checkpoints = run / "lightning_logs" / "phase1" / "version_0" / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file() and (checkpoints / "context_cache" / "meta.json").is_file()
