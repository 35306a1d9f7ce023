"""``cvfp scaling``: the power-law fit, the result files, resume, bad input, and a two-size run
through Phase 1 -> Phase 2 (and a GRU baseline) end to end."""

from __future__ import annotations

import csv
import json
import math

import pytest

from cvfp_lightning import CVFPUserError
from cvfp_lightning.experiments.scaling_law import (
    ScalingExperiment,
    ScalingSettings,
    build_parser,
    fit_power_law,
    write_results,
)
from helpers.cli import CONFIGS, read_scalars, run_cli
from helpers.scaling import FakeRunner, scaling_settings


# ---- the fit -------------------------------------------------------------------------------------------
def test_fit_recovers_alpha_and_a_from_exact_points():
    tokens = [1e3, 2e3, 5e3, 1e4, 5e4]
    fit = fit_power_law(tokens, [812.0 * t ** -0.41 for t in tokens])
    assert fit.alpha == pytest.approx(-0.41, abs=1e-9)
    assert fit.A == pytest.approx(812.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.points == 5
    assert fit.ppl_reduction_2x == pytest.approx(1 - 2 ** -0.41)  # about 24.7% lower PPL for 2x data
    assert fit.predict(4e3) == pytest.approx(812.0 * 4e3 ** -0.41)


def test_fit_with_noise_matches_least_squares_and_r2():
    tokens = [8457, 10573, 42526, 105679]
    noise = [1.05, 0.96, 1.02, 0.98]
    ppl = [3.1e3 * t ** -0.3 * e for t, e in zip(tokens, noise)]
    fit = fit_power_law(tokens, ppl)
    import numpy as np

    x, y = np.log(tokens), np.log(ppl)
    slope, intercept = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - (slope * x + intercept)) ** 2) / np.sum((y - y.mean()) ** 2)
    assert fit.alpha == pytest.approx(slope, rel=1e-9) and fit.A == pytest.approx(math.exp(intercept), rel=1e-9)
    assert fit.r2 == pytest.approx(r2, rel=1e-9) and 0.9 < fit.r2 < 1.0
    assert fit.alpha == pytest.approx(-0.3, abs=0.03)


@pytest.mark.parametrize("tokens, ppl, message", [
    ([1000], [50.0], "at least 2 points"),
    ([1000, 2000], [50.0, 0.0], "positive finite"),
    ([1000, 2000], [50.0, float("nan")], "positive finite"),
    ([1000, 1000], [50.0, 40.0], "2 different token counts"),
])
def test_fit_refuses_points_it_cannot_fit(tokens, ppl, message):
    with pytest.raises(CVFPUserError, match=message):
        fit_power_law(tokens, ppl)


# ---- result files ------------------------------------------------------------------------------------
def _row(model, samples, tokens, ppl):
    return {"model": model, "samples": samples, "train_tokens": tokens, "val_tokens": 100, "val_ppl": ppl,
            "val_acc": 0.1, "val_loss": math.log(ppl), "effective_rank_pct": 50.0 if model == "cvfp" else None,
            "phase1_iterations": 6 if model == "cvfp" else None, "phase1_s": 1.0, "lm_s": 2.0, "wall_s": 3.0,
            "trainable_params": 1000, "best_epoch": 2}


