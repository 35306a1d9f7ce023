"""Phase 1 end to end through the real CLI: early stop, scalars, resume, bf16, tokenwise (DDP: cli/test_ddp.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cvfp_lightning.modules import Phase1FixedPoint
from helpers.cli import CONFIGS, read_scalars, run_cli

pytestmark = pytest.mark.slow

SMALL = ["--data.init_args.num_samples", "12", "--data.init_args.max_seq_len", "96",
         "--model.init_args.context.context_dim", "32", "--model.init_args.context.num_layers", "2",
         "--model.init_args.embedding.embed_dim", "32", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


def phase1(tmp_path: Path, *extra: str, config: str = "phase1.yaml") -> Path:
    run_cli(["fit", "--config", str(CONFIGS / config), *SMALL,
             "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *extra])
    return tmp_path / "logs"


def last_ckpt(logs: Path, version: int | None = None) -> Path:
    found = sorted(logs.rglob("last.ckpt"))
    if version is not None:
        found = [p for p in found if f"version_{version}" in str(p)]
    assert found, f"no last.ckpt under {logs}"
    return found[-1]


def test_fit_reaches_early_stop_and_logs_the_named_scalars(tmp_path):
    logs = phase1(tmp_path, "--trainer.max_epochs", "40", "--model.init_args.noise_std", "0.02")
    scalars = read_scalars(logs)
    for tag in ["train/loss", "train/cvfp_loss", "train/diversity_loss", "train/convergence_rate",
                "val/convergence_rate", "train/effective_rank_pct", "val/effective_rank_pct",
                "train/effective_rank", "time/iteration0_s", "diag/contraction_mean", "diag/attractor_distance"]:
        assert tag in scalars, f"{tag} missing from {sorted(scalars)}"
    rates = [v for _, v in scalars["train/convergence_rate"]]
    assert rates[-1] >= 0.95, rates
    assert 5 <= len(rates) < 40  # stopped early, not before min_iterations
    assert all(r < 0.95 for r in rates[:-1] if len(rates) > 5)
    er = scalars["train/effective_rank_pct"][-1][1]
    assert 1.0 < er <= 100.0
    # the global diversity loss is -||X - mean||_F / N of the contexts: negative, bounded by -RMS spread
    assert scalars["train/diversity_loss"][-1][1] < 0
    # the fixed-point term is the MSE between each position's new and previous context: never 0 with noise
    # (it read 0 when the store handed out a view that the new contexts overwrote)
    cvfp = [v for _, v in scalars["train/cvfp_loss"]]
    div = [v for _, v in scalars["train/diversity_loss"]]
    total = [v for _, v in scalars["train/loss"]]
    assert len(cvfp) == len(div) == len(total) == len(rates) and all(c > 0 for c in cvfp), cvfp
    assert total == pytest.approx([0.2 * c + 0.8 * d for c, d in zip(cvfp, div)], rel=1e-5, abs=1e-7)
    assert_monitor_reads_this_epochs_spectrum(scalars, dim=32)


def assert_monitor_reads_this_epochs_spectrum(scalars: dict, dim: int) -> None:
    """EffectiveRankMonitor's ``{split}/effective_rank`` is the module's ``effective_rank_pct`` of
    the same epoch (one spectrum), at every epoch: not the previous epoch's."""
    for split in ("train", "val"):
        absolute = [v for _, v in scalars[f"{split}/effective_rank"]]
        percent = [v for _, v in scalars[f"{split}/effective_rank_pct"]]
        assert len(absolute) == len(percent) >= 2, split
        assert [100 * v / dim for v in absolute] == pytest.approx(percent, rel=1e-5), split


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("mode_args", [[], ["--config", str(CONFIGS / "phase1_tokenwise.yaml")]],
                         ids=["parallel", "tokenwise"])
def test_stop_and_resume_gives_the_uninterrupted_weights(tmp_path, mode_args):
    config = "phase1_tokenwise.yaml" if mode_args else "phase1.yaml"
    stop = ["--trainer.callbacks", "[]"]  # no early stop: compare a fixed number of iterations
    if mode_args:  # a narrower block and fewer inner steps per chunk: the same resume, in a fraction of the time
        stop += ["--model.init_args.context.hidden_dim", "32", "--model.init_args.max_inner_iterations", "20"]
    full = phase1(tmp_path / "a", "--trainer.max_epochs", "4", *stop, config=config)
    part = phase1(tmp_path / "b", "--trainer.max_epochs", "2", *stop, config=config)
    phase1(tmp_path / "b", "--trainer.max_epochs", "4", *stop, "--ckpt_path", "last", config=config)
    a, b = _state(last_ckpt(full)), _state(last_ckpt(part, version=1))
    assert a["epoch"] == b["epoch"] == 3
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    if not mode_args:  # the carried contexts, in the run folders' files the checkpoints name by digest
        sa, sb = a["cvfp_phase1_state"]["stores"], b["cvfp_phase1_state"]["stores"]
        assert set(sa) == set(sb) == {"train", "val"}
        for split in sa:
            assert sa[split]["sha256"] == sb[split]["sha256"], split
            assert Path(sa[split]["files"][0]).read_bytes() == Path(sb[split]["files"][0]).read_bytes()


