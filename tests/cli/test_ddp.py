"""DDP on CPU: two processes log what one process logs, and count every token exactly once.

The two-process runs are what users run: ``python -m cvfp_lightning.cli <fit|validate|test> ...
--trainer.strategy ddp --trainer.devices 2 --trainer.accelerator cpu`` in a subprocess, whose
rank 1 Lightning starts as a second subprocess. The one-process runs are the same commands
in-process. Every TensorBoard scalar except wall times must agree to 1e-5 relative, and the
logged token counts (``{split}/tokens``) must equal the number of predicted positions counted
from the data module: ratios such as the perplexity cannot see a token counted twice.

A DDP step trains on the W ranks' batches together, so the two-process fits use half the
batch (``chunk_size`` / ``batch_size``) of the one-process fits: both then see the same
global batches (the data modules shard them without duplicates). Phase 1 trains on all
positions at once and needs no such change.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.cli import CONFIGS, ROOT, read_scalars, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ddp")]  # one DDP run at a time under xdist

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TWO = ["--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]


def cvfp_ddp(args: list[str], timeout: float = 600.0) -> None:
    """``cvfp ARGS`` on two CPU processes (``--trainer.strategy ddp``), in a subprocess."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK",
                                                             "WORLD_SIZE", "RANK")}  # a fresh port and launch
    env.update({"OMP_NUM_THREADS": "1",  # one thread like the in-process runs: the same kernels
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    proc = subprocess.run([sys.executable, "-m", "cvfp_lightning.cli", *args, *TWO], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"cvfp {args[0]} on 2 processes exited with {proc.returncode}:\n{proc.stderr[-3000:]}"


def run_both(args: list[str], tmp_path: Path, name: str, one: list[str] = (), two: list[str] = ()) -> tuple:
    """``cvfp ARGS`` on one process (in-process) and on two; returns both runs' scalars."""
    out = {}
    for procs, extra in ((1, one), (2, two)):
        save = tmp_path / f"{name}_{procs}"
        full = [*args, *QUIET, *extra, "--trainer.logger.init_args.save_dir", str(save)]
        run_cli(full) if procs == 1 else cvfp_ddp(full)
        out[procs] = read_scalars(save)
    return out[1], out[2]


def assert_same_scalars(one: dict, two: dict, same_steps: bool = True) -> None:
    """Every scalar but wall times: the same tags, the same number of values, equal to 1e-5."""
    tags = sorted(t for t in set(one) | set(two) if not t.startswith("time/"))
    assert set(one) - {t for t in one if t.startswith("time/")} == set(tags) == \
        set(two) - {t for t in two if t.startswith("time/")}, (sorted(set(one) ^ set(two)))
    differ = []
    for tag in tags:
        a, b = one[tag], two[tag]
        if len(a) != len(b) or (same_steps and [s for s, _ in a] != [s for s, _ in b]) or \
                [v for _, v in a] != pytest.approx([v for _, v in b], rel=1e-5, abs=1e-12):
            differ.append(f"{tag}: one process {a}, two {b}")
    assert not differ, "\n".join(differ)


def predicted_positions(seqs) -> int:
    """Positions with a next token in the same sequence: every position but each sequence's last."""
    return int((seqs.lengths - 1).clamp_min(0).sum())


def data_module(corpus: Path, max_seq_len: int, test_fraction: float = 0.1):
    from cvfp_lightning.data import TextDataModule

    dm = TextDataModule(paths=[str(corpus)], sequences="samples", max_seq_len=max_seq_len,
                        test_fraction=test_fraction)
    dm.setup()
    return dm


def values(scalars: dict, tag: str) -> list[float]:
    return [v for _, v in scalars[tag]]


LM_DATA = ["--data.init_args.max_seq_len", "64", "--data.init_args.seq_len", "64", "--data.init_args.test_fraction", "0.1"]
# one run per kind of LightningModule: Phase 2 and the baselines' BaselineLM (its GRU; the LSTM and
# the transformer share its steps, metrics and data, and only change the network inside)
LM_RUNS = {
    "phase2": ["--config", str(CONFIGS / "phase2.yaml"), "--model.init_args.cache", "off"],
    "gru": ["--config", str(CONFIGS / "baseline_gru.yaml"), "--model.init_args.match_params", "null",
            "--model.init_args.hidden_dim", "16"],
}
# batch per process: positions (Phase 2) or windows (baselines); two processes take half each
LM_BATCH = {"phase2": ("--data.init_args.chunk_size", 256), "gru": ("--data.init_args.batch_size", 8)}


@pytest.mark.parametrize("kind", list(LM_RUNS))
def test_fit_with_its_validation_and_test_on_two_processes_equals_one(tmp_path, corpus, kind):
    """Two epochs with validation, then the test pass on the best weights that ``cvfp fit`` runs
    when the data has a test split: every scalar of train, val and test, and every token count."""
    from helpers.lm import phase1_checkpoint

    args = [*LM_RUNS[kind], "--data.init_args.paths", f"[{corpus}]", *LM_DATA]
    if kind == "phase2":
        args += ["--model.init_args.phase1_checkpoint", str(phase1_checkpoint(tmp_path / "p1" / "last.ckpt", 4096))]
    key, batch = LM_BATCH[kind]
    fit = ["fit", *args, "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "1"]
    one, two = run_both(fit, tmp_path, "fit", one=[key, str(batch)], two=[key, str(batch // 2)])
    assert_same_scalars(one, two)
    dm = data_module(corpus, max_seq_len=64)
    assert values(two, "train/tokens") == [predicted_positions(dm.train_sequences)] * 2  # every epoch, each once
    assert values(two, "val/tokens") == [predicted_positions(dm.val_sequences)] * 2
    assert values(two, "test/tokens") == [predicted_positions(dm.test_sequences)]
    for split in ("val", "test"):  # bits per byte of the split's own bytes, not of a rank's or twice
        assert 0.0 < values(two, f"{split}/bpb")[-1] < 20.0


def test_test_subcommand_on_two_processes_equals_one(tmp_path, corpus):
    """``cvfp test --ckpt_path`` of a Phase 2 checkpoint (the test split's contexts computed
    sharded over the ranks) with a continuous cache (each rank's chunks read their memory from the
    positions before them, whoever scores those): every scalar and the token count. ``cvfp validate``
    runs the same evaluation on the other split (Phase 1's is tested below)."""
    from helpers.lm import phase1_checkpoint

    args = [*LM_RUNS["phase2"], "--data.init_args.paths", f"[{corpus}]", *LM_DATA,
            "--model.init_args.phase1_checkpoint", str(phase1_checkpoint(tmp_path / "p1" / "last.ckpt", 4096)),
            "--model.init_args.continuous_cache", '{"size": 300, "theta": 5.0, "weight": 0.3}']
    key, batch = LM_BATCH["phase2"]
    run_cli(["fit", *args, *QUIET, key, str(batch), "--trainer.max_epochs", "1",
             "--trainer.logger.init_args.save_dir", str(tmp_path / "fit")])
    ckpt = str(next((tmp_path / "fit").rglob("best.ckpt")))
    dm = data_module(corpus, max_seq_len=64)
    # chunks of 32 positions: the two ranks score alternate chunks, each reading memory from the other's
    one, two = run_both(["test", *args, key, "32", "--ckpt_path", ckpt], tmp_path, "test")
    assert_same_scalars(one, two)
    assert values(two, "test/tokens") == [predicted_positions(dm.test_sequences)]
    assert 0.0 < values(two, "test/bpb")[0] < 20.0


def test_phase1_fit_and_validate_on_two_processes_equal_one(tmp_path, corpus):
    # 300-position chunks: the positions are not a multiple of 2 x 300, so the padding matters
    args = ["--config", str(CONFIGS / "phase1.yaml"), "--data.init_args.paths", f"[{corpus}]",
            "--data.init_args.max_seq_len", "100", "--data.init_args.chunk_size", "300",
            "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "2",
            "--model.init_args.embedding.embed_dim", "16"]
    one, two = run_both(["fit", *args, "--trainer.max_epochs", "3"], tmp_path, "fit")
    # global_step counts a rank's chunks, so the steps differ; the values per iteration do not
    assert_same_scalars(one, two, same_steps=False)
    for tag in ("train/convergence_rate", "val/convergence_rate", "train/effective_rank_pct",
                "val/effective_rank_pct", "train/cvfp_loss", "val/cvfp_loss", "diag/contraction_mean"):
        assert tag in two, tag
    dm = data_module(corpus, max_seq_len=100)
    assert values(two, "train/tokens") == [dm.train_sequences.num_tokens] * 3  # every position, once
    assert values(two, "val/tokens") == [dm.val_sequences.num_tokens] * 3

    ckpt = str(next((tmp_path / "fit_1").rglob("last.ckpt")))
    one, two = run_both(["validate", *args, "--ckpt_path", ckpt], tmp_path, "validate")
    assert_same_scalars(one, two, same_steps=False)
    assert values(two, "val/tokens") == [dm.val_sequences.num_tokens]


def test_repetition_fit_on_two_processes_equals_one(tmp_path):
    # 5 phrases: one empty padding item on 2 processes, in the last global batch
    args = ["fit", "--config", str(CONFIGS / "repetition.yaml"), "--data.init_args.max_stage", "2",
            "--data.init_args.epochs_per_stage", "1", "--data.init_args.phrases_per_stage", "5",
            "--data.init_args.repetitions", "8", "--model.init_args.context.context_dim", "16",
            "--model.init_args.context.hidden_dim", "16", "--model.init_args.embedding.embed_dim", "16",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "2"]
    one, two = run_both(args, tmp_path, "fit", one=["--data.init_args.batch_size", "4"],
                        two=["--data.init_args.batch_size", "2"])
    assert_same_scalars(one, two)
    for tag in ("train/loss_step", "train/loss_epoch", "train/conv_loss", "train/change", "train/conv_metric",
                "train/stage2/conv_loss", "stage", "diag/attractor_distance", "diag/attractor_cosine"):
        assert tag in two, tag


def test_training_shards_are_the_one_process_order_without_duplicates():
    """Rank r trains on items r, r+W, ... of the one-process order; the padding comes last."""
    from types import SimpleNamespace

    from cvfp_lightning.data.sequences import PositionCollate, PositionIndex, TokenSequences, shuffled_sampler

    seqs = TokenSequences.from_lists([[1, 2, 3], [4, 5, 6, 7]])  # 7 positions, 5 with a target
    index = PositionIndex(seqs.num_tokens, pad_to_multiple=2)
    assert len(index) == 8
    torch.manual_seed(3)
    order = list(shuffled_sampler(seqs.num_tokens, len(index)))
    assert sorted(order[:7]) == list(range(7)) and order[7] == 7  # one padding position, last
    shards = [list(shuffled_sampler(seqs.num_tokens, len(index), SimpleNamespace(world_size=2, global_rank=r)))
              for r in range(2)]
    assert shards == [order[0::2], order[1::2]]
    batch = PositionCollate(seqs)(torch.tensor([7, 2, 4]))
    assert batch["positions"].tolist() == [0, 2, 4] and batch["targets"].tolist() == [-100, -100, 6]


def test_metric_states_sent_to_spawned_processes_become_private_at_setup():
    """``ddp_spawn`` moves every CPU tensor it sends into shared memory; ``setup`` gives the
    metrics their own states again, or the ranks would add into one storage (bits per byte 2x)."""
    from torchmetrics import Metric

    from cvfp_lightning.modules import BaselineLM, Phase1FixedPoint, RepetitionCVFPT

    def metric_states(module):
        return [getattr(m, name) for m in module.modules() if isinstance(m, Metric) for name in m._defaults
                if isinstance(getattr(m, name), torch.Tensor)]

    modules = [BaselineLM(vocab_size=32, hidden_dim=8),
               Phase1FixedPoint(vocab_size=32, context={"context_dim": 8, "num_layers": 1}, embedding={"embed_dim": 8}),
               RepetitionCVFPT(vocab_size=32, context={"context_dim": 8, "hidden_dim": 8}, embedding={"embed_dim": 8})]
    for module in modules:
        assert metric_states(module)
        for state in metric_states(module):
            state.share_memory_()  # what torch.multiprocessing does when it pickles the module for a child
        module.setup("fit")
        assert not any(state.is_shared() for state in metric_states(module)), type(module).__name__
