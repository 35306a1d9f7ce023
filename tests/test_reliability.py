"""Reliability: numerical faults stop cleanly, the last good checkpoint survives, writes are atomic."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, run_cli
from cvfp_lightning.callbacks import NonFiniteGuard, TrainingDiverged
from cvfp_lightning.io import atomic_torch_save, atomic_write_text, safe_torch_load
from cvfp_lightning.errors import CVFPUserError

SMALL = ["--data.init_args.num_samples", "8", "--data.init_args.max_seq_len", "64",
         "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "1",
         "--model.init_args.embedding.embed_dim", "16", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.callbacks", "[]"]


@pytest.mark.slow
def test_nan_loss_stops_naming_epoch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import cvfp_lightning.modules.phase1 as phase1

    real_mse = phase1.per_dim_mse
    real_start = phase1.Phase1FixedPoint.on_train_epoch_start
    poison = {"on": False}

    def start(self):
        poison["on"] = self.current_epoch == 2
        real_start(self)

    monkeypatch.setattr(phase1.Phase1FixedPoint, "on_train_epoch_start", start)
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


def test_untrusted_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CVFPUserError, match="not a readable"):
        safe_torch_load(path)