def test_csv_json_png_and_tensorboard_are_written(tmp_path, capsys):
    rows = []
    for samples, tokens in ((10, 1000), (20, 2000), (40, 4000)):
        rows += [_row("cvfp", samples, tokens, 500 * (tokens / 1000) ** -0.4),
                 _row("gru", samples, tokens, 400 * (tokens / 1000) ** -0.2)]
    settings = scaling_settings(tmp_path, baseline="gru")
    result = write_results(settings, rows, seconds=12.0)
    out = settings.out_dir

    table = list(csv.DictReader((out / "scaling.csv").open()))
    assert [(r["model"], int(r["samples"])) for r in table] == [(r["model"], r["samples"]) for r in rows]
    assert float(table[0]["val_ppl"]) == pytest.approx(500.0) and table[1]["effective_rank_pct"] == ""

    saved = json.loads((out / "scaling.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["fits"]["cvfp"]["alpha"] == pytest.approx(-0.4) and saved["fits"]["gru"]["alpha"] == pytest.approx(-0.2)
    assert saved["fits"]["cvfp"]["A"] == pytest.approx(500 * 1000 ** 0.4)
    assert saved["fits"]["cvfp"]["ppl_reduction_2x"] == pytest.approx(1 - 2 ** -0.4)
    assert saved["settings"]["sizes"] == [10, 20, 40] and saved["settings"]["baseline"] == "gru"

    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = read_scalars(out / "tensorboard")
    assert [step for step, _ in scalars["scaling/cvfp/val_ppl"]] == [1000, 2000, 4000]
    assert scalars["fit/gru/alpha"][0][1] == pytest.approx(-0.2, abs=1e-6)

    printed = capsys.readouterr().out
    assert "| cvfp | 10 | 1000 | 100 | 500 |" in printed
    assert "cvfp: log(PPL) = -0.4000 * log(tokens)" in printed and "2x data -> 24.2% lower PPL" in printed

    write_results(settings, rows)  # written again (a resumed run): one event file, not two
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


# ---- resume with a stand-in for the training runs ---------------------------------------------------------
@pytest.fixture
def no_input_checks(monkeypatch):
    monkeypatch.setattr(ScalingExperiment, "check_inputs", lambda self: None)


def test_resume_skips_finished_runs_and_sizes(tmp_path, no_input_checks):
    settings = scaling_settings(tmp_path)
    first = FakeRunner(fail_on=(40, "phase2"))
    with pytest.raises(KeyboardInterrupt):
        ScalingExperiment(settings, runner=first).run()
    assert [(s, r) for s, r, _ in first.calls] == [(10, "phase1"), (10, "phase2"), (20, "phase1"), (20, "phase2"),
                                                   (40, "phase1"), (40, "phase2")]
    assert not (settings.out_dir / "scaling.csv").exists()

    second = FakeRunner()  # continues with what is missing: Phase 2 of size 40
    result = ScalingExperiment(settings, runner=second).run()
    assert [(s, r) for s, r, _ in second.calls] == [(40, "phase2")]
    phase2_args = second.calls[0][2]
    assert f"--model.init_args.phase1_checkpoint={settings.out_dir}/samples_00040/phase1/checkpoints/last.ckpt" \
        in phase2_args
    assert [r["samples"] for r in result["rows"]] == [10, 20, 40]
    assert result["fits"]["cvfp"]["alpha"] == pytest.approx(-0.35)

    third = FakeRunner()  # everything finished: nothing is trained again, the same results
    again = ScalingExperiment(settings, runner=third).run()
    assert third.calls == [] and again["rows"] == result["rows"]

    # a baseline added later trains only the baseline, sized like Phase 2
    fourth = FakeRunner()
    with_gru = ScalingExperiment(scaling_settings(tmp_path, baseline="gru"), runner=fourth).run()
    assert [(s, r) for s, r, _ in fourth.calls] == [(10, "gru"), (20, "gru"), (40, "gru")]
    args = fourth.calls[0][2]
    assert "--model.init_args.arch=gru" in args and "--model.init_args.match_params=4321" in args
    assert any(a.endswith("baseline_gru.yaml") for a in args)
    assert set(with_gru["fits"]) == {"cvfp", "gru"}


def test_resume_refuses_records_of_other_settings(tmp_path, no_input_checks):
    ScalingExperiment(scaling_settings(tmp_path, sizes=[10, 20]), runner=FakeRunner()).run()
    changed = scaling_settings(tmp_path, sizes=[10, 20], phase1_overrides={"model.init_args.lr": 0.01})
    with pytest.raises(CVFPUserError, match="samples_00010/phase1.json was written with other settings.*"
                                            "use another --out_dir"):
        ScalingExperiment(changed, runner=FakeRunner()).run()


def test_overrides_reach_every_run_as_command_line_arguments(tmp_path, no_input_checks):
    runner = FakeRunner()
    settings = scaling_settings(tmp_path, sizes=[10, 20], overrides={"data.init_args.max_seq_len": 128,
                                                                     "data.init_args.paths": None},
                                phase1_overrides={"trainer.max_epochs": 2},
                                phase2_overrides={"model.init_args.lr": 0.005})
    ScalingExperiment(settings, runner=runner).run()
    p1, p2 = runner.calls[0][2], runner.calls[1][2]
    assert p1[:2] == ["--config", str(CONFIGS / "phase1.yaml")] and p2[:2] == ["--config", str(CONFIGS / "phase2.yaml")]
    for args in (p1, p2):
        assert "--data.init_args.max_seq_len=128" in args and "--data.init_args.paths=null" in args
        assert "--data.init_args.train_samples=10" in args
    assert "--trainer.max_epochs=2" in p1 and "--trainer.max_epochs=2" not in p2
    assert "--model.init_args.lr=0.005" in p2


def test_cli_args_put_class_paths_first_and_keep_strings_as_they_are():
    from cvfp_lightning.experiments.scaling_law import cli_args

    args = cli_args({"data.init_args.data_files": "a.jsonl", "trainer.max_epochs": 3, "data.init_args.paths": None,
                     "data.class_path": "cvfp_lightning.data.UltraChatDataModule", "x.flag": True})
    assert args == ["--data.class_path=cvfp_lightning.data.UltraChatDataModule", "--data.init_args.data_files=a.jsonl",
                    "--trainer.max_epochs=3", "--data.init_args.paths=null", "--x.flag=true"]


def test_baseline_overrides_may_set_the_baseline_size_themselves(tmp_path, no_input_checks):
    runner = FakeRunner()
    settings = scaling_settings(tmp_path, sizes=[10, 20], baseline="transformer",
                                baseline_overrides={"model.init_args.match_params": None})
    ScalingExperiment(settings, runner=runner).run()
    base = [args for _, run, args in runner.calls if run == "transformer"]
    assert len(base) == 2 and any(a.endswith("baseline_transformer.yaml") for a in base[0])
    assert [a for a in base[0] if "match_params" in a] == ["--model.init_args.match_params=null"]


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes, message", [
    ("[10]", "sizes=[10] has fewer than 2 sizes"),
    ("[]", "fewer than 2 sizes"),
    ("[20, 10]", "sizes=[20, 10] is not strictly increasing (20 then 10)"),
    ("[10, 10, 20]", "not strictly increasing (10 then 10)"),
    ("[0, 10]", "expected positive integers"),
    ("[10, 80]", "size 80 is larger than the data (the source has only 71 samples)"),
])
def test_bad_sizes_are_one_clear_error_before_any_training(tmp_path, capsys, sizes, message):
    with pytest.raises(SystemExit) as info:
        run_cli(["scaling", "--config", str(CONFIGS / "scaling.yaml"), "--sizes", sizes,
                 "--out_dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cvfp: error:") and message in err[-1], err[-1]
    assert not list(tmp_path.rglob("samples_*")), "nothing is trained"


def test_missing_phase_config_and_unknown_baseline_are_clear_errors(tmp_path, capsys):
    for extra, message in ((["--phase2_config", str(tmp_path / "nope.yaml")], "nope.yaml"),
                           (["--baseline", "rnn"], "baseline")):
        with pytest.raises(SystemExit) as info:
            run_cli(["scaling", "--config", str(CONFIGS / "scaling.yaml"), "--out_dir", str(tmp_path), *extra])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cvfp: error:") and message in err[0], err
    with pytest.raises(CVFPUserError, match="phase2_config is not set"):
        scaling_settings(tmp_path, phase2_config=None)


def test_shipped_configs_resolve_their_phase_configs(tmp_path):
    parser = build_parser()
    for name in ("scaling.yaml", "scaling_ultrachat.yaml"):
        settings = ScalingSettings.from_namespace(parser.parse_args(["--config", str(CONFIGS / name)]))
        assert settings.phase1_config.is_file() and settings.phase2_config.is_file()
        assert settings.overrides.get("trainer.devices") == 1  # one process per run
    ultrachat = ScalingSettings.from_namespace(parser.parse_args(["--config", str(CONFIGS / "scaling_ultrachat.yaml")]))
    assert ultrachat.sizes == [50, 100, 200, 500]  # the seeds' sizes
    shipped = ScalingSettings.from_namespace(parser.parse_args(["--config", str(CONFIGS / "scaling.yaml"),
                                                                "--out_dir", str(tmp_path)]))
    assert len(shipped.sizes) == 4 and shipped.out_dir == tmp_path
    ScalingExperiment(shipped).check_inputs()  # every config parses with its overrides; the sizes fit the data


# ---- end to end --------------------------------------------------------------------------------------------
TINY = {"trainer.enable_progress_bar": False, "trainer.enable_model_summary": False, "trainer.devices": 1,
        "data.init_args.max_seq_len": 128}


@pytest.mark.slow
def test_two_sizes_end_to_end_with_a_gru_baseline_then_resume(tmp_path, capsys):
    out = tmp_path / "scaling"
    args = ["scaling", "--config", str(CONFIGS / "scaling.yaml"), "--sizes", "[6, 12]", "--out_dir", str(out),
            "--baseline", "gru", "--overrides", json.dumps(TINY),
            "--phase1_overrides", json.dumps({"trainer.max_epochs": 1, "model.init_args.context.context_dim": 16,
                                              "model.init_args.context.num_layers": 2,
                                              "model.init_args.embedding.embed_dim": 16}),
            "--phase2_overrides", json.dumps({"trainer.max_epochs": 2, "model.init_args.lr": 0.01}),
            "--baseline_overrides", json.dumps({"trainer.max_epochs": 1})]
    run_cli(args)
    saved = json.loads((out / "scaling.json").read_text())
    rows = saved["rows"]
    assert [(r["model"], r["samples"]) for r in rows] == [("cvfp", 6), ("gru", 6), ("cvfp", 12), ("gru", 12)]
    cvfp = [r for r in rows if r["model"] == "cvfp"]
    assert cvfp[0]["train_tokens"] < cvfp[1]["train_tokens"]
    for r in rows:
        assert r["val_ppl"] > 1 and 0 <= r["val_acc"] <= 1 and r["wall_s"] > 0
    for r in cvfp:
        assert r["phase1_iterations"] == 1 and 0 < r["effective_rank_pct"] <= 100
    gru = [r for r in rows if r["model"] == "gru"]
    assert [g["train_tokens"] for g in gru] == [c["train_tokens"] for c in cvfp]  # the same data
    assert set(saved["fits"]) == {"cvfp", "gru"} and saved["fits"]["cvfp"]["r2"] == pytest.approx(1.0)
    for name in ("scaling.csv", "scaling.png"):
        assert (out / name).stat().st_size > 0
    assert read_scalars(out / "tensorboard")["scaling/cvfp/val_ppl"]

    # the hand-off: Phase 2 read the cache Phase 1 wrote, at every size
    for size in (6, 12):
        record = json.loads((out / f"samples_{size:05d}" / "phase2.json").read_text())
        assert record["metrics"]["contexts"].startswith("context cache hit"), record["metrics"]["contexts"]
        assert (out / f"samples_{size:05d}" / "phase1" / "checkpoints" / "context_cache" / "meta.json").is_file()
    capsys.readouterr()

    records = {p: p.stat().st_mtime_ns for p in out.glob("samples_*/*.json")}
    assert len(records) == 6
    run_cli(args)  # resumed: every run is finished, nothing is trained again
    err = capsys.readouterr().err
    assert err.count("already done") == 6 and "cache hit" not in err
    assert {p: p.stat().st_mtime_ns for p in out.glob("samples_*/*.json")} == records
    assert json.loads((out / "scaling.json").read_text())["rows"] == rows
