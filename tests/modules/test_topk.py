"""Top-K token evaluation: batch order of both schedules, real re-initialisation in the
sequential schedule, the per-token CSV, the global-attractor check, bad input, and both
shipped configs end to end through the CLI."""

from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch

from cvfp_lightning.data import TopKRoundRobinDataModule
from cvfp_lightning.diagnostics import attractor_stats
from cvfp_lightning.errors import CVFPUserError
from cvfp_lightning.models import ContextConfig, EmbeddingConfig
from cvfp_lightning.modules import TopKCVFPT
from cvfp_lightning.callbacks import TopKReport
from cvfp_lightning.callbacks.topk_report import COLUMNS
from helpers.cli import CONFIGS, cli_error, read_scalars, run_cli

TINY = {"updater": "simple", "context_dim": 8, "hidden_dim": 8, "num_layers": 1, "init_std": 0.1, "bias_std": 0.01}


class Recorder(L.Callback):
    """Token index of every batch, and (sequential) the weights / optimizer state each token starts from."""

    def __init__(self):
        self.order: list[tuple[int, int]] = []  # (epoch, token index)
        self.starts: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.k = int(batch["index"][0])
        self.order.append((trainer.current_epoch, self.k))

    def on_before_backward(self, trainer, module, loss):
        # after the module's own batch-start hook (callbacks run before it) and before the step
        if self.k not in self.starts:
            opt = trainer.optimizers[0]
            self.starts[self.k] = {"weights": {n: p.detach().clone() for n, p in module.named_parameters()},
                                   "opt_state_entries": len(opt.state)}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after_step_state = len(trainer.optimizers[0].state)


def fit(tmp_path, schedule: str, epochs: int, top_k: int = 3, **model_kwargs):
    dm = TopKRoundRobinDataModule(top_k=top_k, repetitions=6, schedule=schedule)
    model = TopKCVFPT(vocab_size=dm.vocab_size, context=TINY, embedding={"embed_dim": 8}, **model_kwargs)
    rec = Recorder()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec, TopKReport()],
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    return model, dm, rec, trainer


def test_round_robin_serves_token_1_to_k_every_epoch_to_one_shared_model(tmp_path):
    model, dm, rec, trainer = fit(tmp_path, "round_robin", epochs=2, top_k=4)
    assert rec.order == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert trainer.current_epoch == 2
    # one shared model: token 1 starts from the weights token 0's step left, with Adam state
    assert rec.starts[1]["opt_state_entries"] > 0
    assert not torch.equal(rec.starts[0]["weights"]["updater.out.weight"], rec.starts[1]["weights"]["updater.out.weight"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].tolist() == [[0] * 6] and batch["cycle_length"].tolist() == [1]


def test_sequential_reinitialises_weights_and_optimizer_state_per_token(tmp_path):
    model, dm, rec, trainer = fit(tmp_path, "sequential", epochs=2, top_k=3, init_seed=7)
    # each token's E = max_epochs batches in turn, all in the first epoch, then the run stops
    assert rec.order == [(0, 0), (0, 0), (0, 1), (0, 1), (0, 2), (0, 2)]
    assert trainer.current_epoch == 1
    w0, w1 = rec.starts[0]["weights"], rec.starts[1]["weights"]
    random_init = [n for n in w0 if w0[n].ndim == 2]  # Linear and embedding matrices (LayerNorm starts at 1)
    assert len(random_init) >= 3
    for name in random_init:
        assert not torch.equal(w0[name], w1[name]), f"{name}: tokens 0 and 1 start from the same weights"
    # every token starts with an empty optimizer state (no Adam moments carried over)
    assert [rec.starts[k]["opt_state_entries"] for k in range(3)] == [0, 0, 0]
    assert rec.after_step_state > 0
    # and the start of token k is exactly the initialisation drawn with seed init_seed + k
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7 + 1)
        emb, upd, _ = TopKCVFPT.build_parts(dm.vocab_size, ContextConfig(**model.hparams.context),
                                            EmbeddingConfig(**model.hparams.embedding), 0.0)
    assert torch.equal(w1["updater.out.weight"], upd.out.weight)
    assert torch.equal(w1["embedding.embed.weight"], emb.embed.weight)


