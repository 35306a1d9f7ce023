"""A trained model leaves the project: self-contained checkpoints, ``cvfp export`` (Hugging Face-style
folder, ``from_pretrained``), ``cvfp evaluate`` of whole files, ``cvfp generate``, and their bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import ANY

import pytest
import torch
import torch.nn.functional as F

from cvfp_lightning.data import load_tokenizer
from cvfp_lightning.data.snapshot import find_data_snapshot, restore_tokenizer
from cvfp_lightning.data.tokenizer import tokenizer_fingerprint
from cvfp_lightning.errors import CVFPUserError
from cvfp_lightning.export import export_checkpoint, load_model
from cvfp_lightning.generation import check_sampling, decode, logits_warpers, sample_next
from cvfp_lightning.hub import BaselineModel, CVFPModel, load_exported
from cvfp_lightning.modules import BaselineLM, Phase2LM
from helpers.cli import CONFIGS, ROOT, cli_error, run_cli
from helpers.lm import phase1_checkpoint, text_data, trainer

V = 4096
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _corpus(folder: Path, paragraphs: int = 24, chars: int = 700) -> Path:
    text = (ROOT / "cvfp_lightning" / "data" / "bundled" / "pydoc_topics.txt").read_text(encoding="utf-8")
    parts = [p for p in text.split("\n\n") if p.strip()][:paragraphs]
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(p[:chars] for p in parts) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Checkpoints (as Lightning writes them, data module state included) of a few steps of training:
    Phase 2 with a frozen zero-initialised head, Phase 2 with a tied head and a trained embedding, the same
    with a token history of 2 ids and a continuous cache of 64 positions, a GRU."""
    root = tmp_path_factory.mktemp("export")
    corpus = _corpus(root)
    p1 = str(phase1_checkpoint(root / "p1" / "checkpoints" / "last.ckpt", V))
    makers = {"frozen": lambda: Phase2LM(vocab_size=V, phase1_checkpoint=p1, cache="off", lr=0.01),
              "tied": lambda: Phase2LM(vocab_size=V, phase1_checkpoint=p1, cache="off", weight_tying=True,
                                       freeze_embedding=False, lr=0.01),
              "history": lambda: Phase2LM(vocab_size=V, phase1_checkpoint=p1, cache="off", weight_tying=True,
                                          freeze_embedding=False, lr=0.01, token_history=2,
                                          continuous_cache={"size": 64, "theta": 5.0, "weight": 0.3}),
              "gru": lambda: BaselineLM(vocab_size=V, arch="gru", hidden_dim=16, lr=0.01)}
    out = {"corpus": corpus, "root": root}
    for name, make in makers.items():
        torch.manual_seed(0)
        module, t = make(), trainer(max_steps=3, default_root_dir=root)
        t.fit(module, text_data(corpus, chunk_size=256, seq_len=64))
        out[name] = root / name / "checkpoints" / "last.ckpt"
        t.save_checkpoint(out[name])
    return out


@pytest.fixture(scope="module")
def exports(runs) -> dict[str, Path]:
    return {name: export_checkpoint(runs[name], runs["root"] / "exports" / name)
            for name in ("frozen", "tied", "history", "gru")}


# ---- self-contained checkpoints -------------------------------------------------------------------
def test_checkpoints_carry_the_tokenizer_and_the_arrangement_of_text(runs):
    ckpt = torch.load(runs["frozen"], weights_only=True)
    snapshot = find_data_snapshot(ckpt)
    assert snapshot["datamodule"] == "TextDataModule"
    assert snapshot["arrangement"] == {"sample_by": "paragraph", "sequences": "samples", "max_seq_len": 128,
                                       "add_eos": True, "seq_len": 64, "chunk_size": 256, "batch_size": 8}
    assert set(snapshot["tokenizer"]["files"]) >= {"tokenizer.json", "tokenizer_config.json"}
    rebuilt, bundled = restore_tokenizer(snapshot["tokenizer"]), load_tokenizer(None)
    assert tokenizer_fingerprint(rebuilt) == tokenizer_fingerprint(bundled) == snapshot["tokenizer"]["fingerprint"]
    text = "The for statement is used to iterate over the elements of a sequence."
    assert rebuilt(text)["input_ids"] == bundled(text)["input_ids"]
    assert rebuilt.eos_token_id == bundled.eos_token_id


def test_a_tampered_tokenizer_snapshot_is_refused(runs):
    snapshot = find_data_snapshot(torch.load(runs["frozen"], weights_only=True))["tokenizer"]
    with pytest.raises(CVFPUserError, match="leaves its folder"):
        restore_tokenizer({**snapshot, "files": {"../evil.json": "{}"}})
    with pytest.raises(CVFPUserError, match="fingerprint mismatch"):
        restore_tokenizer({**snapshot, "fingerprint": "0" * 64})


