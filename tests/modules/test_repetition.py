"""Repetition CVFP training: cyclic loss numbers, cycle lengths from the tokenizer, stages,
bad input, and the shipped config end to end through the CLI."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from cvfp_lightning.data import RepeatedPhraseDataModule
from cvfp_lightning.data.repetition import collate_repeated
from cvfp_lightning.data.tokenizer import load_tokenizer
from cvfp_lightning.errors import CVFPUserError
from cvfp_lightning.modules import RepetitionCVFPT
from cvfp_lightning.modules.repetition import cycle_end_contexts, cycle_stats
from helpers.cli import CONFIGS, cli_error, read_scalars, run_cli

TINY = {"updater": "simple", "context_dim": 8, "hidden_dim": 8, "num_layers": 1, "init_std": 0.02, "bias_std": 0.0}


# ---- the loss and the metrics, by hand ------------------------------------------------------
def test_cycle_stats_of_hand_built_sequences_with_mixed_cycle_lengths():
    a, b = torch.zeros(4), torch.full((4,), 2.0)
    # row 0: a b a b a b (period 2), row 1: a a a b (period 1 broken once, then one pad)
    row0 = torch.stack([a, b, a, b, a, b])
    row1 = torch.stack([a, a, a, b, a, a])
    contexts = torch.stack([row0, row1])  # (2, 6, 4)
    mask = torch.tensor([[True] * 6, [True, True, True, True, False, False]])

    periodic = cycle_stats(contexts[:1], torch.tensor([2]), mask[:1])
    assert periodic.conv_loss.item() == 0.0 and periodic.conv_metric.item() == 0.0
    assert periodic.pairs == 4 and periodic.steps == 5
    assert periodic.change.item() == pytest.approx(4.0)  # ||a - b|| = sqrt(4 * 2^2)

    # the same periodic row measured with the wrong L = 1: every step is a-vs-b, MSE 4
    assert cycle_stats(contexts[:1], torch.tensor([1]), mask[:1]).conv_loss.item() == pytest.approx(4.0)

    # mixed L in one batch: 4 pairs of MSE 0 (row 0, L=2) and 3 pairs (row 1, L=1: a-a, a-a, a-b)
    mixed = cycle_stats(contexts, torch.tensor([2, 1]), mask)
    assert mixed.pairs == 7
    assert mixed.conv_loss.item() == pytest.approx(4.0 / 7)  # one pair of MSE 4 among 7
    assert mixed.conv_metric.item() == pytest.approx(4.0 / 7)  # one pair at L2 distance 4
    assert mixed.steps == 5 + 3
    assert mixed.change.item() == pytest.approx((5 * 4.0 + 4.0) / 8)


def test_cycle_end_contexts_compare_the_same_phase():
    T, D = 7, 3
    contexts = torch.arange(2 * T * D, dtype=torch.float32).reshape(2, T, D)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    ends = cycle_end_contexts(contexts, torch.tensor([3, 2]), mask)
    # row 0: 7 ids, L=3 -> last whole cycle ends at t=5; row 1: 5 ids, L=2 -> t=3
    assert torch.equal(ends[0], contexts[0, 5]) and torch.equal(ends[1], contexts[1, 3])


def test_loss_is_zero_for_a_model_at_its_fixed_point_and_matches_the_formula():
    torch.manual_seed(0)  # the CE check below depends on the random init: make it deterministic
    model = RepetitionCVFPT(vocab_size=16, context=TINY, embedding={"embed_dim": 8})
    batch = collate_repeated([{"ids": torch.tensor([3, 5] * 6), "cycle_length": 2, "index": 0}])
    loss, stats, token_loss, contexts = model.batch_loss(batch)
    assert token_loss is None and model.head is None  # token_weight 0: no head
    expected = (contexts[0, 2:] - contexts[0, :-2]).pow(2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    with_ce = RepetitionCVFPT(vocab_size=16, context=TINY, embedding={"embed_dim": 8}, token_weight=0.5)
    loss2, stats2, ce, _ = with_ce.batch_loss(batch)
    assert ce is not None and loss2.item() == pytest.approx(stats2.conv_loss.item() + 0.5 * ce.item(), rel=1e-6)
    assert ce.item() == pytest.approx(math.log(16), rel=0.2)  # near-uniform logits at init


# ---- data ------------------------------------------------------------------------------------
def test_cycle_length_is_measured_with_the_tokenizer_for_a_multi_token_word():
    tok = load_tokenizer(None)
    ids = tok("photosynthesis", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # several BPE pieces: L is not the word count
    dm = RepeatedPhraseDataModule(vocabulary=["photosynthesis"], max_stage=1, repetitions=5, max_length=512)
    assert dm.cycle_lengths(1) == [len(ids)]
    seq = dm.stages[1][0]["ids"]
    assert seq.tolist() == ids * 5
    # and with the mid-text form (" photosynthesis") the unit is what the tokenizer gives for it
    spaced = RepeatedPhraseDataModule(vocabulary=["photosynthesis"], separator=" ", max_stage=1, repetitions=3)
    assert spaced.cycle_lengths(1) == [len(tok(" photosynthesis", add_special_tokens=False)["input_ids"])]


def test_stages_use_the_first_s_words_and_truncate_to_max_length():
    dm = RepeatedPhraseDataModule(vocabulary=["red apple tree", "blue sky cloud"], max_stage=3, epochs_per_stage=2,
                                  repetitions=100, max_length=64)
    assert dm.phrases(1) == ["red", "blue"] and dm.phrases(3) == ["red apple tree", "blue sky cloud"]
    assert [dm.stage_for_epoch(e) for e in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]
    for s in (1, 2, 3):
        for item in dm.stages[s]:
            L_ = item["cycle_length"]
            ids = item["ids"]
            assert ids.numel() == min(64, 100 * L_)
            assert torch.equal(ids[L_:], ids[:-L_])  # exactly periodic
            assert item["stage"] == s


@pytest.mark.parametrize("kwargs, message", [
    ({"max_stage": 0}, "data.max_stage=0"),
    ({"repetitions": 1}, "data.repetitions=1"),
    ({"vocabulary": ["red", ""]}, "tokenises to no ids"),
    ({"vocabulary": ["red apple", "blue"], "max_stage": 2}, "'blue' has 1 word"),
    ({"vocabulary": ["photosynthesis"], "max_stage": 1, "max_length": 8}, "less than two cycles"),
    ({"epochs_per_stage": 0}, "data.epochs_per_stage=0"),
])
def test_bad_repeated_phrase_data_options_are_one_clear_error(kwargs, message):
    with pytest.raises(CVFPUserError, match=message) as info:
        RepeatedPhraseDataModule(**kwargs)
    assert "\n" not in str(info.value)


def test_stages_need_dataloaders_reloaded_every_epoch(tmp_path):
    dm = RepeatedPhraseDataModule(vocabulary=["red apple"], max_stage=2, repetitions=3)
    model = RepetitionCVFPT(vocab_size=dm.vocab_size, context=TINY, embedding={"embed_dim": 8})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(CVFPUserError, match="reload_dataloaders_every_n_epochs: 1"):
        trainer.fit(model, datamodule=dm)


def test_too_few_epochs_for_the_stages_is_said(tmp_path):
    dm = RepeatedPhraseDataModule(vocabulary=["red apple"], max_stage=2, epochs_per_stage=1, repetitions=3)
    model = RepetitionCVFPT(vocab_size=dm.vocab_size, context=TINY, embedding={"embed_dim": 8})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, reload_dataloaders_every_n_epochs=1)
    with pytest.warns(UserWarning, match="trainer.max_epochs=1 ends in stage 1 of data.max_stage=2 .* stage 2 is never "
                                         "trained; give trainer.max_epochs 2"):
        trainer.fit(model, datamodule=dm)


def test_cli_exits_2_with_one_line_for_max_stage_0(tmp_path, capsys):
    err = cli_error(["fit", "--config", str(CONFIGS / "repetition.yaml"), "--data.init_args.max_stage", "0",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)], capsys)
    assert "data.max_stage=0" in err


# ---- end to end ------------------------------------------------------------------------------
@pytest.mark.slow
def test_shipped_config_runs_three_stages_through_the_cli(tmp_path):
    run_cli(["fit", "--config", str(CONFIGS / "repetition.yaml"),
             "--trainer.max_epochs", "3", "--data.init_args.epochs_per_stage", "1",
             "--data.init_args.repetitions", "4", "--data.init_args.phrases_per_stage", "3",
             "--model.init_args.context.context_dim", "16", "--model.init_args.context.hidden_dim", "16",
             "--model.init_args.embedding.embed_dim", "16", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.save_dir", str(tmp_path)])
    scalars = read_scalars(tmp_path)
    assert [v for _, v in scalars["stage"]] == [1.0, 2.0, 3.0]
    for s in (1, 2, 3):
        for name in ("conv_loss", "change", "conv_metric"):
            assert f"train/stage{s}/{name}" in scalars
    for tag in ("train/conv_loss", "train/change", "train/conv_metric", "diag/attractor_distance",
                "diag/attractor_cosine"):
        assert len(scalars[tag]) == 3 and all(math.isfinite(v) for _, v in scalars[tag]), tag
    # the per-stage value is the epoch's value
    assert scalars["train/stage2/conv_loss"][0][1] == pytest.approx(scalars["train/conv_loss"][1][1])
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["context"]["context_dim"] == 16
    assert "updater.out.weight" in ckpt["state_dict"]
    assert ckpt["metrics"]["train/conv_loss"] == pytest.approx(scalars["train/conv_loss"][-1][1])


@pytest.mark.slow
def test_token_scaling_script_prints_the_seed_table(tmp_path, capsys):
    from cvfp_lightning.experiments.token_count_scaling import main

    rows = main(["--counts", "[3, 6]", "--epochs", "1", "--context_dim", "16", "--hidden_dim", "16",
                 "--max_iterations", "20", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| Token Count | Sequential | Layer-wise | Seq Avg Iters | Layer Avg Iters |" in out
    assert [(r["tokens"], r["architecture"]) for r in rows] == [(3, "sequential"), (3, "layerwise"),
                                                               (6, "sequential"), (6, "layerwise")]
    for r in rows:
        assert 0.0 <= r["convergence_rate"] <= 1.0 and 1.0 <= r["mean_iterations"] <= 20.0
    lines = (tmp_path / "token_scaling.csv").read_text().splitlines()
    assert lines[0].startswith("tokens,architecture,convergence_rate,mean_iterations") and len(lines) == 5


@pytest.mark.parametrize("make, args, message", [
    (lambda d: (d / "token_scaling.csv").write_text("my notes\n"), [], "exists and is not an earlier cvfp token-scaling"),
    (lambda d: (d / "file").write_text("x"), ["--out", "{d}/file"], "is a file, not a folder"),
    (lambda d: None, ["--architectures", "[]"], r"--architectures \[\] is empty"),
    (lambda d: None, ["--accelerator", "foo"], "--accelerator 'foo' is unknown"),
])
def test_token_scaling_refuses_bad_options_before_any_run(tmp_path, monkeypatch, make, args, message):
    from cvfp_lightning import CVFPUserError
    from cvfp_lightning.experiments import token_count_scaling

    make(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(token_count_scaling, "run_one", lambda *a: pytest.fail("a run started"))
    argv = ["--counts", "[3]", "--out", str(tmp_path), *[a.format(d=tmp_path) for a in args]]
    with pytest.raises(CVFPUserError, match=message):
        token_count_scaling.main(argv)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # the user's file is as it was
