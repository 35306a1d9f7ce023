"""End-to-end Phase 2: the context block trains by truncated BPTT (carried, detached contexts),
two learning rates, no context cache, Phase 1 measures after fit, and the recipe configs
(fitted tokenizer -> Phase 1 -> Phase 2 frozen / end-to-end -> export -> evaluate -> generate)
through the real CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers.cli import CONFIGS, run_cli
from cvfp_lightning.models.context import unroll
from cvfp_lightning.modules import Phase2EndToEnd, Phase2LM
from helpers.lm import phase1_checkpoint, text_data, trainer

V = 4096  # the bundled tokenizer
T = 6


def block_state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.lm.updater.state_dict().items()}


@pytest.mark.parametrize("cls, extra", [(Phase2EndToEnd, {}), (Phase2EndToEnd, {"context_lr": 0.0}),
                                        (Phase2LM, {"cache": "off"})])
def test_only_the_end_to_end_module_trains_the_context_block(tmp_path, corpus, cls, extra):
    torch.manual_seed(0)
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    model = cls(vocab_size=V, phase1_checkpoint=str(ckpt), lr=1e-2, **extra)
    before, embedding = block_state(model), model.lm.embedding.weight.clone()
    head = model.lm.head.weight.clone()
    fit = trainer(max_steps=3, limit_val_batches=0)
    fit.fit(model, datamodule=text_data(corpus, batch_size=4, seq_len=8))
    changed = [k for k, v in model.lm.updater.state_dict().items() if not torch.equal(v, before[k])]
    if cls is Phase2EndToEnd and not extra:
        assert changed and all(p.requires_grad for p in model.lm.updater.parameters())
        assert len(fit.optimizers[0].param_groups) == 2
    else:
        assert changed == []  # frozen in Phase2LM, and with context_lr: 0
        assert not any(p.requires_grad for p in model.lm.updater.parameters())
        assert len(fit.optimizers[0].param_groups) == 1
    assert not torch.equal(model.lm.head.weight, head)  # the head trains in every case
    assert torch.equal(model.lm.embedding.weight, embedding)  # freeze_embedding: true in all


def windows(ids: torch.Tensor, k: int, continues: list[bool]) -> dict[str, torch.Tensor]:
    part = ids[:, k * T:(k + 1) * T]
    return {"input_ids": part, "targets": ids[:, k * T + 1:(k + 1) * T + 1], "continues": torch.tensor(continues)}


def test_tbptt_carries_the_context_between_windows_and_detaches_it(tmp_path):
    torch.manual_seed(1)
    model = Phase2EndToEnd(vocab_size=V, phase1_checkpoint=str(phase1_checkpoint(tmp_path / "last.ckpt", V)))
    torch.nn.init.normal_(model.lm.head.weight, std=0.1)  # a non-zero head: the loss depends on the contexts
    lm = model.lm
    ids = torch.randint(1, V, (2, 2 * T + 1))
    model.logits_targets(windows(ids, 0, [False, False]), "train")  # window 1: the carry is its last context
    logits, targets = model.logits_targets(windows(ids, 1, [True, False]), "train")  # row 0 continues, row 1 restarts

    full, layers = unroll(lm.updater, lm.context_embed(ids[:, :2 * T]), return_all_layers=True)
    whole = lm.logits([layer[:, T:] for layer in layers], lm.embedding(ids[:, T:2 * T]))
    torch.testing.assert_close(logits[0], whole[0])  # carried: the same as reading the sequence in one go
    _, fresh = unroll(lm.updater, lm.context_embed(ids[1:, T:2 * T]), return_all_layers=True)
    torch.testing.assert_close(logits[1], lm.logits(fresh, lm.embedding(ids[1:, T:2 * T]))[0])  # restarted at 0

    def grads(loss):
        lm.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return [p.grad.clone() for p in lm.updater.parameters()]

    def loss_of(lg):
        return F.cross_entropy(lg[0].reshape(-1, V), targets[0].reshape(-1))

    got = grads(loss_of(logits))
    c_T = full[:1, T - 1].detach()  # truncated: the carried context is a constant of window 2
    _, own = unroll(lm.updater, lm.context_embed(ids[:1, T:2 * T]), c_T, return_all_layers=True)
    truncated = grads(loss_of(lm.logits(own, lm.embedding(ids[:1, T:2 * T]))))
    through = grads(loss_of(whole))  # what a carry that is not detached would give: gradients into window 1
    for g, t, u in zip(got, truncated, through):
        torch.testing.assert_close(g, t)
    assert any(not torch.allclose(t, u) for t, u in zip(truncated, through))
    assert not model._carry["train"].requires_grad


def test_the_token_history_is_carried_between_windows_like_the_context(tmp_path):
    """With token_history 4 > T / 2, a continued window reads the ids of the window before (as reading the
    sequence token by token does); a restarted one reads none (-1) before its first id."""
    torch.manual_seed(1)
    model = Phase2EndToEnd(vocab_size=V, phase1_checkpoint=str(phase1_checkpoint(tmp_path / "last.ckpt", V)),
                           weight_tying=True, freeze_embedding=False, token_history=4).eval()
    lm = model.lm
    ids = torch.randint(1, V, (2, 3 * T + 1))
    with torch.no_grad():
        model.logits_targets(windows(ids, 0, [False, False]), "val")
        model.logits_targets(windows(ids, 1, [True, True]), "val")
        logits, _ = model.logits_targets(windows(ids, 2, [True, False]), "val")  # row 1 restarts at window 2

        def read(row: torch.Tensor) -> torch.Tensor:
            state, out = lm.start_state(1), []
            for t in range(row.numel()):
                state, step_logits = lm.read(state, row[t].reshape(1, 1))
                out.append(step_logits[0])
            return torch.stack(out)

        torch.testing.assert_close(logits[0], read(ids[0, :3 * T])[2 * T:])  # carried over two windows
        torch.testing.assert_close(logits[1], read(ids[1, 2 * T:3 * T]))  # restarted: context 0, no ids before
    assert model._carry_ids["val"].tolist()[0] == ids[0, 3 * T - 4:3 * T].flip(0).tolist()


def test_two_learning_rates_and_no_context_cache(tmp_path, corpus, monkeypatch, caplog):
    import cvfp_lightning.modules.phase2 as phase2

    def no_cache(*args, **kwargs):
        raise AssertionError("the end-to-end module read or built a context cache")

    monkeypatch.setattr(phase2, "resolve_contexts", no_cache)
    model = Phase2EndToEnd(vocab_size=V, phase1_checkpoint=str(phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)),
                           lr=2e-3, context_lr=5e-5, weight_decay=0.01)
    caplog.set_level("INFO")
    fit = trainer(max_steps=2, limit_val_batches=2)
    fit.fit(model, datamodule=text_data(corpus, batch_size=4, seq_len=8))
    groups = fit.optimizers[0].param_groups
    context_ids = {id(p) for p in model.lm.updater.parameters()}
    # AdamW: each of the two learning rates split into its decayed matrices and its undecayed vectors
    assert isinstance(fit.optimizers[0], torch.optim.AdamW)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(2e-3, 0.01), (2e-3, 0.0), (5e-5, 0.01), (5e-5, 0.0)]
    assert all(p.dim() >= 2 for g in groups if g["weight_decay"] for p in g["params"])
    assert all(p.dim() < 2 for g in groups if not g["weight_decay"] for p in g["params"])
    assert {id(p) for g in groups[2:] for p in g["params"]} == context_ids
    assert not context_ids & {id(p) for g in groups[:2] for p in g["params"]}
    assert "context cache is not used" in caplog.text
    report = model.summary_extra()
    for key in ("phase1/convergence_rate", "phase1/effective_rank_pct", "phase1/convergence_rate_phase1",
                "phase1/effective_rank_pct_phase1"):
        assert key in report and report[key] >= 0


QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.mark.slow
def test_the_recipe_configs_run_export_evaluate_and_generate(tmp_path, corpus, capsys):
    """text_phase1.yaml -> text_phase2.yaml (frozen) and text_phase2_e2e.yaml on a text file: one fitted
    tokenizer for all three; the fine-tuned block exported; ``cvfp evaluate`` of the validation text equals
    the fit's val metrics; ``cvfp generate`` of the export equals the checkpoint's."""
    from cvfp_lightning.data import TextDataModule
    from cvfp_lightning.data.snapshot import find_data_snapshot
    from cvfp_lightning.hub import CVFPModel

    paragraphs = corpus.read_text(encoding="utf-8").split("\n\n")
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("\n\n".join(paragraphs[:32]), encoding="utf-8")
    val.write_text("\n\n".join(paragraphs[32:36]), encoding="utf-8")
    logs = tmp_path / "logs"
    data = ["--data.init_args.paths", f"[{train}]", "--data.init_args.val_paths", f"[{val}]",
            "--data.init_args.tokenizer", "{train: {vocab_size: 512}}", "--data.init_args.max_seq_len", "96"]
    small = ["--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "2",
             "--model.init_args.embedding.embed_dim", "16"]
    run_cli(["fit", "--config", str(CONFIGS / "text_phase1.yaml"), *data, *QUIET, *small, "--trainer.max_epochs", "1",
             "--trainer.logger.init_args.save_dir", str(logs)])
    p1 = next((logs / "text_phase1").rglob("last.ckpt"))
    p1_tok = find_data_snapshot(torch.load(p1, weights_only=True))["tokenizer"]["fingerprint"]
    run_cli(["fit", "--config", str(CONFIGS / "text_phase2.yaml"), *data, *QUIET, "--trainer.max_epochs", "1",
             "--model.init_args.phase1_checkpoint", str(p1), "--trainer.logger.init_args.save_dir", str(logs)])
    frozen = next((logs / "text_phase2").glob("version_*"))
    assert json.loads((frozen / "summary.json").read_text())["model"] == "Phase2LM"
    frozen_ckpt = torch.load(frozen / "checkpoints" / "best.ckpt", weights_only=True)
    assert find_data_snapshot(frozen_ckpt)["tokenizer"]["fingerprint"] == p1_tok
    decay = yaml.safe_load((CONFIGS / "text_phase2.yaml").read_text())["model"]["init_args"]["weight_decay"]
    assert decay > 0 and frozen_ckpt["hyper_parameters"]["weight_decay"] == decay  # the config's AdamW reached the run
    assert sorted(g["weight_decay"] for g in frozen_ckpt["optimizer_states"][0]["param_groups"]) == [0.0, decay]
    assert "EMAWeights" in frozen_ckpt["callbacks"] and "current_model_state" in frozen_ckpt  # the EMA weights
    frozen_summary = json.loads((frozen / "summary.json").read_text())
    run_cli(["evaluate", str(frozen / "checkpoints" / "best.ckpt"), "--text", str(val),
             "--out", str(tmp_path / "eval_frozen.json")])
    frozen_eval = json.loads((tmp_path / "eval_frozen.json").read_text())
    assert frozen_eval["bpb"] == pytest.approx(frozen_summary["val/bpb"], rel=1e-5)  # validated = saved weights
    assert frozen_eval["tokens"] == frozen_summary["val/tokens"]
    run_cli(["fit", "--config", str(CONFIGS / "text_phase2_e2e.yaml"), *data, *QUIET, "--trainer.max_epochs", "1",
             "--data.init_args.seq_len", "16", "--model.init_args.phase1_checkpoint", str(p1),
             "--trainer.logger.init_args.save_dir", str(logs)])
    run = next((logs / "text_phase2_e2e").glob("version_*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "Phase2EndToEnd" and "context cache is not used" in summary["contexts"]
    assert 0 <= summary["phase1/convergence_rate"] <= 1 and summary["phase1/effective_rank_pct"] > 0
    assert 0 <= summary["phase1/convergence_rate_phase1"] <= 1
    best = run / "checkpoints" / "best.ckpt"
    p2_ckpt = torch.load(best, weights_only=True)
    assert find_data_snapshot(p2_ckpt)["tokenizer"]["fingerprint"] == p1_tok  # one fitted tokenizer for all
    assert len(find_data_snapshot(p2_ckpt)["tokenizer"]["files"]["tokenizer.json"]) > 0

    out = tmp_path / "export"
    run_cli(["export", "--ckpt_path", str(best), "--out_dir", str(out)])
    model = CVFPModel.from_pretrained(str(out))
    p1_block = {k[len("updater."):]: v for k, v in torch.load(p1, weights_only=True)["state_dict"].items()
                if k.startswith("updater.")}
    trained = {k[len("lm.updater."):]: v for k, v in p2_ckpt["state_dict"].items() if k.startswith("lm.updater.")}
    for name, value in model.updater.state_dict().items():
        torch.testing.assert_close(value, trained[name])  # the exported block is the fine-tuned one
    assert any(not torch.equal(trained[k], p1_block[k]) for k in trained)
    assert "fine-tuned end to end" in (out / "README.md").read_text()

    capsys.readouterr()
    run_cli(["evaluate", str(out), "--text", str(val), "--out", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["bpb"] == pytest.approx(summary["val/bpb"], rel=1e-5)  # contexts carried as in validation
    assert result["loss"] == pytest.approx(summary["val/loss"], rel=1e-5)
    dm = TextDataModule(paths=[str(val)], tokenizer=str(out), max_seq_len=96, sequences="samples",
                        val_subset_of_train=True)  # every sample of the file in the training split
    dm.setup()
    assert result["tokens"] == dm.train_sequences.num_tokens - dm.train_sequences.num_sequences

    generated = {}
    for source in (out, best):
        target = tmp_path / f"gen_{source.name}.jsonl"
        run_cli(["generate", str(source), "--prompt", "The value", "--max_new_tokens", "5", "--greedy", "true",
                 "--out", str(target)])
        generated[source] = [json.loads(line) for line in target.read_text().splitlines()]
    assert generated[out] == generated[best] and generated[out][0]["new_tokens"] == 5
