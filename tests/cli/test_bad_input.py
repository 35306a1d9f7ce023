"""Bad input through the real CLI: exit code 2, one line on stderr, no traceback, and no file
of an existing run folder changed (hashed before and after)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import CONFIGS, ROOT, read_scalars, run_cli

P1 = str(CONFIGS / "phase1.yaml")
QUICK = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.init_args.num_samples", "6", "--data.init_args.max_seq_len", "64",
         "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "1",
         "--model.init_args.embedding.embed_dim", "16"]


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory) -> Path:
    """A finished Phase 1 run whose folder must survive every bad input untouched."""
    logs = tmp_path_factory.mktemp("existing") / "logs"
    run_cli(["fit", "--config", P1, *QUICK, "--trainer.max_epochs", "1", "--trainer.callbacks", "[]",
             "--trainer.logger.init_args.save_dir", str(logs)])
    return logs


@pytest.fixture(scope="module")
def files(tmp_path_factory, existing_run) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("na\xefve caf\xe9\n".encode("latin-1") * 20)
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (d / "blank.txt").write_text("\n \n\t\n")
    (d / "garbage.ckpt").write_bytes(os.urandom(4096))
    good = next(existing_run.rglob("last.ckpt"))
    (d / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"weights": torch.zeros(3)}, d / "foreign.ckpt")
    (d / "not_a_tokenizer").mkdir()
    (d / "bad.yaml").write_text("model: [unclosed\n")
    (d / "good.txt").write_text("Some text for the tokenizer.\n\nAnother paragraph of text here.\n")
    return {p.stem: p for p in d.iterdir()} | {"last": good}


# (case id, extra CLI arguments (with {name} = a file of the `files` fixture), expected text of the message)
CASES = [
    ("unknown model key", ["--model.init_args.bogus", "1"], "bogus"),
    ("unknown top-level key", ["--modle.init_args.lr", "1"], "modle"),
    ("wrong type", ["--model.init_args.context.context_dim", "abc"], "context_dim"),
    ("zero context dim", ["--model.init_args.context.context_dim", "0"], "context.context_dim=0"),
    ("negative layers", ["--model.init_args.context.num_layers", "-2"], "context.num_layers=-2"),
    ("dist_reg_weight > 1", ["--model.init_args.dist_reg_weight", "1.5"], "dist_reg_weight=1.5"),
    ("dist_reg_weight < 0", ["--model.init_args.dist_reg_weight", "-0.1"], "dist_reg_weight=-0.1"),
    ("negative lr", ["--model.init_args.lr=-1e-3"], "lr=-0.001"),
    ("unknown mode", ["--model.class_path", "cvfp_lightning.modules.Phase1FixedPoint", "--model.init_args.mode",
                      "serial"], "serial"),
    ("unknown updater", ["--model.init_args.context.updater", "lstm"], "lstm"),
    ("unknown centring", ["--model.init_args.diversity_center", "median"], "median"),
    ("negative max_epochs", ["--trainer.max_epochs", "-5"], "max_epochs"),
    ("unknown strategy", ["--trainer.strategy", "foo"], "trainer: You selected an invalid strategy name"),
    ("unknown accelerator", ["--trainer.accelerator", "foo"], "trainer: You selected an invalid accelerator name"),
    ("abbreviated option (a typo)", ["--trainer.max_epoch", "1"], "Unrecognized arguments: --trainer.max_epoch"),
    ("missing data file", ["--data.init_args.paths", "[/no/such/file.txt]"], "does not exist"),
    ("empty data file", ["--data.init_args.paths", "[{empty}]"], "is empty"),
    ("undecodable text", ["--data.init_args.paths", "[{latin1}]"], "not UTF-8"),
    ("binary file", ["--data.init_args.paths", "[{binary}]"], "not UTF-8"),
    ("whitespace-only file", ["--data.init_args.paths", "[{blank}]"], "no text"),
    ("val_fraction 0", ["--data.init_args.val_fraction", "0"], "val_fraction"),
    ("unknown sequences", ["--data.init_args.sequences", "tokens"], "tokens"),
    ("hub tokenizer offline", ["--data.init_args.tokenizer", "no-such-org/no-such-tokenizer"], "bundled tokenizer"),
    ("missing tokenizer folder", ["--data.init_args.tokenizer", "./no/such/folder"], "does not exist"),
    ("folder that is no tokenizer", ["--data.init_args.tokenizer", "{not_a_tokenizer}"], "could not be loaded"),
    ("missing checkpoint", ["--ckpt_path", "/no/such.ckpt"], "does not exist"),
    ("garbage checkpoint", ["--ckpt_path", "{garbage}"], "not a readable"),
    ("truncated checkpoint", ["--ckpt_path", "{truncated}"], "not a readable"),
    ("foreign checkpoint", ["--ckpt_path", "{foreign}"], "not a Lightning checkpoint"),
    ("changed shape on resume", ["--ckpt_path", "{last}", "--model.init_args.context.context_dim", "24"],
     "context.context_dim: checkpoint 16 vs config 24"),
    ("resume last with nothing to resume", ["--ckpt_path", "last", "--trainer.logger.init_args.name", "nothing"],
     "no last.ckpt"),
    ("unparsable config", ["--config", "{bad}"], "bad.yaml"),
    ("own-text config without the text", ["--config", str(CONFIGS / "text_phase1.yaml")],
     "data.paths is an empty list: give text files (--data.init_args.paths '[my.txt]')"),
    ("tokenwise warmup >= max", ["--model.class_path", "cvfp_lightning.modules.Phase1Tokenwise",
                                 "--model.init_args.warmup_iterations", "5", "--model.init_args.max_inner_iterations",
                                 "5"], "warmup_iterations=5"),
]


@pytest.mark.slow
@pytest.mark.parametrize("case, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, extra, expected, files, existing_run, capsys):
    before = tree_hash(existing_run)
    args = [a.format(**files) for a in extra]
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", P1, *QUICK, "--trainer.logger.init_args.save_dir", str(existing_run), *args])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    print(f"[{case}] {err[0]}")
    assert err[0].startswith("cvfp: error: ") and expected in err[0], err[0]
    assert "Traceback" not in err[0]
    assert tree_hash(existing_run) == before


@pytest.mark.slow
def test_bad_input_in_a_fresh_process_prints_exactly_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "cvfp_lightning.cli", "fit", "--config", P1,
                           "--model.init_args.dist_reg_weight", "2", "--trainer.logger.init_args.save_dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "cvfp: error: model.dist_reg_weight=2.0 is invalid: expected a value in [0, 1]."]


def test_debug_raises_the_error_itself(tmp_path):
    """``--debug``: no one-line exit, the exception propagates (Python prints its traceback)."""
    from cvfp_lightning.lightning_cli import CVFPArgumentParser

    try:
        with pytest.raises(Exception) as info:  # an Exception, not the SystemExit of the one-line error
            run_cli(["fit", "--config", P1, "--debug", "--model.init_args.dist_reg_weight", "2",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)])
    finally:
        CVFPArgumentParser.debug = False
    assert "dist_reg_weight" in str(info.value) and "expected a value in [0, 1]" in str(info.value)
    assert not list(tmp_path.iterdir())


P2 = str(CONFIGS / "phase2.yaml")


@pytest.fixture(scope="module")
def phase2_files(tmp_path_factory, existing_run, files) -> dict[str, str]:
    """Phase 2 inputs: the existing Phase 1 run, a tampered cache, another tokenizer."""
    from cvfp_lightning.data import load_tokenizer

    d = tmp_path_factory.mktemp("p2bad")
    p1 = str(next(existing_run.rglob("last.ckpt")))
    # one good Phase 2 run: computes the contexts and caches them in its own run folder, gives a Phase 2 ckpt
    run_cli(["fit", "--config", P2, "--model.init_args.phase1_checkpoint", p1, *QUICK[:4],
             "--data.init_args.num_samples", "6", "--data.init_args.max_seq_len", "64", "--trainer.max_epochs", "1",
             "--trainer.logger.init_args.save_dir", str(d / "logs")])
    import json
    import shutil

    assert not list(existing_run.rglob("context_cache"))  # nothing written into the Phase 1 run
    cache = next((d / "logs").rglob("context_cache"))
    shutil.copytree(cache, d / "tampered_cache")
    meta = json.loads((d / "tampered_cache" / "meta.json").read_text())
    meta["fingerprint"] = "0" * 64
    (d / "tampered_cache" / "meta.json").write_text(json.dumps(meta))
    tok = load_tokenizer(None)
    tok.add_tokens(["<one-more>"])
    tok.save_pretrained(d / "tok4097")
    return {"p1": p1, "p2": str(next((d / "logs").rglob("last.ckpt"))), "tampered": str(d / "tampered_cache"),
            "tok4097": str(d / "tok4097"), "good_cache": str(cache), **{k: str(v) for k, v in files.items()}}


P2_CASES = [
    ("phase1 checkpoint missing", "fit", ["--model.init_args.phase1_checkpoint", "/no/such/last.ckpt"],
     "does not exist"),
    ("phase1 checkpoint garbage", "fit", ["--model.init_args.phase1_checkpoint", "{garbage}"], "not a readable"),
    ("phase1 checkpoint is a folder", "fit", ["--model.init_args.phase1_checkpoint", "{not_a_tokenizer}"],
     "is a folder: give the path of a checkpoint in it"),
    ("not a phase1 checkpoint", "fit", ["--model.init_args.phase1_checkpoint", "{foreign}"],
     "not a Phase 1 checkpoint"),
    ("vocabulary differs from phase1", "fit", ["--data.init_args.tokenizer", "{tok4097}"], "4097"),
    ("tampered cache required", "fit", ["--model.init_args.cache", "require", "--model.init_args.cache_path",
                                        "{tampered}"], "model.cache=require"),
    ("stale cache of other data required", "fit", ["--model.init_args.cache", "require", "--model.init_args.cache_path",
                                                   "{good_cache}", "--data.init_args.paths", "[{good}]",
                                                   "--data.init_args.num_samples", "2",
                                                   "--data.init_args.test_fraction", "0"],
     "model.cache=require"),
    ("unknown cache mode", "fit", ["--model.init_args.cache", "sometimes"], "sometimes"),
    ("temperature 0", "predict", ["--model.init_args.temperature", "0"], "temperature=0"),
    ("empty prompt", "predict", ["--model.init_args.prompts", '[""]'], "empty"),
    ("missing prompt file", "predict", ["--model.init_args.prompt_file", "/no/prompts.txt"], "does not exist"),
    ("bad continuous cache", "fit", ["--model.init_args.continuous_cache", '{{"size": 0}}'], "continuous_cache.size=0"),
    ("theta past float32", "fit", ["--model.init_args.continuous_cache", '{{"theta": 1e39}}'], "continuous_cache.theta="),
    # a resumed fit validates as it did: its best score is compared across the resume
    ("continuous cache changed on resume", "fit", ["--ckpt_path", "{p2}", "--model.init_args.continuous_cache",
                                                   '{{"size": 64}}'],
     "Differences: continuous_cache: checkpoint None vs config {'size': 64, 'theta': 14.0, 'weight': 0.4}"),
]


@pytest.mark.slow
def test_validate_test_and_predict_may_read_with_another_continuous_cache(phase2_files, existing_run, tmp_path):
    """The cache has no weights: scoring or generating a checkpoint with other cache settings is no resume."""
    base = ["--config", P2, "--model.init_args.phase1_checkpoint", phase2_files["p1"], *QUICK[:4],
            "--data.init_args.num_samples", "6", "--data.init_args.max_seq_len", "64",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", phase2_files["p2"]]
    scores = {}
    for name, extra in (("model", []), ("cache", ["--model.init_args.continuous_cache", '{"size": 64}'])):
        run_cli(["validate", *base, *extra, "--trainer.logger.init_args.name", name])
        scores[name] = read_scalars(tmp_path / name)["val/loss"][-1][1]
    assert scores["cache"] != pytest.approx(scores["model"], rel=1e-4)  # read otherwise, scored otherwise
    run_cli(["predict", *base, "--model.init_args.continuous_cache", '{"size": 64}',
             "--model.init_args.prompts", '["The for statement"]', "--model.init_args.max_new_tokens", "3"])


@pytest.mark.slow
@pytest.mark.parametrize("case, command, extra, expected", P2_CASES, ids=[c[0] for c in P2_CASES])
def test_phase2_bad_input(case, command, extra, expected, phase2_files, existing_run, capsys):
    before = tree_hash(existing_run)
    args = [a.format(**phase2_files) for a in extra]
    base = ["--config", P2, "--model.init_args.phase1_checkpoint", phase2_files["p1"], *QUICK[:4],
            "--data.init_args.num_samples", "6", "--data.init_args.max_seq_len", "64",
            "--trainer.logger.init_args.save_dir", str(existing_run)]
    if command == "predict":
        base += ["--ckpt_path", phase2_files["p2"]]
    with pytest.raises(SystemExit) as info:
        run_cli([command, *base, *args])
    assert info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    print(f"[{case}] {err[0] if err else ''}")
    assert len(err) == 1 and err[0].startswith("cvfp: error: ") and expected in err[0], err
    after = tree_hash(existing_run)
    # every file that was there is unchanged; a cache error found at setup may leave only a new version folder
    assert {k: after.get(k) for k in before} == before
    assert all(k.startswith("phase2/version_") for k in set(after) - set(before))
