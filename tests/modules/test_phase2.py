"""Phase 2: token block, head, loading Phase 1, pretrained embeddings, generation, bad input,
and Phase 1 -> Phase 2 -> test -> predict through the real CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cvfp_lightning import CVFPUserError
from cvfp_lightning.models import CVFPLanguageModel, TokenBlock, build_context_updater, build_embedding
from cvfp_lightning.modules import Phase1FixedPoint, Phase2LM
from helpers.cli import CONFIGS, run_cli
from helpers.lm import SMALL_CONTEXT, phase1_checkpoint, unigram_ppl

V = 4096  # the bundled tokenizer


def small_lm(vocab=50, dim=8, layers=2, tying=False, train_embedding=False, all_layers=True) -> CVFPLanguageModel:
    torch.manual_seed(0)
    emb = build_embedding(vocab, {"embed_dim": dim}, default_dim=dim)
    upd = build_context_updater({"context_dim": dim, "num_layers": layers, "token_input_all_layers": all_layers}, dim)
    return CVFPLanguageModel(emb, upd, weight_tying=tying, train_embedding=train_embedding)


# ---- token block and head ---------------------------------------------------------------------
def test_token_block_shapes_and_formula():
    block = TokenBlock([12, 10, 8], embed_dim=6)
    contexts = [torch.randn(4, 5, d) for d in (12, 10, 8)]
    e = torch.randn(4, 5, 6)
    assert block(contexts, e).shape == (4, 5, 6)
    t = e
    for c, lin, norm in zip(contexts, block.linears, block.norms):  # t_l = LN(t_{l-1} + ReLU(W[c_l; t_{l-1}] + b))
        w = torch.cat([lin.input.weight, lin.state.weight], dim=1)  # W_l over [c_l; t]
        t = F.layer_norm(t + F.relu(F.linear(torch.cat([c, t], -1), w, lin.input.bias)), (6,), norm.weight,
                         norm.bias)
    torch.testing.assert_close(block(contexts, e), t)
    with pytest.raises(ValueError):
        block(contexts[:2], e)


def test_token_block_history_formula_and_shapes():
    """t_0 = LN(e + ReLU(W_0 [e; h_1; h_2] + b_0)), then the context layers."""
    block = TokenBlock([12, 10], embed_dim=6, history=2)
    contexts = [torch.randn(4, 5, d) for d in (12, 10)]
    e, h = torch.randn(4, 5, 6), torch.randn(4, 5, 2, 6)
    w0 = torch.cat([block.history_linear.state.weight, block.history_linear.input.weight], dim=1)  # over [e; h_1; h_2]
    t = F.layer_norm(e + F.relu(F.linear(torch.cat([e, h[..., 0, :], h[..., 1, :]], -1), w0,
                                         block.history_linear.input.bias)), (6,), block.history_norm.weight,
                     block.history_norm.bias)
    for c, lin, norm in zip(contexts, block.linears, block.norms):
        w = torch.cat([lin.input.weight, lin.state.weight], dim=1)
        t = F.layer_norm(t + F.relu(F.linear(torch.cat([c, t], -1), w, lin.input.bias)), (6,), norm.weight, norm.bias)
    torch.testing.assert_close(block(contexts, e, h), t)
    for bad in (None, h[..., :1, :]):  # a history block needs its K embeddings
        with pytest.raises(ValueError, match="history of 2 embeddings"):
            block(contexts, e, bad)
    assert TokenBlock([12, 10], 6).history_linear is None  # K = 0: the seed's block, no extra parameters


def test_position_batches_carry_the_ids_before_each_position():
    from cvfp_lightning.data import PositionCollate, TokenSequences

    seqs = TokenSequences.from_lists([[5, 6, 7, 8], [9, 10]])
    batch = seqs.position_batch(torch.tensor([3, 0, 5, 1, 4, 2]), history=2)
    assert batch["history"].tolist() == [[7, 6], [-1, -1], [9, -1], [5, -1], [-1, -1], [6, 5]]  # newest first
    assert batch["ids"].tolist() == [8, 5, 10, 6, 9, 7] and batch["targets"].tolist() == [-100, 6, -100, 7, 10, 8]
    assert "history" not in seqs.position_batch(torch.tensor([1]))
    padded = PositionCollate(seqs, history=3)(torch.tensor([2, 6]))  # 6 >= N: padding, no target
    assert padded["history"].tolist() == [[6, 5, -1], [-1, -1, -1]] and padded["targets"].tolist() == [8, -100]


def test_the_history_reaches_the_logits_and_reading_equals_position_batches():
    """The history path changes the prediction, and the token-by-token read (generation) gives the logits
    of position batches (training, evaluation) built from the same sequence."""
    from cvfp_lightning.data import TokenSequences
    from cvfp_lightning.models.context import unroll

    torch.manual_seed(0)
    emb = build_embedding(50, {"embed_dim": 8}, default_dim=8)
    upd = build_context_updater({"context_dim": 8, "num_layers": 2}, 8)
    lm = CVFPLanguageModel(emb, upd, weight_tying=True, train_embedding=True, token_history=2).eval()
    ids = torch.tensor([3, 14, 15, 9, 2, 6])
    seqs = TokenSequences.from_lists([ids])
    batch = seqs.position_batch(torch.arange(6), history=2)
    contexts = unroll(upd, lm.context_embed(ids.unsqueeze(0)))[0]  # (6, D)
    previous = torch.cat([torch.zeros(1, 8), contexts[:-1]])
    batched = lm.step(previous, batch["ids"], batch["history"])[1]  # (6, V)
    state, read = lm.start_state(1), []
    for t in range(6):
        state, logits = lm.read(state, ids[t:t + 1].reshape(1, 1))
        read.append(logits[0])
    torch.testing.assert_close(batched, torch.stack(read))
    other = batch["history"].clone()
    other[3, 1] = 40  # another id two before position 3: its logits change, no other position's
    changed = lm.step(previous, batch["ids"], other)[1]
    others = [0, 1, 2, 4, 5]
    assert not torch.allclose(changed[3], batched[3]) and torch.equal(changed[others], batched[others])
    with pytest.raises(ValueError, match="reads the 2 ids before each position"):
        lm.step(previous, batch["ids"])


def test_token_block_follows_the_context_layer_widths():
    lm = small_lm(dim=8, layers=3, all_layers=False)  # widths shrink 16 -> ... -> 8
    assert lm.token_block.context_dims == lm.updater.layer_dims
    assert lm.token_block.num_layers == 3


def test_zero_initialised_head_gives_first_loss_ln_vocab():
    lm = small_lm(vocab=50)
    ids = torch.randint(0, 50, (2, 7))
    e = lm.embedding(ids)
    _, layers = lm.updater.update_context_one_step(torch.zeros(2, 7, 8), e, return_all_layers=True)
    logits = lm.logits(layers, e)
    loss = F.cross_entropy(logits.reshape(-1, 50), torch.randint(0, 50, (14,)))
    assert loss.item() == pytest.approx(math.log(50), abs=1e-6)


def test_tied_head_shares_storage_and_trains_with_the_embedding():
    lm = small_lm(tying=True, train_embedding=True)
    assert lm.head.weight is lm.embedding.embed.weight
    assert lm.head.weight.data_ptr() == lm.embedding.weight.data_ptr()
    before = lm.embedding.weight.detach().clone()
    ctx_before = lm.context_embedding.weight.detach().clone()
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    _, logits = lm.step(torch.zeros(3, 8), torch.tensor([1, 2, 3]))
    F.cross_entropy(logits, torch.tensor([4, 5, 6])).backward()
    opt.step()
    assert not torch.equal(lm.embedding.weight, before)
    assert lm.head.weight.data_ptr() == lm.embedding.weight.data_ptr()  # still one tensor
    torch.testing.assert_close(lm.context_embedding.weight, ctx_before)  # contexts keep Phase 1's embedding
    # counted once, and a frozen tied head has nothing trainable
    assert lm.num_trainable_parameters() == lm.embedding.weight.numel() + sum(
        p.numel() for p in lm.token_block.parameters())
    frozen = small_lm(tying=True)
    assert frozen.num_trainable_parameters() == sum(p.numel() for p in frozen.token_block.parameters())


def test_dropout_acts_in_training_only_and_never_on_the_contexts():
    plain = small_lm(vocab=50, dim=8, layers=2)
    dropped = CVFPLanguageModel(copy.deepcopy(plain.embedding), copy.deepcopy(plain.updater), dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    torch.nn.init.normal_(dropped.head.weight)  # a non-zero head, so dropped entries change the logits
    plain.head.weight.data.copy_(dropped.head.weight)
    context, ids = torch.randn(6, 8), torch.randint(0, 50, (6,))
    dropped.eval()
    c_eval, logits_eval = dropped.step(context, ids)
    torch.testing.assert_close(logits_eval, plain.step(context, ids)[1], rtol=0, atol=0)  # evaluation: no dropout
    dropped.train()
    torch.manual_seed(1)
    c_train, logits_train = dropped.step(context, ids)
    torch.testing.assert_close(c_train, c_eval, rtol=0, atol=0)  # the context update is untouched
    assert not torch.equal(logits_train, logits_eval)
    # the same masks drawn by hand: c_l, e and t, in that order, kept entries scaled by 1 / (1 - p)
    torch.manual_seed(1)
    _, layers = dropped.updater.update_context_one_step(context, dropped.embedding(ids), return_all_layers=True)
    drop = torch.nn.Dropout(0.5)
    t = dropped.token_block([drop(c) for c in layers], drop(dropped.embedding(ids)))
    torch.testing.assert_close(logits_train, dropped.head(drop(t)), rtol=0, atol=0)
    assert plain.drop.p == 0.0


def test_generation_carries_the_context_with_the_update_rule(monkeypatch):
    lm = small_lm(vocab=30)
    calls = []
    original = type(lm.updater).update_context_one_step

    def spy(self, context, token_embed, return_all_layers=False):
        calls.append(context.shape)
        return original(self, context, token_embed, return_all_layers)

    monkeypatch.setattr(type(lm.updater), "update_context_one_step", spy)
    torch.nn.init.normal_(lm.head.weight)
    prompt = torch.tensor([3, 7, 9])
    out = lm.generate(prompt, max_new_tokens=5, greedy=True)
    assert out.shape == (5,) and len(calls) == 3 + 5 - 1
    # the same by hand: read the prompt, then feed back the argmax
    c, ids = torch.zeros(1, 8), prompt.tolist()
    for t in ids:
        c, logits = lm.step(c, torch.tensor([t]))
    expected = []
    for _ in range(5):
        expected.append(int(logits.argmax()))
        c, logits = lm.step(c, torch.tensor([expected[-1]]))
    assert out.tolist() == expected
    sampled = lm.generate(prompt, max_new_tokens=4, temperature=0.7, top_k=3)
    assert sampled.shape == (4,)


# ---- loading Phase 1 --------------------------------------------------------------------------
def test_phase2_loads_and_freezes_the_phase1_weights(tmp_path):
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    model = Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt))
    for name, value in model.lm.updater.state_dict().items():
        torch.testing.assert_close(value, state[f"updater.{name}"])
    torch.testing.assert_close(model.lm.embedding.weight, state["embedding.embed.weight"])
    assert not any(p.requires_grad for p in model.lm.updater.parameters())
    assert not model.lm.embedding.weight.requires_grad
    assert model.lm.token_block.context_dims == [16, 16]
    assert set(model.hparams) == {"vocab_size", "weight_tying", "freeze_embedding", "lr", "grad_clip", "dropout",
                                  "weight_decay", "token_history", "continuous_cache"}
    assert model.hparams["continuous_cache"] is None and model.lm.continuous_cache is None  # off unless asked for
    assert type(model.configure_optimizers()) is torch.optim.Adam  # weight_decay 0: plain Adam


def test_weight_decay_reaches_the_optimizer_for_the_trained_matrices_only(tmp_path):
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    model = Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt), weight_tying=True, freeze_embedding=False,
                     weight_decay=0.05)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in named.items() if id(p) in decayed} == {n for n, p in named.items() if p.dim() >= 2}
    assert "lm.embedding.embed.weight" in {n for n, p in named.items() if id(p) in decayed}  # the tied head, once
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(named)


def test_phase1_checkpoint_glob_picks_the_newest(tmp_path):
    old = phase1_checkpoint(tmp_path / "version_0" / "last.ckpt", V, seed=1)
    new = phase1_checkpoint(tmp_path / "version_1" / "last.ckpt", V, seed=2)
    os.utime(old, (time.time() - 100, time.time() - 100))
    model = Phase2LM(vocab_size=V, phase1_checkpoint=str(tmp_path / "version_*" / "last.ckpt"))
    assert model.phase1_path == new


def test_pretrained_gpt2_embedding_through_phase1_and_phase2(tmp_path):
    from transformers import GPT2Config, GPT2Model

    from cvfp_lightning.data import load_tokenizer

    folder = tmp_path / "tiny-gpt2"
    tok = load_tokenizer(None)
    tok.save_pretrained(folder)
    gpt2 = GPT2Model(GPT2Config(vocab_size=len(tok), n_embd=24, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(folder)
    wte = gpt2.wte.weight.detach()
    p1 = Phase1FixedPoint(vocab_size=len(tok), context=SMALL_CONTEXT, embedding={"pretrained": str(folder)})
    torch.testing.assert_close(p1.embedding.weight, wte)
    assert p1.hparams["embedding"]["embed_dim"] == 24
    ckpt = tmp_path / "p1.ckpt"
    torch.save({"state_dict": p1.state_dict(), "hyper_parameters": dict(p1.hparams)}, ckpt)
    p2 = Phase2LM(vocab_size=len(tok), phase1_checkpoint=str(ckpt), weight_tying=True)
    torch.testing.assert_close(p2.lm.embedding.weight, wte)  # from the checkpoint, no second hub load
    assert p2.lm.head.weight is p2.lm.embedding.embed.weight
    # a tokenizer whose vocabulary differs from the pretrained model's
    with pytest.raises(CVFPUserError, match="vocabulary of 4096 tokens but the tokenizer has 4000"):
        Phase1FixedPoint(vocab_size=4000, context=SMALL_CONTEXT, embedding={"pretrained": str(folder)})
    with pytest.raises(CVFPUserError, match="could not be loaded"):
        Phase1FixedPoint(vocab_size=V, context=SMALL_CONTEXT, embedding={"pretrained": str(tmp_path / "nothing")})


# ---- bad input --------------------------------------------------------------------------------
def _bad_checkpoints(tmp_path: Path) -> dict[str, Path]:
    good = phase1_checkpoint(tmp_path / "good.ckpt", V)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"net.weight": torch.zeros(2)}, "hyper_parameters": {"arch": "gru"}}, foreign)
    damaged = tmp_path / "damaged.ckpt"
    ckpt = torch.load(good, weights_only=True)
    ckpt["state_dict"]["updater.linears.0.state.weight"] = torch.zeros(3, 3)
    torch.save(ckpt, damaged)
    return {"good": good, "garbage": garbage, "foreign": foreign, "damaged": damaged}


@pytest.mark.parametrize("case, kwargs, message", [
    ("missing", {"phase1_checkpoint": "{tmp}/nope.ckpt"}, "does not exist: run Phase 1 first"),
    ("unset", {"phase1_checkpoint": None}, "phase1_checkpoint is not set"),
    ("glob-none", {"phase1_checkpoint": "{tmp}/v_*/last.ckpt"}, "matches no file"),
    ("garbage", {"phase1_checkpoint": "{garbage}"}, "not a readable cvfp_lightning file"),
    ("foreign", {"phase1_checkpoint": "{foreign}"}, "is not a Phase 1 checkpoint"),
    ("damaged", {"phase1_checkpoint": "{damaged}"}, "do not fit its own hyperparameters"),
    ("vocab", {"phase1_checkpoint": "{good}", "vocab_size": 50257}, "vocabulary of 4096 ids but the data's"),
    ("empty-prompt", {"prompts": [""]}, r"prompts\[0\]='' is empty"),
    ("blank-prompt", {"prompts": ["ok", "   "]}, r"prompts\[1\]='   ' is empty"),
    ("temperature-0", {"temperature": 0.0}, "temperature=0.0 is invalid"),
    ("temperature-neg", {"temperature": -1.0}, "temperature=-1.0 is invalid"),
    ("top-k", {"top_k": 0}, "top_k=0 is invalid"),
    ("max-new", {"max_new_tokens": 0}, "max_new_tokens=0 is invalid"),
    ("prompt-file", {"prompt_file": "{tmp}/prompts.txt"}, "prompt_file=.* does not exist"),
    ("prompt-file-empty", {"prompt_file": "{empty}"}, "holds no prompt"),
    ("cache-mode", {"cache": "sometimes"}, "model.cache='sometimes' is unknown"),
    ("dropout", {"dropout": 1.0}, "model.dropout=1.0 is invalid"),
    ("weight-decay", {"weight_decay": -0.1}, "model.weight_decay=-0.1 is invalid"),
    ("history-negative", {"token_history": -1}, "model.token_history=-1 is invalid"),
    ("history-bool", {"token_history": True}, "model.token_history=True is invalid"),
])
def test_bad_phase2_model_arguments_are_one_clear_error(tmp_path, case, kwargs, message):
    paths = {k: str(v) for k, v in _bad_checkpoints(tmp_path).items()}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    fmt = {"tmp": str(tmp_path), "empty": str(empty), **paths}
    args = {"vocab_size": V, "phase1_checkpoint": paths["good"]}
    args.update({k: v.format(**fmt) if isinstance(v, str) else v for k, v in kwargs.items()})
    with pytest.raises(CVFPUserError, match=message) as info:
        Phase2LM(**args)
    assert "\n" not in str(info.value)


def test_a_phase2_checkpoint_of_another_shape_is_refused(tmp_path):
    small = Phase2LM(vocab_size=V, phase1_checkpoint=str(phase1_checkpoint(tmp_path / "a.ckpt", V)))
    wide = {**SMALL_CONTEXT, "context_dim": 24}
    other = Phase2LM(vocab_size=V, phase1_checkpoint=str(phase1_checkpoint(tmp_path / "b.ckpt", V, context=wide)))
    with pytest.raises(CVFPUserError, match="does not fit this Phase 2 model.*checkpoint \\(16"):
        other.on_load_checkpoint({"state_dict": small.state_dict()})
    tied = Phase2LM(vocab_size=V, phase1_checkpoint=str(tmp_path / "a.ckpt"), weight_tying=True)
    with pytest.raises(CVFPUserError, match="missing"):
        small.on_load_checkpoint({"state_dict": {k: v for k, v in tied.state_dict().items() if "head" not in k}})
    history = Phase2LM(vocab_size=V, phase1_checkpoint=str(tmp_path / "a.ckpt"), token_history=2)
    with pytest.raises(CVFPUserError, match=r"token_history\): unexpected \['lm.token_block.history_linear"):
        small.on_load_checkpoint({"state_dict": history.state_dict()})


# ---- end to end through the CLI -------------------------------------------------------------------
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.mark.slow
def test_phase1_then_phase2_with_a_cache_hit_then_test_and_predict(tmp_path, corpus, capsys, caplog):
    caplog.set_level("INFO")
    data = ["--data.init_args.paths", f"[{corpus}]", "--data.init_args.max_seq_len", "128"]
    run_cli(["fit", "--config", str(CONFIGS / "phase1.yaml"), *data, *QUIET, "--trainer.max_epochs", "1",
             "--model.init_args.context.context_dim", "32", "--model.init_args.context.num_layers", "2",
             "--model.init_args.embedding.embed_dim", "32", "--trainer.logger.init_args.save_dir",
             str(tmp_path / "logs")])
    p1_dir = next((tmp_path / "logs" / "phase1").rglob("last.ckpt")).parent
    assert (p1_dir / "context_cache" / "meta.json").is_file()  # written by ContextCacheHandoff

    phase2 = ["--config", str(CONFIGS / "phase2.yaml"), *data, *QUIET, "--data.init_args.chunk_size", "256",
              "--model.init_args.phase1_checkpoint", str(tmp_path / "logs/phase1/version_*/checkpoints/last.ckpt"),
              "--model.init_args.lr", "0.005", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    run_cli(["fit", *phase2, "--model.init_args.cache", "require", "--trainer.max_epochs", "4"])
    run_dir = tmp_path / "logs" / "phase2" / "version_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["contexts"].startswith("context cache hit")
    assert "Phase2LM: context cache hit" in caplog.text  # what the user sees in the log

    from cvfp_lightning.data import TextDataModule

    dm = TextDataModule(paths=[str(corpus)], sequences="samples", max_seq_len=128)
    dm.setup()
    targets = dm.val_sequences.targets()
    unigram = unigram_ppl(dm.train_sequences.ids, targets[targets >= 0], dm.vocab_size)
    print("val ppl", summary["val/ppl"], "unigram", unigram)
    assert summary["val/ppl"] < unigram, (summary["val/ppl"], unigram)
    assert summary["val/ppl"] == pytest.approx(math.exp(summary["val/loss"]), rel=1e-4)
    assert 0 < summary["val/acc"] < 1 and 0 < summary["val/bpb"] < 8

    best = run_dir / "checkpoints" / "best.ckpt"
    assert best.is_file() and summary["best_model_path"] == str(best)
    run_cli(["test", *phase2, "--ckpt_path", str(best)])
    test_out = capsys.readouterr().out
    assert "test/ppl" in test_out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The for statement\n\nA class definition\n", encoding="utf-8")
    run_cli(["predict", *phase2, "--ckpt_path", str(best), "--model.init_args.prompt_file", str(prompts),
             "--model.init_args.prompts", "[]", "--model.init_args.max_new_tokens", "12"])
    out = capsys.readouterr().out
    generations = [json.loads(line) for line in
                   next((tmp_path / "logs" / "phase2").rglob("generations.jsonl")).read_text().splitlines()]
    assert [g["prompt"] for g in generations] == ["The for statement", "A class definition"]
    assert all(g["new_tokens"] == 12 and len(g["ids"]) == 12 for g in generations)
    assert "The for statement" in out and generations[0]["continuation"] in out


@pytest.mark.slow
def test_sequences_of_one_token_leave_nothing_to_predict_and_are_refused(tmp_path, corpus, capsys):
    """max_seq_len 1: every position is the last of its sequence. Fit stops with one line instead
    of logging loss 0 and perplexity 1."""
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", str(CONFIGS / "phase2.yaml"), "--data.init_args.paths", f"[{corpus}]", *QUIET,
                 "--data.init_args.max_seq_len", "1", "--model.init_args.phase1_checkpoint", str(ckpt),
                 "--model.init_args.cache", "off", "--trainer.max_epochs", "1",
                 "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2
    assert err[-1].startswith("cvfp: error: the train split has no token to predict: its ")
    assert "sequences are one token each" in err[-1] and "data.max_seq_len" in err[-1]
    assert not list((tmp_path / "logs").rglob("summary.json"))  # no metrics of nothing


@pytest.mark.slow
def test_cli_refuses_test_without_weights_and_bad_prompts(tmp_path, corpus, capsys):
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    args = ["--config", str(CONFIGS / "phase2.yaml"), "--data.init_args.paths", f"[{corpus}]", *QUIET,
            "--model.init_args.phase1_checkpoint", str(ckpt), "--trainer.logger.init_args.save_dir",
            str(tmp_path / "logs")]
    for extra, message in ((["test"], "needs trained weights: pass --ckpt_path"),
                           (["predict", "--model.init_args.temperature", "0"], "temperature=0.0 is invalid"),
                           (["predict", "--model.init_args.prompts", '[""]'], "is empty")):
        with pytest.raises(SystemExit) as info:
            run_cli([extra[0], *args, *extra[1:]])
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and err[-1].startswith("cvfp: error:")


@pytest.mark.slow
def test_seed_and_ultrachat_phase2_configs_run(tmp_path, ultrachat_jsonl):
    """configs/phase2_seed.yaml and configs/ultrachat_phase2.yaml, shrunk, on tiny Phase 1 checkpoints."""
    from cvfp_lightning.data import load_tokenizer

    folder = tmp_path / "tokenizer"
    load_tokenizer(None).save_pretrained(folder)  # a local stand-in for gpt2 (4096 ids)
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    common = [*QUIET, "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.accelerator", "cpu",
              "--model.init_args.phase1_checkpoint", str(ckpt), "--trainer.logger.init_args.save_dir",
              str(tmp_path / "logs")]
    run_cli(["fit", "--config", str(CONFIGS / "phase2_seed.yaml"), *common, "--data.init_args.vocab_size", str(V),
             "--data.init_args.num_tokens", "256", "--data.init_args.val_tokens", "64"])
    run_cli(["fit", "--config", str(CONFIGS / "ultrachat_phase2.yaml"), *common, "--data.init_args.data_files",
             str(ultrachat_jsonl), "--data.init_args.num_samples", "10", "--data.init_args.tokenizer", str(folder)])


def _file_digests(folder: Path) -> dict[str, str]:
    from cvfp_lightning.io import file_sha256

    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_evaluation_pairs_with_its_own_phase1_run_and_writes_into_no_other_run(tmp_path, corpus, caplog):
    """Phase 2 is fit on the first of two Phase 1 runs; its config's glob later matches the second.
    ``cvfp test`` of the Phase 2 run must still score the first pairing and leave both Phase 1 folders as they were."""
    from helpers.cli import read_scalars

    caplog.set_level("INFO")
    logs = tmp_path / "logs"
    data = ["--data.init_args.paths", f"[{corpus}]", "--data.init_args.max_seq_len", "128"]
    phase1 = ["fit", "--config", str(CONFIGS / "phase1.yaml"), *data, *QUIET, "--trainer.max_epochs", "1",
              "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "1",
              "--model.init_args.embedding.embed_dim", "16", "--trainer.logger.init_args.save_dir", str(logs)]
    run_cli(phase1)
    first = logs / "phase1" / "version_0" / "checkpoints"
    run_cli(["fit", "--config", str(CONFIGS / "phase2.yaml"), *data, *QUIET, "--data.init_args.chunk_size", "512",
             "--model.init_args.phase1_checkpoint", str(logs / "phase1/version_*/checkpoints/last.ckpt"),
             "--trainer.max_epochs", "1", "--trainer.logger.init_args.save_dir", str(logs)])
    run_dir = logs / "phase2" / "version_0"
    evaluate = ["test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(run_dir / "checkpoints/best.ckpt")]
    run_cli(evaluate)  # only the first Phase 1 run exists: the reference scores
    reference = read_scalars(logs / "phase2" / "version_1")

    run_cli([*phase1, "--seed_everything", "7"])  # a second Phase 1 run, now the newest match of the glob
    assert (logs / "phase1" / "version_1" / "checkpoints" / "context_cache" / "meta.json").is_file()
    before = _file_digests(logs / "phase1")
    caplog.clear()
    run_cli(evaluate)
    assert _file_digests(logs / "phase1") == before  # nothing under either Phase 1 run changed
    assert f"context cache hit: {first / 'context_cache'}" in caplog.text  # the first run's contexts
    again = read_scalars(logs / "phase2" / "version_2")
    tags = [t for t in reference if t.startswith("test/")]
    assert {"test/loss", "test/ppl", "test/acc", "test/bpb"} <= set(tags)
    for tag in tags:
        assert again[tag] == reference[tag], tag  # the same pairing: identical numbers

    # the checkpoint alone rebuilds the model (the pairing is recorded in it), no argument needed
    best = Phase2LM.load_from_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert best.phase1_path == first / "last.ckpt"
    p1_state = torch.load(first / "last.ckpt", weights_only=True)["state_dict"]
    for name, value in best.lm.updater.state_dict().items():
        assert torch.equal(value, p1_state[f"updater.{name}"]), name


@pytest.mark.slow
def test_phase2_on_other_data_writes_no_phase1_file_and_refuses_another_tokenizer(tmp_path, corpus, capsys):
    """Phase 2 on other sequences of the Phase 1 text (same tokenizer) computes its contexts and
    caches them in its own run folder, the Phase 1 run untouched; a tokenizer fitted on another
    text, of the same size, is refused before any training."""
    logs = tmp_path / "logs"
    fit300 = ["--data.init_args.tokenizer", "{train: {vocab_size: 300}}"]
    data = ["--data.init_args.paths", f"[{corpus}]", "--data.init_args.max_seq_len", "128", *fit300]
    run_cli(["fit", "--config", str(CONFIGS / "phase1.yaml"), *data, *QUIET, "--trainer.max_epochs", "1",
             "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "1",
             "--model.init_args.embedding.embed_dim", "16", "--trainer.logger.init_args.save_dir", str(logs)])
    phase1 = logs / "phase1" / "version_0"
    before = _file_digests(phase1)
    assert "checkpoints/context_cache/meta.json" in before
    phase2 = ["fit", "--config", str(CONFIGS / "phase2.yaml"), *QUIET, "--trainer.max_epochs", "1",
              "--data.init_args.chunk_size", "512", "--model.init_args.phase1_checkpoint",
              str(phase1 / "checkpoints" / "last.ckpt"), "--trainer.logger.init_args.save_dir", str(logs)]
    run_cli([*phase2, *data[:-2], "--data.init_args.max_seq_len", "64", *fit300])  # other sequences
    run_dir = logs / "phase2" / "version_0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "is stale" in summary["contexts"] and f"cached in {run_dir / 'context_cache'}" in summary["contexts"]
    assert (run_dir / "context_cache" / "meta.json").is_file()
    assert _file_digests(phase1) == before  # not a byte of the Phase 1 run changed

    other = tmp_path / "other.txt"  # the same paragraphs reversed: another fit, 300 ids as well
    other.write_text("\n\n".join(reversed(corpus.read_text(encoding="utf-8").split("\n\n"))), encoding="utf-8")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli([*phase2, "--data.init_args.paths", f"[{other}]", "--data.init_args.max_seq_len", "128", *fit300])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1
    assert err[0].startswith("cvfp: error: the data's tokenizer is not the one Phase 1 was trained with")
    assert sorted(p.name for p in (logs / "phase2").iterdir()) == ["version_0"]  # the refused run left no folder
    assert _file_digests(phase1) == before


def test_a_phase2_checkpoint_whose_context_block_was_altered_is_refused(tmp_path):
    model = Phase2LM(vocab_size=V, phase1_checkpoint=str(phase1_checkpoint(tmp_path / "p1.ckpt", V)))
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["phase1"]["checkpoint"] == str(tmp_path / "p1.ckpt")
    rebuilt = Phase2LM(vocab_size=V, **{k: v for k, v in checkpoint["hyper_parameters"].items() if k != "vocab_size"})
    rebuilt.on_load_checkpoint(checkpoint)  # the recorded digest matches
    checkpoint["state_dict"]["lm.updater.linears.0.state.weight"] = \
        checkpoint["state_dict"]["lm.updater.linears.0.state.weight"] + 1e-3
    with pytest.raises(CVFPUserError, match="not the Phase 1 model it records") as info:
        rebuilt.on_load_checkpoint(checkpoint)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_the_seeds_tied_head_starts_at_a_sane_loss_on_real_text(tmp_path, corpus):
    """phase2_seed.yaml's settings (head tied to a frozen random 768-dim embedding) on English text:
    the first loss is near ln V, not hundreds of nats, and two epochs train without a false fault."""
    from helpers.cli import read_scalars

    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V, embedding={"embed_dim": 768},
                             context={"updater": "residual", "context_dim": 768, "num_layers": 1,
                                      "token_input_all_layers": False})
    run_cli(["fit", "--config", str(CONFIGS / "phase2_seed.yaml"), *QUIET, "--trainer.max_epochs", "2",
             "--model.init_args.phase1_checkpoint", str(ckpt), "--model.init_args.cache", "off",
             "--data", "cvfp_lightning.data.TextDataModule", "--data.init_args.paths", f"[{corpus}]",
             "--data.init_args.sequences", "samples", "--data.init_args.max_seq_len", "512",
             "--data.init_args.chunk_size", "1024", "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    scalars = read_scalars(tmp_path / "logs")
    losses = [v for _, v in sorted(scalars["train/loss"])]
    assert losses[0] < 2 * math.log(V), losses[:3]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert len(scalars["val/loss"]) == 2  # both epochs ran and validated


def test_guard_judges_losses_not_an_overflowing_perplexity():
    from cvfp_lightning.callbacks import NonFiniteGuard, TrainingDiverged

    class Trainer:
        current_epoch, global_step, checkpoint_callback = 0, 15, None
        callback_metrics = {"train/loss": torch.tensor(130.0), "train/ppl": torch.tensor(float("inf"))}

    NonFiniteGuard().on_train_epoch_end(Trainer(), None)  # exp(130) overflows float32: no fault
    Trainer.callback_metrics = {"train/cvfp_loss": torch.tensor(float("nan"))}
    with pytest.raises(TrainingDiverged, match="train/cvfp_loss = nan at epoch 0, step 15"):
        NonFiniteGuard().on_train_epoch_end(Trainer(), None)