def test_csv_has_one_row_per_token_with_the_columns(tmp_path):
    model, dm, rec, trainer = fit(tmp_path, "round_robin", epochs=2, top_k=5, lr=0.01)
    path = tmp_path / "topk_results.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0].keys()) == COLUMNS == ["token_id", "token_text", "initial_loss", "final_loss",
                                               "improvement_pct", "converged", "seconds"]
    assert [int(r["token_id"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [r["token_text"] for r in rows] == dm.token_texts
    for r in rows:
        init, final = float(r["initial_loss"]), float(r["final_loss"])
        assert float(r["improvement_pct"]) == pytest.approx(100 * (init - final) / init, abs=0.01)
        assert r["converged"] == str(final < 0.01)
        assert float(r["seconds"]) > 0
    summary = json.loads((tmp_path / "topk_summary.json").read_text())
    assert summary["tokens"] == 5 and summary["schedule"] == "round_robin"
    assert summary["convergence_rate"] == pytest.approx(sum(r["converged"] == "True" for r in rows) / 5)
    assert trainer.callback_metrics["topk/convergence_rate"].item() == pytest.approx(summary["convergence_rate"])
    assert trainer.callback_metrics["topk/mean_improvement"].item() == pytest.approx(summary["mean_improvement"])


def test_attractor_distance_is_zero_for_identical_contexts_and_large_for_distinct_ones():
    same = torch.randn(1, 32).repeat(6, 1)
    assert attractor_stats(same)["attractor_distance"] == pytest.approx(0.0, abs=1e-9)
    assert attractor_stats(same)["attractor_cosine"] == pytest.approx(1.0)
    distinct = torch.eye(6, 32) * 4.0  # orthogonal, norm 4: pairwise distance 4 * sqrt(2)
    assert attractor_stats(distinct)["attractor_distance"] == pytest.approx(4 * 2 ** 0.5)
    assert attractor_stats(distinct)["attractor_cosine"] == pytest.approx(0.0)


def test_a_token_blind_model_shows_up_as_a_global_attractor(tmp_path):
    """All tokens get the same embedding: their contexts coincide, and the table says so."""
    dm = TopKRoundRobinDataModule(top_k=4, repetitions=6)
    model = TopKCVFPT(vocab_size=dm.vocab_size, context=TINY, embedding={"embed_dim": 8, "freeze": True})
    with torch.no_grad():
        model.embedding.embed.weight.copy_(model.embedding.embed.weight[:1].expand_as(model.embedding.embed.weight))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.callback_metrics["diag/attractor_distance"].item() == pytest.approx(0.0, abs=1e-5)
    # while a model that sees its tokens keeps them apart
    _, _, _, normal = fit(tmp_path / "b", "round_robin", epochs=1, top_k=4)
    assert normal.callback_metrics["diag/attractor_distance"].item() > 0.1


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 5000}, "data.top_k=5000"),
    ({"schedule": "fair"}, "data.schedule='fair' is unknown"),
    ({"repetitions": 1}, "data.repetitions=1"),
    ({"token_ids": [1, 99999]}, "outside the tokenizer's ids"),
    ({"top_k": 0}, "data.top_k=0"),
])
def test_bad_topk_data_options_are_one_clear_error(kwargs, message):
    with pytest.raises(CVFPUserError, match=message) as info:
        TopKRoundRobinDataModule(**kwargs)
    assert "\n" not in str(info.value)


def test_cli_exits_2_when_k_exceeds_the_vocabulary(tmp_path, capsys):
    err = cli_error(["fit", "--config", str(CONFIGS / "topk_fair.yaml"), "--data.init_args.top_k", "5000",
                     "--trainer.logger.init_args.save_dir", str(tmp_path)], capsys)
    assert "lower top_k to at most 4096" in err


SMALL = ["--data.init_args.top_k", "4", "--data.init_args.repetitions", "8",
         "--model.init_args.context.context_dim", "16", "--model.init_args.context.hidden_dim", "16",
         "--model.init_args.embedding.embed_dim", "16", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


@pytest.mark.slow
@pytest.mark.parametrize("config, schedule", [("topk_fair.yaml", "round_robin"),
                                              ("topk_sequential.yaml", "sequential")])
def test_shipped_configs_run_through_the_cli(tmp_path, config, schedule):
    run_cli(["fit", "--config", str(CONFIGS / config), *SMALL, "--trainer.max_epochs", "2",
             "--trainer.logger.init_args.save_dir", str(tmp_path)])
    [results] = list(tmp_path.rglob("topk_results.csv"))
    assert results.parent.name == "version_0"  # the run's log folder (trainer.log_dir)
    assert len(results.read_text().splitlines()) == 1 + 4
    summary = json.loads((results.parent / "topk_summary.json").read_text())
    assert summary["schedule"] == schedule and summary["tokens"] == 4
    scalars = read_scalars(tmp_path)
    for tag in ("topk/convergence_rate", "topk/mean_improvement", "diag/attractor_distance",
                "diag/attractor_distance_init", "diag/attractor_cosine", "train/conv_loss"):
        assert tag in scalars, tag
    assert len(scalars["topk/convergence_rate"]) == (2 if schedule == "round_robin" else 1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list(results.parent.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    assert "topk/results/text_summary" in acc.Tags()["tensors"]
