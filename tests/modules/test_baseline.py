"""Baselines: matched sizes, causality, the shipped configs' budgets, a run through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cvfp_lightning import CVFPUserError
from cvfp_lightning.models import CVFPLanguageModel, build_baseline, build_context_updater, build_embedding
from cvfp_lightning.models.baselines import count_trainable, match_hidden_dim
from cvfp_lightning.modules import BaselineLM
from helpers.cli import CONFIGS, read_scalars, run_cli


@pytest.mark.parametrize("arch, layers", [("gru", 1), ("lstm", 2), ("transformer", 2)])
def test_match_params_finds_the_nearest_width(arch, layers):
    target = 300_000
    d = match_hidden_dim(arch, 1000, target, num_layers=layers, num_heads=4, max_len=64)
    step = 4 if arch == "transformer" else 1
    assert d % step == 0

    def count(width):
        return count_trainable(build_baseline(arch, 1000, width, layers, 4, 64))

    assert count(d - step) < target < count(d + step) or count(d) == target
    assert abs(count(d) - target) <= min(abs(count(d - step) - target), abs(count(d + step) - target))


@pytest.mark.parametrize("arch", ["gru", "lstm", "transformer"])
def test_baselines_are_causal_language_models(arch):
    torch.manual_seed(0)
    net = build_baseline(arch, 50, 16, 2, 4, 32)
    ids = torch.randint(0, 50, (2, 10))
    logits = net(ids)
    assert logits.shape == (2, 10, 50)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    torch.testing.assert_close(net(changed)[:, :6], logits[:, :6])  # the future does not leak


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "rnn"}, "model.arch='rnn' is unknown"),
    ({"match_params": 10}, "below the smallest gru baseline"),
    ({"match_params": 0}, "match_params=0 is invalid"),
    ({"arch": "transformer", "hidden_dim": 30, "num_heads": 4}, "not a multiple of model.num_heads"),
    ({"vocab_size": 0}, "vocab_size=0 is invalid"),
    ({"dropout": 1.0}, "dropout=1.0 is invalid"),
    ({"lr": 0}, "lr=0 is invalid"),
    ({"weight_decay": -1.0}, "weight_decay=-1.0 is invalid"),
])
def test_bad_baseline_options(kwargs, message):
    with pytest.raises(CVFPUserError, match=message):
        BaselineLM(**{"vocab_size": 100, **kwargs})


def _init_args(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]


def test_shipped_baselines_match_the_demo_phase2_size():
    """configs/baseline_*.yaml's match_params = trainable parameters of phase1.yaml + phase2.yaml."""
    p1, p2 = _init_args("phase1.yaml"), _init_args("phase2.yaml")
    vocab = 4096  # the bundled tokenizer
    emb = build_embedding(vocab, p1["embedding"], default_dim=p1["context"]["context_dim"])
    upd = build_context_updater(p1["context"], emb.embed_dim)
    lm = CVFPLanguageModel(emb, upd, weight_tying=p2["weight_tying"], train_embedding=not p2["freeze_embedding"])
    for name in ("baseline_gru.yaml", "baseline_transformer.yaml"):
        args = _init_args(name)
        assert args["match_params"] == lm.num_trainable_parameters(), name
        model = BaselineLM(vocab_size=vocab, **args)
        # nearest width (transformer widths step by num_heads): within a few percent
        assert abs(model.num_trainable_parameters() - args["match_params"]) / args["match_params"] < 0.03


@pytest.mark.slow
@pytest.mark.parametrize("name", ["baseline_gru.yaml", "baseline_transformer.yaml"])
def test_baseline_run_through_the_cli(name, tmp_path, corpus):
    run_cli(["fit", "--config", str(CONFIGS / name), "--data.init_args.paths", f"[{corpus}]",
             "--data.init_args.max_seq_len", "128", "--data.init_args.seq_len", "128",
             "--model.init_args.match_params", "150000", "--trainer.max_epochs", "2",
             "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    summary = json.loads(next((tmp_path / "logs").rglob("summary.json")).read_text())
    assert abs(summary["trainable_params"] - 150_000) / 150_000 < 0.05
    for key in ("val/loss", "val/ppl", "val/acc", "val/bpb"):
        assert key in summary and summary[key] == summary[key]  # present, not NaN
    assert summary["val/ppl"] < 4096  # learned something beyond uniform
    assert summary["best_model_path"].endswith("best.ckpt")


@pytest.mark.slow
def test_fit_scores_the_test_split_with_the_best_weights(tmp_path, corpus):
    """With a test split, ``cvfp fit`` ends with a test pass on the best weights: its ``test/*``
    and token count are in ``summary.json`` and equal a later ``cvfp test --ckpt_path best``."""
    from cvfp_lightning.data import TextDataModule

    logs = tmp_path / "logs"
    data = ["--data.init_args.paths", f"[{corpus}]", "--data.init_args.max_seq_len", "64",
            "--data.init_args.seq_len", "64", "--data.init_args.test_fraction", "0.2"]
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    run_cli(["fit", "--config", str(CONFIGS / "baseline_gru.yaml"), *data, *quiet,
             "--model.init_args.match_params", "40000", "--trainer.max_epochs", "2",
             "--trainer.logger.init_args.save_dir", str(logs)])
    run_dir = next(logs.rglob("summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    dm = TextDataModule(paths=[str(corpus)], sequences="samples", max_seq_len=64, test_fraction=0.2)
    dm.setup()
    predicted = int((dm.test_sequences.lengths - 1).clamp_min(0).sum())
    assert summary["test_tokens"] == dm.test_sequences.num_tokens
    assert summary["test/tokens"] == predicted
    run_cli(["test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(run_dir / "checkpoints" / "best.ckpt"),
             *quiet, "--trainer.logger.init_args.save_dir", str(tmp_path / "again")])
    again = read_scalars(tmp_path / "again")
    for name in ("loss", "ppl", "acc", "bpb", "tokens"):
        assert again[f"test/{name}"][-1][1] == pytest.approx(summary[f"test/{name}"], rel=1e-6), name
    assert summary["test/loss"] != summary["val/loss"]  # another split
