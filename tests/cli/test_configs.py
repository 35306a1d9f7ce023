"""Every shipped config parses against the code (litgpt's config-hub test) and the Phase 1
configs run a smoke step, UltraChat's through the real hub-loading code on local folders."""

from __future__ import annotations


import pytest

from helpers.cli import CONFIGS, read_scalars, run_cli

ALL = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def test_there_are_configs():
    assert {"phase1.yaml", "phase1_seed.yaml", "phase1_tokenwise.yaml", "ultrachat_phase1.yaml"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_config_parses(name, capsys):
    command = ["scaling"] if name.startswith("scaling") else ["fit"]
    with pytest.raises(SystemExit) as info:
        run_cli([*command, "--config", str(CONFIGS / name), "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.strip(), "print_config printed nothing"
    if command == ["fit"]:
        assert "class_path" in out and "trainer:" in out


TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("phase1.yaml", ["--data.init_args.num_samples", "8"]),
    ("phase1_tokenwise.yaml", ["--data.init_args.num_samples", "4"]),
    # the seeds' 768 x 6 block: few tokens, as its diagnostics solve a fixed point per distinct id
    ("phase1_seed.yaml", ["--data.init_args.num_tokens", "64", "--data.init_args.val_tokens", "32",
                          "--data.init_args.chunk_size", "64"]),
])
def test_phase1_config_smoke(name, extra, tmp_path):
    run_cli(["fit", "--config", str(CONFIGS / name), *TINY, *extra,
             "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert list(tmp_path.rglob("last.ckpt")), "the smoke run wrote no checkpoint"


@pytest.mark.slow
def test_ultrachat_phase1_config_with_local_gpt2_folders(tmp_path, ultrachat_jsonl):
    """The UltraChat config through AutoTokenizer/AutoModel.from_pretrained on local folders."""
    from transformers import GPT2Config, GPT2Model

    from cvfp_lightning.data import load_tokenizer

    folder = tmp_path / "tiny-gpt2"
    tok = load_tokenizer(None)
    tok.save_pretrained(folder)
    GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                         eos_token_id=0)).save_pretrained(folder)
    run_cli(["fit", "--config", str(CONFIGS / "ultrachat_phase1.yaml"), "--trainer.max_epochs", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
             "--data.init_args.data_files", str(ultrachat_jsonl), "--data.init_args.num_samples", "10",
             "--data.init_args.tokenizer", str(folder), "--model.init_args.embedding.pretrained", str(folder),
             "--model.init_args.context.context_dim", "32", "--model.init_args.context.num_layers", "2",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    scalars = read_scalars(tmp_path / "logs")
    assert 0.0 <= scalars["train/convergence_rate"][-1][1] <= 1.0
    hparams = next((tmp_path / "logs").rglob("hparams.yaml")).read_text()
    assert "embed_dim: 32" in hparams  # the pretrained width was taken from the model


BEFORE = CONFIGS.parent / "tests" / "fixtures" / "configs_before_redesign"  # copies of the configs as they were


@pytest.mark.slow
@pytest.mark.parametrize("name, extra, built", [
    ("phase1.yaml", ["--data.init_args.num_samples", "8"], "Phase1Parallel"),
    ("phase1_tokenwise.yaml", ["--data.init_args.num_samples", "4"], "Phase1Tokenwise"),
    ("topk_fair.yaml", ["--data.init_args.top_k", "3", "--data.init_args.repetitions", "4"], "round_robin"),
    ("topk_sequential.yaml", ["--data.init_args.top_k", "3", "--data.init_args.repetitions", "4"], "sequential"),
])
def test_configs_written_before_the_redesign_still_run(name, extra, built, tmp_path):
    """Phase1FixedPoint (with mode) and TopKCVFPT (schedule from data.schedule) are deprecated aliases."""
    import json

    import yaml

    small = ["--model.init_args.context.context_dim", "16", "--model.init_args.embedding.embed_dim", "16"]
    budget = TINY if name.startswith("phase1") else TINY[:2] + TINY[6:]  # every Top-K token needs its batches
    run_cli(["fit", "--config", str(BEFORE / name), *budget, *extra, *small, "--trainer.accelerator", "cpu",
             "--trainer.logger.init_args.save_dir", str(tmp_path)])
    assert list(tmp_path.rglob("last.ckpt")), "the run wrote no checkpoint"
    if name.startswith("topk"):
        assert json.loads(next(tmp_path.rglob("topk_summary.json")).read_text())["schedule"] == built
    else:
        hparams = yaml.safe_load(next(tmp_path.rglob("hparams.yaml")).read_text())
        assert ("dist_reg_weight" in hparams) == (built == "Phase1Parallel")
        assert ("max_inner_iterations" in hparams) == (built == "Phase1Tokenwise")