def test_resume_with_a_changed_shape_is_refused(tmp_path, capsys):
    logs = phase1(tmp_path, "--trainer.max_epochs", "1")
    with pytest.raises(SystemExit) as info:
        phase1(tmp_path, "--trainer.max_epochs", "2", "--model.init_args.context.context_dim", "48",
               "--ckpt_path", str(last_ckpt(logs)))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "context.context_dim: checkpoint 32 vs config 48" in err


def test_resume_with_another_vocabulary_is_one_line(tmp_path, capsys):
    """A tokenizer of another size changes the embedding's shape: refused before Lightning's
    multi-line load error, with the weights named."""
    logs = phase1(tmp_path, "--trainer.max_epochs", "1", "--data.init_args.tokenizer", "{train: {vocab_size: 300}}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        phase1(tmp_path, "--trainer.max_epochs", "2", "--data.init_args.tokenizer", "{train: {vocab_size: 400}}",
               "--ckpt_path", str(last_ckpt(logs)))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert err[0].startswith("cvfp: error: the checkpoint does not fit this Phase1Parallel (embedding.embed.weight: "
                             "checkpoint (300, 32) vs model (400, 32)")


def test_bf16_mixed_precision_completes(tmp_path):
    scalars = read_scalars(phase1(tmp_path, "--trainer.max_epochs", "2", "--trainer.precision", "bf16-mixed",
                                  "--trainer.callbacks", "[]"))
    rates = [v for _, v in scalars["train/convergence_rate"]]
    assert len(rates) == 2 and all(0.0 <= r <= 1.0 for r in rates)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in scalars["train/loss"])


def test_tokenwise_mode_logs_iterations_and_converges(tmp_path):
    monitor = ["--trainer.callbacks", '[{"class_path": "cvfp_lightning.callbacks.EffectiveRankMonitor"}]']
    scalars = read_scalars(phase1(tmp_path, "--trainer.max_epochs", "2", *monitor, config="phase1_tokenwise.yaml"))
    assert_monitor_reads_this_epochs_spectrum(scalars, dim=32)
    iters = [v for _, v in scalars["train/mean_iterations"]]
    assert all(1.0 <= v <= 200.0 for v in iters)
    assert scalars["val/convergence_rate"][-1][1] >= 0.95
    assert "val/mean_iterations" in scalars


def test_checkpoint_carries_state_and_loads_for_inference(tmp_path):
    logs = phase1(tmp_path, "--trainer.max_epochs", "2", "--trainer.callbacks", "[]")
    ckpt = last_ckpt(logs)
    state = _state(ckpt)["cvfp_phase1_state"]
    model = Phase1FixedPoint.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.state_dict().keys() == _state(ckpt)["state_dict"].keys()
    # the carried contexts are files of the run folder, named in the checkpoint with their digest
    from cvfp_lightning.io import file_sha256

    for split in ("train", "val"):
        record = state["stores"][split]
        assert record["world_size"] == 1 and record["dtype"] == "float32"
        path = Path(record["files"][0])
        assert path.is_file() and file_sha256(path) == record["sha256"][0]
        rows = torch.from_file(str(path), size=path.stat().st_size // 4, dtype=torch.float32).reshape(-1, 32)
        assert rows.shape[0] == record["rows"][0] and torch.isfinite(rows).all() and rows.abs().sum() > 0
    assert isinstance(state["noise_seed"], int)
    assert sum(p.stat().st_size for p in Path(ckpt).parent.iterdir()) < 2_000_000  # O(model), not O(N D)


@pytest.mark.parametrize("sequences", ["stream", "samples"])
def test_iteration0_passes_train_and_validation_together(sequences):
    """One sequential pass over train + validation gives each split its own pass's contexts."""
    import lightning as L

    from cvfp_lightning.data import SyntheticTokensDataModule
    from cvfp_lightning.sequential_pass import sequential_pass

    L.seed_everything(0, verbose=False)
    dm = SyntheticTokensDataModule(vocab_size=50, num_tokens=300, val_tokens=70, seed=1, sequences=sequences,
                                   max_seq_len=40 if sequences == "samples" else None)
    model = Phase1FixedPoint(vocab_size=50, context={"context_dim": 16, "num_layers": 2},
                             embedding={"embed_dim": 16})
    seen = {}

    class Capture(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.update({k: pl_module.contexts(k).clone() for k in ("train", "val")})

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Capture()])
    trainer.fit(model, dm)
    assert model._iteration0_tokens == 300 + 70
    # iteration 0 ran with the initial weights: rebuild them from the same seed
    L.seed_everything(0, verbose=False)
    fresh = Phase1FixedPoint(vocab_size=50, context={"context_dim": 16, "num_layers": 2}, embedding={"embed_dim": 16})
    for split in ("train", "val"):
        seqs = getattr(dm, f"{split}_sequences")
        want = sequential_pass(fresh.updater, fresh.embedding, seqs)
        assert seen[split].shape == want.shape
        torch.testing.assert_close(seen[split], want)
