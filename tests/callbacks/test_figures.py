"""What TensorBoard shows: the figures, a real ``hp_metric`` and the data settings among the hyperparameters,
read back from the event files; the residual histogram; the overall progress of ``cvfp scaling``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvfp_lightning import progress
from cvfp_lightning.metrics import ConvergenceRate, ResidualHistogram
from helpers.cli import CONFIGS, read_scalars, run_cli

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def read_events(log_dir: Path) -> dict:
    """Image tags with their steps, the ``hp_metric`` scalars and the logged hyperparameters of one run
    (every event file of its folder: a fit with a test split writes its test pass into a second one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert list(Path(log_dir).rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    images = {tag: [(e.step, e.width, e.height) for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    hp_metric = [(e.step, e.value) for e in acc.Scalars("hp_metric")] if "hp_metric" in acc.Tags()["scalars"] else []
    hparams = {}
    for content in acc.PluginTagToContent("hparams").values():  # the first record of each tag: what TB shows
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for name, value in data.session_start_info.hparams.items():
                hparams[name] = value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
    return {"images": images, "hp_metric": hp_metric, "hparams": hparams}


def _run(tmp_path: Path, config: str, *extra: str) -> Path:
    with progress.switched(False):
        run_cli(["fit", "--config", str(CONFIGS / config), *QUIET,
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), *extra])
    [version] = list((tmp_path / "logs").glob("*/version_0"))
    return version


@pytest.mark.slow
@pytest.mark.parametrize("config", ["phase1.yaml", "phase1_tokenwise.yaml"])
def test_phase1_shows_its_spectrum_and_residuals_and_its_convergence_as_hp_metric(tmp_path, config):
    small = ["--data.init_args.num_samples", "8", "--data.init_args.max_seq_len", "64",
             "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "1",
             "--model.init_args.embedding.embed_dim", "16", "--trainer.max_epochs", "2"]
    if config == "phase1_tokenwise.yaml":
        small += ["--model.init_args.context.hidden_dim", "16", "--model.init_args.max_inner_iterations", "5",
                  "--trainer.callbacks", "[]"]
    else:  # the spectrum's monitor only (no diagnostics, no cache hand-off)
        small += ["--trainer.callbacks", json.dumps([{"class_path": "cvfp_lightning.callbacks.EffectiveRankMonitor"}])]
    run = _run(tmp_path, config, *small)
    seen = read_events(run)
    figures = ["figures/residuals_train", "figures/residuals_val"]
    if config == "phase1.yaml":
        figures += ["figures/spectrum_train", "figures/spectrum_val"]  # EffectiveRankMonitor is in this config
    for tag in figures:
        assert [step for step, _, _ in seen["images"].get(tag, [])] == [0, 1], (tag, sorted(seen["images"]))
        assert all(w == 640 and h == 400 for _, w, h in seen["images"][tag])
    rates = read_scalars(run)["train/convergence_rate"]
    (first_step, first), (last_step, last) = seen["hp_metric"][0], seen["hp_metric"][-1]
    assert first == -1.0  # Lightning's placeholder when fit starts ...
    assert last == pytest.approx(rates[-1][1]) and last_step > first_step  # ... then the final convergence rate
    hp = seen["hparams"]
    assert hp["data/class"] == "TextDataModule" and hp["data/max_seq_len"] == 64 and hp["data/num_samples"] == 8
    assert hp["context/context_dim"] == 16  # the model's own, as before
    ckpt = torch.load(next(run.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["data"]["max_seq_len"] == 64


@pytest.mark.slow
def test_a_baseline_shows_its_validation_curve_and_best_bpb_as_hp_metric(tmp_path, corpus):
    run = _run(tmp_path, "baseline_gru.yaml", "--data.init_args.paths", f"[{corpus}]",
               "--data.init_args.max_seq_len", "128", "--data.init_args.seq_len", "128",
               "--model.init_args.match_params", "30000", "--trainer.max_epochs", "2")
    seen = read_events(run)
    assert [step for step, _, _ in seen["images"]["figures/val_curve"]] == [0, 1]  # redrawn every epoch
    bpb = [value for _, value in read_scalars(run)["val/bpb"]]
    summary = json.loads((run / "summary.json").read_text())
    assert seen["hp_metric"][-1][1] == pytest.approx(min(bpb)) == pytest.approx(summary["val/bpb"])
    assert 0 < seen["hp_metric"][-1][1] < 20
    assert seen["hparams"]["data/seq_len"] == 128 and seen["hparams"]["data/class"] == "TextDataModule"


@pytest.mark.slow
def test_topk_shows_initial_and_final_losses_per_token(tmp_path):
    run = _run(tmp_path, "topk_fair.yaml", "--data.init_args.top_k", "4", "--data.init_args.repetitions", "8",
               "--model.init_args.context.context_dim", "16", "--model.init_args.context.hidden_dim", "16",
               "--model.init_args.embedding.embed_dim", "16", "--trainer.max_epochs", "2")
    seen = read_events(run)
    assert len(seen["images"]["figures/topk_losses"]) == 1
    summary = json.loads((run / "topk_summary.json").read_text())
    assert seen["hp_metric"][-1][1] == pytest.approx(summary["convergence_rate"])


def test_the_residual_histogram_holds_the_convergence_rate_in_o_bins_memory():
    gen = torch.Generator().manual_seed(0)
    residuals = 10.0 ** (torch.rand(5000, generator=gen) * 8 - 6)  # 1e-6 .. 1e2
    residuals = residuals[(residuals / 0.03 - 1).abs() > 1e-3]  # none within rounding of the threshold
    hist, rate = ResidualHistogram(0.03), ConvergenceRate(0.03)
    for part in residuals.split(777):
        hist.update(part)
        rate.update(part)
    hist.update(torch.tensor([0.0, float("nan"), float("inf"), 1e-30, 1e30]))
    counts, edges = hist.compute(), hist.edges
    assert counts.shape == (110,) and edges.shape == (111,)  # 11 decades x 10 bins, whatever the count
    assert counts.sum() == residuals.numel() + 5
    below = 8 * 10  # decades below the threshold x bins per decade
    assert float(edges[below]) == pytest.approx(0.03, rel=1e-12)  # the threshold is a bin edge
    assert counts[:below].sum() - 2 == pytest.approx(float(rate.compute()) * residuals.numel())  # 0 and 1e-30 too
    assert counts[0] >= 2 and counts[-1] >= 3  # out of range (and NaN) in the end bins
    # a sum of per-rank counts (the DDP reduction) equals the counts of all residuals at once
    a, b, both = ResidualHistogram(0.03), ResidualHistogram(0.03), ResidualHistogram(0.03)
    a.update(residuals[:1000]), b.update(residuals[1000:]), both.update(residuals)
    assert torch.equal(a.compute() + b.compute(), both.compute())


def test_scaling_shows_its_runs_done_and_keeps_resume_records_independent_of_display(tmp_path, capsys, monkeypatch):
    from cvfp_lightning.experiments.scaling_law import ScalingExperiment
    from helpers.scaling import FakeRunner, scaling_settings

    monkeypatch.setattr(ScalingExperiment, "check_inputs", lambda self: None)
    first = FakeRunner()
    ScalingExperiment(scaling_settings(tmp_path, sizes=[10, 20]), runner=first).run()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cvfp scaling")]
    bar = [line for line in err if " runs (" in line]
    assert bar[0].startswith("cvfp scaling: 0/4 runs (0%)")
    assert bar[1].startswith("cvfp scaling: samples 10 phase1 done: 1/4 runs (25%)") and "ETA" in bar[1]
    assert bar[-1].startswith("cvfp scaling: samples 20 phase2 done: 4/4 runs (100%)")
    assert all("--trainer.enable_progress_bar=false" not in args for _, _, args in first.calls)  # per-run bars kept

    quiet = FakeRunner()  # the display changed: the records still stand, nothing reruns, nothing shows
    settings = scaling_settings(tmp_path, sizes=[10, 20, 40], progress=False,
                                overrides={"trainer.enable_model_summary": False})
    ScalingExperiment(settings, runner=quiet).run()
    assert [(size, run) for size, run, _ in quiet.calls] == [(40, "phase1"), (40, "phase2")]
    assert all("--trainer.enable_progress_bar=false" in args for _, _, args in quiet.calls)
    assert " runs (" not in capsys.readouterr().err
