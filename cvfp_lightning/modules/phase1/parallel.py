"""Parallel Phase 1 (the research code's latest algorithm): one Lightning epoch = one iteration.

Iteration 0 (before the first epoch) is a sequential pass ``c_i = f(c_{i-1}, e_i)`` from
``c = 0`` without gradients; it gives ``prev``. Each later iteration, for every position i
(in chunks, gradients accumulated):

    input_i = prev[i-1] (the initial context 0 where a sequence starts) + N(0, noise_std^2)
    out_i   = f(input_i, e_i)
    loss    = (1 - w) * mean_i per_dim_mse(out_i, prev_i) + w * div(out)

with ``div(X) = -||X - mean(X)||_F / n`` (``diversity_center``: ``global`` over all N
positions, via :func:`~cvfp_lightning.losses.diversity_surrogate`; ``chunk``: per
chunk, weighted by chunk size) and ``w = dist_reg_weight``. One optimizer step per
iteration (clip ``grad_clip``), then ``prev <- out``. Convergence rate = share of
positions with ``per_dim_mse(out_i, prev_i) < convergence_threshold``. Validation runs
the same iteration on the validation tokens without noise and without training.

Scale. Each DDP rank owns a contiguous, token-balanced shard of the positions
(:mod:`cvfp_lightning.data.shards`) and keeps only that shard's carried contexts, one
``(N_rank, D)`` :class:`~cvfp_lightning.context_store.ContextStore` per split, overwritten
chunk by chunk (the one row still needed, the previous chunk's last old row, is kept
aside): ``D * itemsize`` bytes per position in memory (``context_store: memory``, in
``context_dtype`` fp32 / bf16 / fp16) or on disk (``disk``, O(chunk x D) in RAM). What
crosses ranks per iteration does not grow with N: the diversity statistics (sum, sum of
squares, count: D + 2 float64), the effective rank's D x D Gram of a position-determined
sample, the convergence counts, one handed-over row per rank in a stream, and the
gradients, synchronised once per iteration (the chunks before the last accumulate without
DDP's all-reduce). The noise of a position depends on (RNG seed, iteration, its chunk of
the global grid), so any number of ranks draws the same noise for it.

The carried contexts are saved with every checkpoint into the run folder's
``contexts/`` (one file per split and rank, its sha256 in the checkpoint); ``--ckpt_path``
resumes exactly, and refuses in one line when a file is missing or changed. Checkpoints
written before hold the contexts inline and still resume.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from cvfp_lightning.context_store import DTYPES, ContextDtype, ContextStore, StoreKind, prune_snapshots
from cvfp_lightning.data.shards import shard_view
from cvfp_lightning.errors import check, check_fraction, check_positive
from cvfp_lightning.losses import diversity_loss, diversity_surrogate
from cvfp_lightning.metrics import GramEffectiveRank, sample_positions
from cvfp_lightning.models.context import ContextConfig
from cvfp_lightning.models.embedding import EmbeddingConfig
from cvfp_lightning.modules.phase1.base import Phase1Base
from cvfp_lightning.sequential_pass import sharded_sequential_pass
from cvfp_lightning.solvers import per_dim_mse

log = logging.getLogger(__name__)

STAT_BLOCK = 1 << 16  # rows per read of a store when its statistics are taken


class Phase1Parallel(Phase1Base):
    """Parallel fixed-point learning (see the module docstring).

    Args:
        dist_reg_weight: w, weight of the diversity loss in ``[0, 1]`` (research code 0.8).
        diversity_center: ``global`` (the seed documents) or ``chunk`` (the research code's batches).
        noise_std: std of the Gaussian noise added to input contexts.
        convergence_threshold: per-dimension MSE below which a position counts as converged (0.03).
        seq_batch_size: sequences per batch in the sequential pass (samples mode).
        context_dtype: ``float32`` (default: exact), ``bfloat16`` or ``float16``: how the
            carried contexts are kept (the computation stays fp32 / the trainer's precision).
        context_store: ``memory`` or ``disk`` (files in the run folder's ``contexts/``).
        **others**: see :class:`~cvfp_lightning.modules.phase1.base.Phase1Base`.
    """

    data_layout = "shard_chunks"
    STATE_FIELDS = ("noise_seed", "stats", "stores")

    def __init__(self, vocab_size: int = 0, context: ContextConfig | None = None,
                 embedding: EmbeddingConfig | None = None, dist_reg_weight: float = 0.8,
                 diversity_center: Literal["global", "chunk"] = "global", noise_std: float = 0.1,
                 convergence_threshold: float = 0.03, lr: float = 2e-3, grad_clip: float = 1.0,
                 seq_batch_size: int = 256, effective_rank_rows: int = 10_000,
                 context_dtype: ContextDtype = "float32", context_store: StoreKind = "memory"):
        check(diversity_center in ("global", "chunk"),
              f"model.diversity_center={diversity_center!r} is unknown: expected global or chunk.")
        check_fraction("model.dist_reg_weight", dist_reg_weight)
        check_positive("model.noise_std", noise_std, allow_zero=True)
        check_positive("model.seq_batch_size", seq_batch_size)
        check(context_dtype in DTYPES,
              f"model.context_dtype={context_dtype!r} is unknown: expected one of {', '.join(DTYPES)}.")
        check(context_store in ("memory", "disk"),
              f"model.context_store={context_store!r} is unknown: expected memory or disk.")
        algorithm = {"dist_reg_weight": dist_reg_weight, "diversity_center": diversity_center,
                     "noise_std": noise_std, "seq_batch_size": seq_batch_size}
        # the defaults stay out of the hyperparameters, so checkpoints written before resume
        algorithm.update({k: v for k, v in (("context_dtype", context_dtype), ("context_store", context_store))
                          if v != {"context_dtype": "float32", "context_store": "memory"}[k]})
        super().__init__(vocab_size, context, embedding, convergence_threshold, lr, grad_clip, effective_rank_rows,
                         algorithm)
        self.context_dtype, self.context_store = context_dtype, context_store
        self.train_erank = GramEffectiveRank(self.context_dim, percent=True)  # summed over ranks
        self.val_erank = GramEffectiveRank(self.context_dim, percent=True)
        self.train_div = MeanMetric()  # chunk centring: size-weighted mean of chunk values
        self._stores: dict[str, ContextStore] = {}
        self._shards: dict = {}
        self._sampled: dict[str, Tensor] = {}  # local rows of the effective-rank sample
        self._boundary: dict[str, Tensor] = {}
        self._sums: dict[str, Tensor] = {}
        self._legacy: dict[str, Tensor] = {}  # contexts inline in a checkpoint written before
        self._snapshot_step: tuple[int, dict] | None = None
        self._previous_snapshot: dict[str, tuple[Path, ...]] = {}  # per split: the folder of the last checkpoint's file
        self._iteration0_seconds = 0.0  # wall time of the sequential pass (0 when resumed)
        self._iteration0_tokens = 0  # tokens of that pass (train, and validation when this fit validates)

    # ---- shards and stores -------------------------------------------------------------------
    def _folder(self) -> Path:
        """The run folder's ``contexts/`` (logger folder, else next to the checkpoints, else the root dir)."""
        trainer = self.trainer
        if trainer.loggers and trainer.log_dir:
            return Path(trainer.log_dir) / "contexts"
        ckpt = getattr(trainer.checkpoint_callback, "dirpath", None)
        return (Path(ckpt).parent if ckpt else Path(trainer.default_root_dir)) / "contexts"

    def _open(self, split: str) -> None:
        """This rank's shard of ``split`` and its store (zeros), and its effective-rank sample."""
        seqs = self.sequences(split)
        shard, view = shard_view(seqs, self.global_rank, self.trainer.world_size)
        self._shards[split] = (shard, view)
        name = f"{split}.rank{shard.rank}-of-{shard.world_size}"
        self._stores[split] = ContextStore(shard.num_tokens, self.context_dim, self.context_dtype, self.context_store,
                                           folder=self._folder() / "live", name=name, device=self.device)
        sample = sample_positions(seqs.num_tokens, self.hparams.effective_rank_rows)
        self._sampled[split] = sample[(sample >= shard.start) & (sample < shard.stop)] - shard.start

    def _sequential(self, splits: list[str], description: str = "iteration 0: sequential pass") -> float:
        """Iteration 0 of ``splits``: the sharded sequential pass into their stores; its seconds."""
        start = time.perf_counter()
        parts = [self._shards[s] for s in splits]
        self._iteration0_tokens = sum(self.sequences(s).num_tokens for s in splits)
        for s in splits:
            self._stores[s].begin_generation()
        with self.trainer.precision_plugin.forward_context():
            sharded_sequential_pass(self.updater, self.embedding, parts, [self._stores[s].write for s in splits],
                                    self.hparams.seq_batch_size,
                                    broadcast=lambda t, src: self.trainer.strategy.broadcast(t, src),
                                    description=description)
        for s in splits:
            self._stores[s].end_generation()
        seconds = time.perf_counter() - start
        log.info("sequential pass over %d tokens in %.2fs", self._iteration0_tokens, seconds)
        return seconds

    def _reduce(self, t: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t

    def _set_stats(self, sums: Tensor) -> None:
        """Global mean and spread ``||X - 1 m^T||_F`` from this rank's ``[sum x (D), sum ||x||^2, n]`` (float64)."""
        sums = self._reduce(sums)
        D = self.context_dim
        n = sums[D + 1].clamp_min(1.0)
        center = sums[:D] / n
        spread = (sums[D] - n * center.pow(2).sum()).clamp_min(0).sqrt()
        self._state["stats"] = {"center": center.float(), "spread": spread.float(), "count": sums[D + 1]}

    def _new_sums(self) -> Tensor:
        return torch.zeros(self.context_dim + 2, dtype=torch.float64, device=self.device)

    @staticmethod
    def _add(sums: Tensor, rows: Tensor) -> None:
        x = rows.detach().double()
        sums[:-2] += x.sum(dim=0)
        sums[-2] += x.pow(2).sum()
        sums[-1] += x.shape[0]

    def _stats_of(self, split: str) -> None:
        sums, store = self._new_sums(), self._stores[split]
        for start in range(0, store.num_rows, STAT_BLOCK):
            self._add(sums, store.read(start, min(start + STAT_BLOCK, store.num_rows)))
        self._set_stats(sums)

    def _handover(self, split: str) -> Tensor:
        """The old context of the position before this rank's first one (a stream's shards), else zeros."""
        shard, _ = self._shards[split]
        store = self._stores[split]
        boundary = torch.zeros(self.context_dim, device=self.device)
        if not shard.chained:
            return boundary
        last = store.read(store.num_rows - 1, store.num_rows)[0] if store.num_rows else boundary
        rows = self.all_gather(torch.cat([last, torch.tensor([float(store.num_rows)], device=self.device)]))
        before = [r for r in range(shard.rank) if rows[r, -1] > 0]
        return rows[before[-1], :-1] if shard.continues and before else boundary

    # ---- noise -------------------------------------------------------------------------------
    def _chunk_noise(self, positions: Tensor, num_tokens: int) -> Tensor:
        """Noise ``(n, D)`` of consecutive positions inside one chunk of the global grid.

        A function of (RNG seed, iteration, the grid chunk's first position) only, drawn for
        the whole grid chunk and sliced, so a resumed run, a DDP run and a single process
        draw the same noise for the same position.
        """
        c = int(self.trainer.datamodule.chunk_size)
        first = int(positions[0]) // c * c
        g = torch.Generator(device=self.device)
        g.manual_seed((int(self._state["noise_seed"]) * 1_000_003 + self.current_epoch * 7_919_113
                       + first) % (2**63 - 1))
        rows = min(c, num_tokens - first)
        noise = torch.randn(rows, self.context_dim, generator=g, device=self.device)
        return noise[int(positions[0]) - first:int(positions[-1]) + 1 - first]

    # ---- fit start: iteration 0 or the checkpoint's contexts ---------------------------------------
    def _validates(self) -> bool:
        seqs = getattr(getattr(self.trainer, "datamodule", None), "val_sequences", None)
        return bool(self.trainer.limit_val_batches) and seqs is not None and seqs.num_tokens > 0

    def on_fit_start(self) -> None:
        super().on_fit_start()
        splits = ["train"] + (["val"] if self._validates() else [])
        for split in splits:
            self._open(split)
        records = self._state.get("stores") or {}
        if records or self._legacy:
            for split in splits:
                self._restore(split, records.get(split))
            if "stats" not in self._state or self._state["stats"] is None:
                self._stats_of("train")
            self._state["stats"] = {k: v.to(self.device) for k, v in self._state["stats"].items()}
            return
        seconds = self._sequential(splits)  # train and validation together: their steps share the products
        self._stats_of("train")
        for logger in self.loggers:
            logger.log_metrics({"time/iteration0_s": seconds}, step=0)
        self._iteration0_seconds = seconds

    def _restore(self, split: str, record: dict | None) -> None:
        shard, _ = self._shards[split]
        store = self._stores[split]
        if record is None and split in self._legacy:  # contexts inline, the full matrix
            full = self._legacy.pop(split)
            check(full.shape[0] == self.sequences(split).num_tokens,
                  f"the checkpoint carries contexts for {full.shape[0]} {split} tokens but the data has "
                  f"{self.sequences(split).num_tokens}: resume with the same data settings.")
            store.fill(full[shard.start:shard.stop])
            return
        if record is None:  # this split was not carried (e.g. validation off when the checkpoint was written)
            self._sequential([split])
            return
        check(record["world_size"] == shard.world_size,
              f"the checkpoint's {split} contexts are sharded over {record['world_size']} processes: resume with "
              f"--trainer.devices {record['world_size']} (this run has {shard.world_size}).")
        check(int(record["rows"][-1]) == self.sequences(split).num_tokens,
              f"the checkpoint carries contexts for {int(record['rows'][-1])} {split} tokens but the data has "
              f"{self.sequences(split).num_tokens}: resume with the same data settings.")
        r = shard.rank
        store.restore({"file": record["files"][r], "sha256": record["sha256"][r], "rows": shard.num_tokens,
                       "dim": self.context_dim, "dtype": record["dtype"]})
        self._previous_snapshot[split] = (Path(record["files"][r]).parent,)

    # ---- one iteration ---------------------------------------------------------------------------
    def _step(self, split: str, batch: dict[str, Tensor], noise: bool) -> tuple[Tensor, Tensor]:
        """``(out (n, D), old (n, D))`` of a chunk of this rank's shard; writes ``out`` into the store."""
        shard, _ = self._shards[split]
        store = self._stores[split]
        pos, ids, is_start = batch["positions"], batch["ids"], batch["is_start"]
        n = pos.numel()
        if n:
            local = int(pos[0]) - shard.start
            old = store.read(local, local + n)
            prev = torch.cat([self._boundary[split][None], old[:-1]])  # the old context of position i - 1
            self._boundary[split] = old[-1]
        else:
            old = prev = torch.zeros(0, self.context_dim, device=self.device)
        inp = torch.where(is_start.unsqueeze(-1), torch.zeros((), device=self.device), prev)
        if noise and self.hparams.noise_std > 0 and n:
            inp = inp + self.hparams.noise_std * self._chunk_noise(pos, self.sequences(split).num_tokens)
        out = self.updater.update_context_one_step(inp, self.embedding(ids)).float()
        if n:
            store.write(local, out.detach())
            self._add(self._sums[split], out)
            rows = self._sampled[split]
            mine = rows[(rows >= local) & (rows < local + n)] - local
            getattr(self, f"{split}_erank").update(out.detach()[mine.to(out.device)])
        return out, old

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._stores["train"].begin_generation()
        self._boundary["train"] = self._handover("train")
        self._sums["train"] = self._new_sums()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        hp = self.hparams
        stats = self._state["stats"]
        N, W = int(stats["count"]), self.trainer.world_size
        out, old = self._step("train", batch, noise=True)
        res = per_dim_mse(out, old)  # (n,)
        if hp.diversity_center == "global":
            div = diversity_surrogate(out, stats["center"], stats["spread"], N)
        else:
            chunk_div = diversity_loss(out)
            div = chunk_div * out.shape[0] / N
            if out.shape[0]:
                self.train_div.update(chunk_div.detach(), weight=out.shape[0])
        loss = (1 - hp.dist_reg_weight) * res.sum() / N + hp.dist_reg_weight * div
        self._mid_iteration = batch_idx + 1 < self.trainer.num_training_batches
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        with block() if block is not None and self._mid_iteration else contextlib.nullcontext():
            self.manual_backward(loss * W)  # DDP averages gradients over ranks, once per iteration; we want their sum
        self.train_residuals.update(res.detach())  # every step, empty too: the same update count on every rank
        if res.numel():
            self.train_rate.update(res)
            self.train_cvfp.update(res.detach())
            self.train_tokens.update(res.numel())
        if not self._mid_iteration:
            self._end_iteration()

    def _end_iteration(self) -> None:
        hp = self.hparams
        self.optimizer_step_clipped()
        self._stores["train"].end_generation()
        self._set_stats(self._sums["train"])
        N = int(self._state["stats"]["count"])
        if hp.diversity_center == "global":  # diversity_loss(new), from the statistics just computed
            div = -self._state["stats"]["spread"] / max(N, 1)
        else:
            div = self.train_div.compute()
            self.train_div.reset()
        cvfp = self.train_cvfp.compute()
        # values of the whole iteration, the same on every rank: batch_size=1, since Lightning would weight
        # them by this chunk's size (0 on a rank whose last chunk is padding: a NaN mean)
        once = {"on_step": False, "on_epoch": True, "batch_size": 1}
        self.log("train/cvfp_loss", self.train_cvfp, on_step=False, on_epoch=True)
        self.log("train/diversity_loss", div, **once)
        self.log("train/loss", (1 - hp.dist_reg_weight) * cvfp + hp.dist_reg_weight * div, **once)
        self.log("train/convergence_rate", self.train_rate, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/tokens", self.train_tokens, on_step=False, on_epoch=True)
        self.log("train/effective_rank_pct", self.train_erank.compute(), prog_bar=True, **once)
        self.train_erank.reset()
        self.log("train/iteration", float(self.current_epoch + 1), **once)
        self.log("time/iteration_s", time.perf_counter() - self._iter_start, **once)

    # ---- validation ------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        if self.trainer.sanity_checking:
            return
        if "val" not in self._stores:  # cvfp validate, or a fit that did not validate at its start
            self._open("val")
            self._sequential(["val"])
        self._stores["val"].begin_generation()
        self._boundary["val"] = self._handover("val")
        self._sums["val"] = self._new_sums()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            return
        out, old = self._step("val", batch, noise=False)
        res = per_dim_mse(out, old)
        self.val_residuals.update(res)
        if res.numel():
            self.val_rate.update(res)
            self.val_cvfp.update(res)
            self.val_tokens.update(res.numel())
        self.log_validation_metrics()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self._stores["val"].end_generation()
        if self._reduce(self.val_erank.rows.clone()) > 0:
            self.log("val/effective_rank_pct", self.val_erank.compute())
        self.val_erank.reset()

    # ---- the carried contexts ------------------------------------------------------------------
    def contexts(self, split: str) -> Tensor | None:
        """This rank's carried contexts of ``split`` as float32 ``(N_rank, D)`` (read whole: for small data)."""
        store = self._stores.get(split)
        return store.read(0, store.num_rows) if store is not None else None

    # ---- checkpoint state ----------------------------------------------------------------------
    def _snapshot(self) -> dict:
        """Every split's carried contexts in ``contexts/`` (written once per step); the records of all ranks."""
        step = self.trainer.global_step
        if self._snapshot_step is not None and self._snapshot_step[0] == step:
            return self._snapshot_step[1]
        records = {}
        root = self._folder() / "snapshot"
        folder = root / f"step-{step:010d}"  # one per step: the previous checkpoint's file survives a killed save
        for split, store in self._stores.items():
            shard, _ = self._shards[split]
            mine = store.snapshot(folder)
            if store.kind == "memory":
                prune_snapshots(root, store.name, {folder, *self._previous_snapshot.get(split, ())})
                self._previous_snapshot[split] = (Path(mine["file"]).parent,)
            digest = torch.frombuffer(bytearray.fromhex(mine["sha256"]), dtype=torch.uint8).to(self.device)
            digests = self.all_gather(digest).reshape(-1, 32) if self.trainer.world_size > 1 else digest[None]
            own = Path(mine["file"])  # every rank's file is named like this one, with its rank
            files = [str(own.with_name(own.name.replace(f".rank{shard.rank}-of-", f".rank{r}-of-")))
                     for r in range(shard.world_size)]
            records[split] = {"world_size": shard.world_size, "files": files,
                              "sha256": [bytes(d.cpu().tolist()).hex() for d in digests],
                              "rows": [self.sequences(split).num_tokens], "dtype": store.dtype_name}
        self._snapshot_step = (step, records)
        return records

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._stores:
            self._state["stores"] = self._snapshot()
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = dict(checkpoint.get("cvfp_phase1_state") or {})
        legacy = {split: state.pop(f"{split}_prev") for split in ("train", "val") if state.get(f"{split}_prev") is not None}
        if legacy:  # written before the contexts moved to files: center/spread are recomputed
            checkpoint["cvfp_phase1_state"] = {**state, "stats": None}
        super().on_load_checkpoint(checkpoint)
        self._legacy = legacy