# ---- export and from_pretrained ----------------------------------------------------------------------
def test_the_export_folder_is_a_hugging_face_folder(exports, runs):
    folder = exports["frozen"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["cvfp_export"]["model"] == "cvfp" and config["cvfp_export"]["format"] == 1
    assert config["context"]["context_dim"] == 16 and config["vocab_size"] == V and config["weight_tying"] is False
    assert config["cvfp_export"]["arrangement"]["sequences"] == "samples"
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: cvfp_lightning" in card
    assert "# CVFP language model (Phase 2)" in card and "`residual` updater, 2 layers, context 16 dims" in card
    assert "Head: Linear(E, V), zero-initialised" in card and "4096 ids" in card
    assert "BaselineModel.from_pretrained" in (exports["gru"] / "README.md").read_text()
    assert not list(runs["root"].glob("exports/.*"))  # no temporary folder left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {oct(0o666 & ~umask)}  # readable as shared


@pytest.mark.parametrize("name", ["frozen", "tied", "history"])
def test_exported_cvfp_model_gives_the_checkpoints_logits(exports, runs, name):
    reference = Phase2LM.load_from_checkpoint(runs[name], weights_only=True).lm.eval()
    model = CVFPModel.from_pretrained(exports[name])
    assert isinstance(model, CVFPModel) and not model.training
    assert model.token_history == reference.token_history == (2 if name == "history" else 0)
    cache = model.continuous_cache
    assert cache == reference.continuous_cache and (cache.to_dict() if cache else None) == \
        ({"size": 64, "theta": 5.0, "weight": 0.3} if name == "history" else None)
    ids = torch.tensor([[5, 17, 200, 3, 999, 4095]])
    s_ref, s_new = reference.start_state(1), model.start_state(1)
    for t in range(ids.shape[1]):
        s_ref, logits_ref = reference.read(s_ref, ids[:, t:t + 1])
        s_new, logits_new = model.read(s_new, ids[:, t:t + 1])
        assert torch.equal(s_ref[0], s_new[0]) and torch.equal(logits_ref, logits_new)
    assert s_new[1].tolist() == [[4095, 999][:model.token_history]]  # the last ids read, newest first
    card = (exports[name] / "README.md").read_text()
    assert ("h_1..h_2] + b_0))` over the embeddings `h_j` of the 2 ids before" in card) == (name == "history")
    assert ("`p = 0.7 softmax(head(t_i)) + 0.3 p_cache`, where `p_cache` puts `softmax_j(5 cos(t_i, t_j))` on the id "
            "after each of the last 64 positions" in card) == (name == "history")
    assert logits_ref.abs().sum() > 0  # trained: not the zero-initialised head any more
    assert tokenizer_fingerprint(model.tokenizer) == tokenizer_fingerprint(load_tokenizer(None))


def test_a_tied_head_stays_tied_after_loading(exports):
    from safetensors import safe_open

    model = load_exported(exports["tied"])
    assert model.weight_tying and model.head.weight is model.embedding.embed.weight
    assert model.head.weight.data_ptr() == model.embedding.weight.data_ptr()
    assert model.context_embedding is not None  # the trained embedding; the contexts read Phase 1's copy
    assert not torch.equal(model.context_embedding.weight, model.embedding.weight)
    with safe_open(exports["tied"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert len({"head.weight", "embedding.embed.weight"} & keys) == 1  # stored once


def test_exported_baseline_gives_the_checkpoints_logits_and_generates(exports, runs):
    reference = BaselineLM.load_from_checkpoint(runs["gru"], weights_only=True).eval()
    model = load_exported(exports["gru"])
    assert isinstance(model, BaselineModel) and model.arch == "gru"
    ids = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(0))
    assert torch.equal(reference(ids), model(ids))
    # the carried recurrent state of generation continues the whole-sequence forward
    state, last = model.step(None, ids[:1, :20])
    state, nxt = model.step(state, ids[:1, 20:21])
    torch.testing.assert_close(nxt, model(ids[:1, :21])[:, -1])
    torch.testing.assert_close(last, model(ids[:1, :20])[:, -1])
    greedy = model.generate(ids[0, :5], 6, greedy=True)
    state, logits = model.step(None, ids[:1, :5])
    by_hand = []
    for _ in range(6):
        by_hand.append(int(logits.argmax()))
        state, logits = model.step(state, torch.tensor([[by_hand[-1]]]))
    assert greedy.tolist() == by_hand


def test_a_transformer_baseline_generates_past_its_window():
    torch.manual_seed(0)
    model = BaselineModel("transformer", 50, 8, num_layers=1, num_heads=2, max_len=6).eval()
    out = model.generate(torch.tensor([1, 2, 3, 4, 5]), 4, greedy=True)  # 9 ids > max_len: a sliding window
    ids = [1, 2, 3, 4, 5]
    for _ in range(4):
        ids.append(int(model(torch.tensor([ids[-6:]]))[0, -1].argmax()))
    assert out.tolist() == ids[5:]


# ---- generation -----------------------------------------------------------------------------------------
def test_sampling_goes_through_the_transformers_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = logits_warpers(0.7, 5, 0.9)
    assert [type(w) for w in warpers] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]
    assert len(logits_warpers(1.0, None, None)) == 0 and len(logits_warpers(1.0, None, 1.0)) == 0
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(3, 1, dtype=torch.long)
    assert torch.equal(sample_next(logits, ids, greedy=True), logits.argmax(-1))
    # top_k = 1 and a vanishing top_p leave only the most likely id
    for warp in (logits_warpers(top_k=1), logits_warpers(top_p=1e-6)):
        assert torch.equal(sample_next(logits, ids, warp, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))
    # a seeded draw is the multinomial draw of the warped distribution
    warped = torch.softmax(warpers(ids, logits), -1)
    expected = torch.multinomial(warped, 1, generator=torch.Generator().manual_seed(3)).reshape(-1)
    assert torch.equal(sample_next(logits, ids, warpers, generator=torch.Generator().manual_seed(3)), expected)
    allowed = torch.topk(logits, 5).indices
    draws = torch.stack([sample_next(logits, ids, logits_warpers(top_k=5), generator=torch.Generator().manual_seed(s))
                         for s in range(20)], 1)
    assert all(set(draws[r].tolist()) <= set(allowed[r].tolist()) for r in range(3))


def test_decode_is_deterministic_with_a_seed():
    table = torch.randn(30, 30, generator=torch.Generator().manual_seed(0))

    def step(state, ids):  # a bigram model: the logits of the last id
        return state, table[ids[:, -1]]

    prompt = torch.tensor([1, 2])
    a = decode(step, None, prompt, 12, temperature=0.9, top_k=10, top_p=0.95, seed=5)
    b = decode(step, None, prompt, 12, temperature=0.9, top_k=10, top_p=0.95, seed=5)
    c = decode(step, None, prompt, 12, temperature=0.9, top_k=10, top_p=0.95, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = decode(step, None, prompt, 5, greedy=True, seed=5)
    expected, last = [], 2
    for _ in range(5):
        last = int(table[last].argmax())
        expected.append(last)
    assert greedy.tolist() == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature=0.0 is invalid"),
    ({"temperature": -1}, "temperature=-1 is invalid"),
    ({"top_k": 0}, "top_k=0 is invalid"),
    ({"top_p": 0.0}, r"top_p=0.0 is invalid: expected a number in \(0, 1\]"),
    ({"top_p": 1.5}, "top_p=1.5 is invalid"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid"),
])
def test_bad_sampling_options_are_one_clear_error(kwargs, message):
    with pytest.raises(CVFPUserError, match=message) as info:
        check_sampling(**kwargs)
    assert "\n" not in str(info.value)


def test_generate_from_the_folder_equals_the_checkpoint(exports, runs, tmp_path, capsys):
    prompt = ["--prompt", "The for statement", "--max_new_tokens", "8"]
    outputs = {}
    for source in ("folder", "ckpt"):
        for mode, extra in (("greedy", ["--greedy", "true"]),
                            ("sampled", ["--temperature", "0.8", "--top_k", "40", "--top_p", "0.95", "--seed", "3"])):
            out = tmp_path / f"{source}_{mode}.jsonl"
            model = exports["frozen"] if source == "folder" else runs["frozen"]
            run_cli(["generate", str(model), *prompt, *extra, "--out", str(out)])
            outputs[source, mode] = [json.loads(line) for line in out.read_text().splitlines()]
    assert outputs["folder", "greedy"] == outputs["ckpt", "greedy"]
    assert outputs["folder", "sampled"] == outputs["ckpt", "sampled"]
    assert outputs["folder", "greedy"][0]["new_tokens"] == 8
    assert outputs["folder", "sampled"][0]["ids"] != outputs["folder", "greedy"][0]["ids"]
    # the module's generate (cvfp predict's implementation) gives the same ids
    lm = Phase2LM.load_from_checkpoint(runs["frozen"], weights_only=True).lm
    ids = torch.tensor(load_tokenizer(None)("The for statement", add_special_tokens=False)["input_ids"])
    assert lm.generate(ids, 8, 0.8, 40, top_p=0.95, seed=3).tolist() == outputs["folder", "sampled"][0]["ids"]
    printed = capsys.readouterr().out
    assert "--- prompt: 'The for statement' (8 new tokens)" in printed


def test_generate_reads_with_the_exported_continuous_cache_or_without_it(exports, tmp_path, capsys):
    """A model exported with a cache generates with it (its memory: the prompt and the ids so far);
    ``--continuous_cache.weight 0`` generates with the model alone, ``.size`` changes the memory."""
    model = load_exported(exports["history"])
    prompt = "The for statement is used to iterate over the for statement"
    ids = torch.tensor(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    sampled = ["--temperature", "1.0", "--seed", "5"]
    records = {}
    for name, extra in (("cache", []), ("alone", ["--continuous_cache.weight", "0"]),
                        ("short", ["--continuous_cache.size", "2"])):
        out = tmp_path / f"{name}.jsonl"
        run_cli(["generate", str(exports["history"]), "--prompt", prompt, "--max_new_tokens", "12", *sampled, *extra,
                 "--out", str(out)])
        records[name] = json.loads(out.read_text())["ids"]
    assert records["cache"] == model.generate(ids, 12, 1.0, seed=5).tolist()
    cache, model.continuous_cache = model.continuous_cache, None
    assert records["alone"] == model.generate(ids, 12, 1.0, seed=5).tolist()
    model.continuous_cache = dataclasses.replace(cache, size=2)
    assert records["short"] == model.generate(ids, 12, 1.0, seed=5).tolist()
    assert records["cache"] != records["alone"]
    assert "--continuous_cache.* is for CVFP models" in cli_error(
        ["generate", str(exports["gru"]), "--prompt", "x", "--continuous_cache.weight", "0"], capsys)


def test_generate_reads_prompts_from_stdin(exports, monkeypatch, capsys):
    import io

    class Stdin:
        buffer = io.BytesIO("A class definition\n\n  \nThe while statement\n".encode())

    monkeypatch.setattr(sys, "stdin", Stdin)
    run_cli(["generate", str(exports["gru"]), "--prompt_file", "-", "--max_new_tokens", "3", "--greedy", "true"])
    out = capsys.readouterr().out
    assert "--- prompt: 'A class definition'" in out and "--- prompt: 'The while statement'" in out


# ---- evaluate ---------------------------------------------------------------------------------------------
@torch.no_grad()
def _by_hand_nll(model, seqs) -> tuple[float, int]:
    """Summed next-token CE over every sequence, the context (and the ids before) carried token by token from the
    start (generation's read); a continuous cache's memory carried from sequence to sequence (every position read,
    the last of a sequence too: it has no next id to score, but it is in the memory's window)."""
    total, count = 0.0, 0
    state = model.start_state(1)
    for s in range(seqs.num_sequences):
        ids = seqs.sequence(s)
        state = model.next_sequence(state)
        for t in range(len(ids)):
            state, logits = model.read(state, ids[t:t + 1].reshape(1, 1))
            if t + 1 < len(ids):
                total += float(F.cross_entropy(logits, ids[t + 1:t + 2], reduction="sum"))
                count += 1
    return total, count


@pytest.mark.parametrize("name", ["frozen", "history"])
def test_evaluate_scores_every_token_after_the_first_of_each_sequence(exports, runs, tmp_path, capsys, name):
    """Position batches in order (contexts of a sequential pass, the ids before from the data layer) score
    exactly what reading each sequence token by token scores."""
    from cvfp_lightning.evaluate import evaluation_data

    text = tmp_path / "text.txt"
    paragraphs = [p for p in runs["corpus"].read_text(encoding="utf-8").split("\n\n") if p.strip()][:5]
    text.write_text("\n\n".join(p[:300] for p in paragraphs), encoding="utf-8")
    out = tmp_path / "result.json"
    capsys.readouterr()
    run_cli(["evaluate", str(exports[name]), "--text", str(text), "--out", str(out), *QUIET,
             "--trainer.accelerator", "cpu"])
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result  # printed and written
    model = load_exported(exports[name])
    dm = evaluation_data(model, [text])
    dm.setup()
    seqs = dm.val_sequences
    assert result["sequences"] == seqs.num_sequences >= 5 and result["positions"] == seqs.num_tokens
    assert result["tokens"] == seqs.num_tokens - seqs.num_sequences
    assert result["bytes"] == sum(len(p[:300].encode("utf-8")) for p in paragraphs)
    nll, count = _by_hand_nll(model, seqs)
    assert count == result["tokens"]
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["bpb"] == pytest.approx(nll / (math.log(2) * result["bytes"]), rel=1e-5)
    assert 0 <= result["acc"] <= 1 and result["arrangement"]["max_seq_len"] == 128
    # the checkpoint itself evaluates to the same numbers
    run_cli(["evaluate", str(runs[name]), "--text", str(text), "--out", str(tmp_path / "ckpt.json"), *QUIET,
             "--trainer.accelerator", "cpu"])
    again = json.loads((tmp_path / "ckpt.json").read_text())
    assert {k: again[k] for k in ("loss", "ppl", "acc", "bpb", "tokens")} == \
        {k: result[k] for k in ("loss", "ppl", "acc", "bpb", "tokens")}
    assert result["continuous_cache"] == ({"size": 64, "theta": 5.0, "weight": 0.3} if name == "history" else None)
    if name == "history":  # --continuous_cache.weight 0: the model alone, as read without a cache
        run_cli(["evaluate", str(exports[name]), "--text", str(text), "--out", str(tmp_path / "alone.json"), *QUIET,
                 "--trainer.accelerator", "cpu", "--continuous_cache.weight", "0"])
        alone = json.loads((tmp_path / "alone.json").read_text())
        model.continuous_cache = None
        nll_alone, _ = _by_hand_nll(model, seqs)
        assert alone["loss"] == pytest.approx(nll_alone / count, rel=1e-5) and alone["tokens"] == count
        assert alone["continuous_cache"]["weight"] == 0.0 and alone["loss"] != pytest.approx(result["loss"], rel=1e-3)


def test_validation_scores_with_the_continuous_cache_over_the_split_in_order(runs):
    """Phase 2's val/* of a model with a cache are the split read in order, the memory crossing chunks of
    positions and sequences: equal to reading it token by token."""
    module = Phase2LM.load_from_checkpoint(runs["history"], weights_only=True)
    data = text_data(runs["corpus"], chunk_size=32, seq_len=64)  # many chunks, each shorter than the memory
    metrics = trainer(default_root_dir=runs["root"]).validate(module, data, verbose=False)[0]
    nll, count = _by_hand_nll(module.lm.eval(), data.val_sequences)
    assert metrics["val/tokens"] == count > 64
    assert metrics["val/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["val/bpb"] == pytest.approx(nll / (math.log(2) * data.val_sequences.num_bytes), rel=1e-5)


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.fixture
def bad_files(tmp_path, runs) -> dict[str, str]:
    files = {"latin1": tmp_path / "latin1.txt", "empty": tmp_path / "empty.txt", "blank": tmp_path / "blank.txt",
             "notexport": tmp_path / "notexport", "prompts": tmp_path / "prompts.txt"}
    files["latin1"].write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    files["empty"].write_bytes(b"")
    files["blank"].write_text("\n \n\t\n", encoding="utf-8")
    files["notexport"].mkdir()
    (files["notexport"] / "config.json").write_text('{"hidden_size": 8}')
    files["prompts"].write_text("\n   \n", encoding="utf-8")
    return {**{k: str(v) for k, v in files.items()}, "p1": str(runs["root"] / "p1" / "checkpoints" / "last.ckpt"),
            "corpus": str(runs["corpus"]), "tmp": str(tmp_path)}


@pytest.mark.parametrize("args, message", [
    (["export", "--ckpt_path", "{tmp}/nope.ckpt", "--out_dir", "{tmp}/x"], "--ckpt_path '.*nope.ckpt' does not exist"),
    (["export", "--ckpt_path", "{p1}", "--out_dir", "{tmp}/x"], "is a Phase 1 checkpoint: it has no head"),
    (["export", "--ckpt_path", "{latin1}", "--out_dir", "{tmp}/x"], "is not a readable cvfp_lightning file"),
    (["export", "--ckpt_path", "{ckpt}", "--out_dir", "{notexport}"], "exists and is not empty"),
    (["export", "--ckpt_path", "{ckpt}", "--out_dir", "{notexport}", "--overwrite", "true"],
     "is not a cvfp_lightning export: it is not replaced"),
    (["export", "--out_dir", "{tmp}/x"], "ckpt_path"),
    (["evaluate", "{tmp}/missing", "--text", "{corpus}"], "does not exist"),
    (["evaluate", "{notexport}", "--text", "{corpus}"], "is not a cvfp_lightning export"),
    (["evaluate", "{tmp}", "--text", "{corpus}"], "no config.json"),
    (["evaluate", "{export}", "--text", "{latin1}"], r"--text '.*latin1.txt' is not UTF-8 text \(byte 3"),
    (["evaluate", "{export}", "--text", "{empty}"], "is empty"),
    (["evaluate", "{export}", "--text", "{corpus}", "{blank}"], "blank.txt' is empty"),
    (["evaluate", "{export}", "--text", "{tmp}/none.txt"], "does not exist or is not a file"),
    (["generate", "{export}", "--prompt", ""], "--prompt '' .* is empty"),
    (["generate", "{export}"], "no prompt: pass --prompt"),
    (["generate", "{export}", "--prompt_file", "{prompts}"], "holds no prompt"),
    (["generate", "{export}", "--prompt_file", "{latin1}"], "is not UTF-8 text"),
    (["generate", "{export}", "--prompt", "hi", "--temperature", "0"], "--temperature=0.0 is invalid"),
    (["generate", "{export}", "--prompt", "hi", "--top_k", "0"], "--top_k=0 is invalid"),
    (["generate", "{export}", "--prompt", "hi", "--top_p", "1.5"], "--top_p=1.5 is invalid"),
    (["generate", "{export}", "--prompt", "hi", "--max_new_tokens", "0"], "--max_new_tokens=0 is invalid"),
    (["generate", "{ckpt_p1}", "--prompt", "hi"], "is a Phase 1 checkpoint"),
])
def test_bad_input_is_one_line(args, message, bad_files, exports, runs, capsys):
    fmt = {**bad_files, "export": str(exports["frozen"]), "ckpt": str(runs["frozen"]), "ckpt_p1": bad_files["p1"]}
    line = cli_error([a.format(**fmt) for a in args], capsys)
    assert line.startswith("cvfp: error:")
    import re

    assert re.search(message, line), line


def test_an_incomplete_or_edited_export_is_refused(exports, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exports["frozen"], broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CVFPUserError, match="has no model.safetensors"):
        load_model(broken)
    shutil.copy(exports["gru"] / "model.safetensors", broken / "model.safetensors")  # weights of another model
    with pytest.raises(CVFPUserError, match="exported weights do not load"):
        load_model(broken)
    shutil.copy(exports["frozen"] / "model.safetensors", broken / "model.safetensors")
    (broken / "tokenizer.json").write_text((exports["frozen"] / "tokenizer.json").read_text().replace(
        '"<|endoftext|>"', '"<|end|>"'))
    with pytest.raises(CVFPUserError, match="not the ones the model was exported with"):
        load_model(broken)


def test_export_overwrites_only_an_earlier_export(exports, runs):
    before = (exports["frozen"] / "model.safetensors").read_bytes()
    export_checkpoint(runs["frozen"], exports["frozen"], overwrite=True)
    assert (exports["frozen"] / "model.safetensors").read_bytes() == before  # same checkpoint, same bytes


# ---- output paths: checked before the work, never a user's file replaced -------------------------------
PRECIOUS = "A researcher's notes.\nNot JSON, not to be lost.\n"


def _text(tmp_path: Path, runs) -> Path:
    text = tmp_path / "text.txt"
    paragraphs = [p for p in runs["corpus"].read_text(encoding="utf-8").split("\n\n") if p.strip()][:3]
    text.write_text("\n\n".join(p[:200] for p in paragraphs), encoding="utf-8")
    return text


OUTPUT_CASES = [
    ("{tmp}/adir", "is a folder: give the path of a file"),
    ("/proc/cvfp_out", r"cannot be written: no file can be made in '/proc'"),
    ("{tmp}/precious.txt/out", r"cannot be written: '.*precious.txt' is a file, not a folder"),
]


@pytest.mark.parametrize("command, target, message", [
    *[("evaluate", t, m) for t, m in OUTPUT_CASES], ("evaluate", "{tmp}/precious.txt", "is not an earlier evaluation"),
    *[("generate", t, m) for t, m in OUTPUT_CASES], ("generate", "{tmp}/precious.txt", "is not earlier generations"),
    *[("export", t, m) for t, m in OUTPUT_CASES[1:]], ("export", "{tmp}/precious.txt", "is a file: give a folder"),
])
def test_a_bad_output_path_is_one_line_before_the_work(command, target, message, exports, runs, tmp_path, capsys,
                                                       monkeypatch):
    import re

    import cvfp_lightning.export as export

    def no_work(*args, **kwargs):
        raise AssertionError("the output path is checked before the model loads")

    monkeypatch.setattr(export, "load_model", no_work)
    monkeypatch.setattr(export, "model_from_checkpoint", no_work)
    (tmp_path / "adir").mkdir()
    (tmp_path / "precious.txt").write_text(PRECIOUS, encoding="utf-8")
    target = target.format(tmp=tmp_path)
    if command == "export":
        args = ["export", "--ckpt_path", str(runs["frozen"]), "--out_dir", target]
    elif command == "evaluate":
        args = ["evaluate", str(exports["frozen"]), "--text", str(_text(tmp_path, runs)), "--out", target]
    else:
        args = ["generate", str(exports["frozen"]), "--prompt", "hi", "--out", target]
    line = cli_error(args, capsys)
    assert line.startswith("cvfp: error: --out") and re.search(message, line), line
    assert (tmp_path / "precious.txt").read_bytes() == PRECIOUS.encode()
    assert sorted(p.name for p in (tmp_path / "adir").iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or probe file left


def test_out_replaces_only_an_earlier_output_of_the_same_command(exports, runs, tmp_path, capsys):
    text = _text(tmp_path, runs)
    evaluate = ["evaluate", str(exports["gru"]), "--text", str(text), *QUIET, "--trainer.accelerator", "cpu"]
    generate = ["generate", str(exports["gru"]), "--prompt", "The for statement", "--max_new_tokens", "3"]
    os.chdir(tmp_path)  # the default --out, evaluation.json, is in the working directory
    try:
        run_cli(evaluate)
        first = json.loads((tmp_path / "evaluation.json").read_text())
        (tmp_path / "evaluation.json").write_text(json.dumps({**first, "loss": -1.0}))
        run_cli(evaluate)  # a repeated evaluation replaces its own evaluation.json
    finally:
        os.chdir(ROOT)
    assert json.loads((tmp_path / "evaluation.json").read_text()) == {**first, "seconds": ANY}
    (tmp_path / "empty.json").write_bytes(b"")  # e.g. from mktemp: nothing in it to lose
    run_cli([*evaluate, "--out", str(tmp_path / "empty.json")])
    assert json.loads((tmp_path / "empty.json").read_text())["tokens"] == first["tokens"]
    # an evaluation is not generations, nor generations an evaluation: each is refused and kept
    line = cli_error([*generate, "--out", str(tmp_path / "evaluation.json")], capsys)
    assert "exists and is not earlier generations" in line
    run_cli([*generate, "--out", str(tmp_path / "g.jsonl")])
    before = (tmp_path / "g.jsonl").read_bytes()
    line = cli_error([*evaluate, "--out", str(tmp_path / "g.jsonl")], capsys)
    assert "exists and is not an earlier evaluation" in line and (tmp_path / "g.jsonl").read_bytes() == before
    run_cli([*generate[:3], "A class definition", "The while statement", *generate[4:], "--out",
             str(tmp_path / "g.jsonl")])  # earlier generations are replaced
    assert [json.loads(line)["prompt"] for line in (tmp_path / "g.jsonl").read_text().splitlines()] == \
        ["A class definition", "The while statement"]
    # JSON lines of something else, or a JSON object of other keys, are a user's files
    for name, content in (("other.jsonl", '{"prompt": "x"}\n'), ("other.json", '{"loss": 1.0}\n')):
        (tmp_path / name).write_text(content)
        cli_error([*(generate if name.endswith("l") else evaluate), "--out", str(tmp_path / name)], capsys)
        assert (tmp_path / name).read_text() == content


def test_a_failed_write_after_the_scoring_is_one_line_and_the_result_is_printed(exports, runs, tmp_path, capsys,
                                                                               monkeypatch):
    import cvfp_lightning.io as io

    monkeypatch.setenv("CVFP_PROGRESS", "0")  # no tokenisation lines on stderr: the error is its one line

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "atomic_write_text", full)
    out = tmp_path / "result.json"
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(["evaluate", str(exports["gru"]), "--text", str(_text(tmp_path, runs)), "--out", str(out), *QUIET,
                 "--trainer.accelerator", "cpu"])
    captured = capsys.readouterr()
    assert info.value.code == 2 and captured.err.strip().splitlines() == [
        f"cvfp: error: --out {str(out)!r} could not be written (No space left on device); the result is printed above."]
    assert json.loads(captured.out)["tokens"] > 0 and not out.exists()  # the scoring is not lost
    line = cli_error(["generate", str(exports["gru"]), "--prompt", "hi", "--max_new_tokens", "2", "--out", str(out)],
                     capsys)
    assert line.endswith("could not be written (No space left on device); the continuations are printed above.")


def test_export_overwrite_refuses_a_folder_with_a_users_files(exports, runs, tmp_path, capsys):
    import shutil

    earlier = tmp_path / "mine"
    shutil.copytree(exports["frozen"], earlier)
    (earlier / "my_notes.txt").write_text(PRECIOUS)
    (earlier / "sub").mkdir()
    (earlier / "sub" / "f").write_text("f\n")
    before = {p.relative_to(earlier): p.read_bytes() for p in earlier.rglob("*") if p.is_file()}
    line = cli_error(["export", "--ckpt_path", str(runs["gru"]), "--out_dir", str(earlier), "--overwrite", "true"],
                     capsys)
    assert f"--out_dir {str(earlier)!r} holds my_notes.txt, sub/, which an export does not write" in line
    assert {p.relative_to(earlier): p.read_bytes() for p in earlier.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_failed_swap_of_export_folders_keeps_the_earlier_export(exports, runs, tmp_path, capsys, monkeypatch):
    import shutil

    earlier = tmp_path / "mine"
    shutil.copytree(exports["frozen"], earlier)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    replace = os.replace

    def failing(src, dst):
        if str(src).endswith(".tmp"):  # the new export's move into place
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    line = cli_error(["export", "--ckpt_path", str(runs["gru"]), "--out_dir", str(earlier), "--overwrite", "true"],
                     capsys)
    assert line.endswith("could not be written (Input/output error); nothing there was changed.")
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


# ---- train -> export -> evaluate -> generate through the CLI ---------------------------------------------
def _validation_text(corpus: Path, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """The validation samples of TextDataModule's split of ``corpus`` (``[train | val | test]`` of its
    paragraphs, the shipped configs' fractions), joined by blank lines, so that reading the file paragraph
    by paragraph gives back exactly those samples."""
    from cvfp_lightning.data import TextDataModule

    rows = TextDataModule(paths=[str(corpus)]).load_texts()["text"]
    k_val, k_test = max(1, round(val_fraction * len(rows))), max(1, round(test_fraction * len(rows)))
    return "\n\n".join(rows[len(rows) - k_test - k_val:len(rows) - k_test])


@pytest.mark.slow
@pytest.mark.xdist_group("ddp")  # it evaluates on two processes too: one DDP run at a time under xdist
def test_train_export_evaluate_generate(tmp_path, corpus, capsys):
    logs = tmp_path / "logs"
    data = ["--data.init_args.paths", f"[{corpus}]", "--data.init_args.max_seq_len", "128"]
    run_cli(["fit", "--config", str(CONFIGS / "phase1.yaml"), *data, *QUIET, "--trainer.max_epochs", "1",
             "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "2",
             "--model.init_args.embedding.embed_dim", "16", "--trainer.logger.init_args.save_dir", str(logs)])
    phase2 = ["--config", str(CONFIGS / "phase2.yaml"), *data, *QUIET, "--data.init_args.chunk_size", "512",
              "--model.init_args.phase1_checkpoint", str(logs / "phase1/version_0/checkpoints/last.ckpt"),
              "--model.init_args.lr", "0.01", "--trainer.logger.init_args.save_dir", str(logs)]
    run_cli(["fit", *phase2, "--trainer.max_epochs", "2"])
    gru = ["--config", str(CONFIGS / "baseline_gru.yaml"), *data, *QUIET, "--model.init_args.match_params", "null",
           "--model.init_args.hidden_dim", "16", "--data.init_args.seq_len", "64",
           "--trainer.logger.init_args.save_dir", str(logs)]
    run_cli(["fit", *gru, "--trainer.max_epochs", "1"])
    val_text = tmp_path / "validation.txt"
    val_text.write_text(_validation_text(corpus), encoding="utf-8")

    for name in ("phase2", "baseline_gru"):
        run_dir = logs / name / "version_0"
        summary = json.loads((run_dir / "summary.json").read_text())
        export = tmp_path / "exports" / name
        run_cli(["export", "--ckpt_path", str(run_dir / "checkpoints" / "best.ckpt"), "--out_dir", str(export)])
        card = (export / "README.md").read_text()
        assert f"| val | {summary['val/loss']:.4f} | {summary['val/ppl']:.4f}" in card
        assert "## Training" in card and "class_path: cvfp_lightning.data.TextDataModule" in card
        out = tmp_path / f"{name}.json"
        run_cli(["evaluate", str(export), "--text", str(val_text), "--out", str(out), *QUIET,
                 "--trainer.accelerator", "cpu"])
        result = json.loads(out.read_text())
        assert result["positions"] == summary["val_tokens"]
        for metric in ("loss", "ppl", "acc", "bpb"):
            assert result[metric] == pytest.approx(summary[f"val/{metric}"], rel=1e-5, abs=1e-6), (name, metric)
        if name == "phase2":
            assert "## Phase 1 (fixed-point learning)" in card and "`train/convergence_rate`:" in card
            phase2_export, phase2_result, best = export, result, run_dir / "checkpoints" / "best.ckpt"

    # two processes (Lightning's ddp launcher re-runs the command) give the one-process numbers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out2 = tmp_path / "phase2_ddp.json"
    proc = subprocess.run([sys.executable, "-m", "cvfp_lightning.cli", "evaluate", str(phase2_export), "--text",
                           str(val_text), "--out", str(out2), *QUIET, "--trainer.accelerator", "cpu",
                           "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads(out2.read_text())
    assert ddp["devices"] == 2 and ddp["tokens"] == phase2_result["tokens"]
    for metric in ("loss", "ppl", "acc", "bpb"):
        assert ddp[metric] == pytest.approx(phase2_result[metric], rel=1e-5), metric

    # cvfp predict (the checkpoint) and cvfp generate (the folder): the same continuations, with the default
    # seeds too (phase2.yaml samples at temperature 0.8, top-k 40)
    for extra in ([["--greedy", "true"], ["--model.init_args.greedy", "true"]],
                  [["--temperature", "0.8", "--top_k", "40"], []],
                  [["--temperature", "0.8", "--top_k", "40", "--top_p", "0.9", "--seed", "11"],
                   ["--model.init_args.temperature", "0.8", "--model.init_args.top_k", "40",
                    "--model.init_args.top_p", "0.9", "--model.init_args.seed", "11"]]):
        run_cli(["predict", *phase2, "--ckpt_path", str(best), "--model.init_args.prompts", '["The for statement"]',
                 "--model.init_args.max_new_tokens", "12", *extra[1]])
        predicted = json.loads(sorted(logs.glob("phase2/version_*/generations.jsonl"), key=os.path.getmtime)[-1]
                               .read_text().splitlines()[0])
        out = tmp_path / "generated.jsonl"
        run_cli(["generate", str(phase2_export), "--prompt", "The for statement", "--max_new_tokens", "12",
                 *extra[0], "--out", str(out)])
        generated = json.loads(out.read_text().splitlines()[0])
        assert generated == predicted


def test_a_checkpoint_without_a_tokenizer_exports_with_tokenizer_given(runs, tmp_path, capsys):
    from cvfp_lightning.data.snapshot import SNAPSHOT_KEY

    ckpt = torch.load(runs["gru"], weights_only=True)
    for value in ckpt.values():
        if isinstance(value, dict):
            value.pop(SNAPSHOT_KEY, None)  # as written before checkpoints carried it
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    line = cli_error(["export", "--ckpt_path", str(old), "--out_dir", str(tmp_path / "x")], capsys)
    assert "carries no tokenizer" in line and "--tokenizer" in line
    run_cli(["export", "--ckpt_path", str(old), "--out_dir", str(tmp_path / "x"), "--tokenizer", "bundled"])
    model = load_exported(tmp_path / "x")
    assert tokenizer_fingerprint(model.tokenizer) == tokenizer_fingerprint(load_tokenizer(None))
    assert model.arrangement == {}  # unknown: evaluation then reads one sequence per paragraph
