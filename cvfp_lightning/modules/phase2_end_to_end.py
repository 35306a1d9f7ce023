"""End-to-end Phase 2: the context block trains too, by truncated back-propagation through time.

The seed README's second Phase 2 option ("Full model fine-tuning with small learning rate",
"CVFP layers remain trainable for end-to-end optimization"). The model is Phase 2's
(:class:`~cvfp_lightning.models.lm.CVFPLanguageModel`: the Phase 1 embedding and context
block, a token block, a head), loaded from the Phase 1 checkpoint as
:class:`~cvfp_lightning.modules.phase2.Phase2LM` loads it, but the context block is
trainable, with its own learning rate (``context_lr``, the token block and head ``lr``: two
Adam parameter groups).

Since the block changes every step, the contexts of a text are no longer fixed: they cannot
be cached, nor positions shuffled. Training reads the ``streams`` layout
(:mod:`cvfp_lightning.data.streams`): B lanes per rank, windows of T = ``data.seq_len`` ids,
``data.batch_size`` lanes. For each batch (``input_ids (B, T)``, ``continues (B,)``):

    c_0   = carried context of the lane's previous window where ``continues``, else 0     (B, D)
    c_t, [c_t1..c_tL] = unroll(updater, e_{1..T}, c_0)     the one update rule, step by step
    logits_t = head(TokenBlock([c_t1..c_tL], e_t))         cross-entropy against the next id
    carry <- c_T.detach()                                  the next window continues from it

so gradients flow through at most T steps of the recurrence (truncated BPTT), and the
contexts a window sees are those of the whole sequence so far. Validation and test read
every sequence whole in one lane (``cut=False``): the context is carried from the
sequence's first id to its last, exactly as a sequential pass (and ``cvfp evaluate``)
computes it, and the scored tokens are Phase 2's: every token after the first of each
sequence.

After fit (on the best weights, :meth:`summary_extra`, read by
:class:`~cvfp_lightning.callbacks.RunSummary`) the fine-tuned block is measured with Phase
1's own definitions on the validation split
(:func:`~cvfp_lightning.diagnostics.phase1_fixed_point_stats`: the Phase 1 run's
``convergence_threshold`` and ``noise_std``, its sequential-pass contexts, Roy-Vetterli
effective rank), and so is the Phase 1 block it started from: ``phase1/convergence_rate``,
``phase1/effective_rank_pct`` and their ``*_phase1`` counterparts, logged and in
``summary.json``, show what fine-tuning did to the fixed points.

Checkpoints are Phase 2 checkpoints (the Phase 1 pairing record, the tokenizer, the
arrangement) marked as this class, so ``cvfp export`` / ``evaluate`` / ``generate`` load them
with the fine-tuned block. The context cache is never read or written.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cvfp_lightning.diagnostics import phase1_fixed_point_stats
from cvfp_lightning.errors import check, check_positive
from cvfp_lightning.models.context import unroll
from cvfp_lightning.modules.phase2 import STATE_KEY, Phase2LM, load_phase1
from cvfp_lightning.optim import adam

MODULE_KEY = "module"  # in checkpoint[STATE_KEY]: the class that wrote it (cvfp export reads it)
NO_CACHE = ("end-to-end: the context block trains, so contexts change every step; the context cache is not used "
            "(contexts are carried window by window)")


class Phase2EndToEnd(Phase2LM):
    """Phase 2 with a trainable context block, trained by truncated BPTT (see the module docstring).

    Args:
        vocab_size, phase1_checkpoint, phase1, weight_tying, freeze_embedding, seq_batch_size,
            token_history, prompts, prompt_file, max_new_tokens, temperature, top_k, top_p, greedy, seed:
            as :class:`~cvfp_lightning.modules.phase2.Phase2LM` (``seq_batch_size``: sequences per
            batch of the post-fit sequential pass; the ``token_history`` ids before a window's first
            positions are carried from the lane's previous window, as its context is).
        lr: Adam learning rate of the token block, the head (and the embedding when it trains).
        context_lr: Adam learning rate of the context block (the seed README: "small"); 0 keeps the
            block frozen (the same training by windows, for a like-for-like comparison with it frozen).
        weight_decay: AdamW's decoupled weight decay of the weight matrices of both groups (0: Adam).
        grad_clip: max gradient norm over all parameters (0 disables).
        dropout: training-time dropout (``nn.Dropout``) on the token embeddings the context block
            and the token block read, on the contexts the token block reads and on its output
            before the head; never inside the update rule, and none in evaluation, so the
            exported model is the same function without it. 0 disables.
    """

    data_layout = "streams"

    def __init__(self, vocab_size: int = 0, phase1_checkpoint: str | None = None, phase1: dict | None = None,
                 weight_tying: bool = False, freeze_embedding: bool = True, lr: float = 1e-3,
                 context_lr: float = 1e-4, grad_clip: float = 1.0, dropout: float = 0.0, seq_batch_size: int = 256,
                 prompts: list[str] | str | None = None, prompt_file: str | None = None, max_new_tokens: int = 50,
                 temperature: float = 1.0, top_k: int | None = None, greedy: bool = False,
                 top_p: float | None = None, seed: int | None = 42, weight_decay: float = 0.0,
                 token_history: int = 0):
        check_positive("model.context_lr", context_lr, allow_zero=True)
        super().__init__(vocab_size, phase1_checkpoint, phase1, weight_tying, freeze_embedding, lr, grad_clip,
                         dropout=dropout, cache="off", seq_batch_size=seq_batch_size, prompts=prompts,
                         prompt_file=prompt_file, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_k=top_k, greedy=greedy, top_p=top_p, seed=seed, weight_decay=weight_decay,
                         token_history=token_history)
        self.lm.updater.requires_grad_(context_lr > 0)
        self.save_hyperparameters({**self.hparams, "context_lr": context_lr})
        p1 = self.phase1_hparams
        self.phase1_threshold = float(p1.get("convergence_threshold", 0.03))
        self.phase1_noise_std = float(p1.get("noise_std", 0.1))
        if phase1 is not None:
            self.phase1_digest = str(phase1.get("initial_weights") or "")
        self.context_status = NO_CACHE
        self._carry: dict[str, Tensor | None] = {}
        self._carry_ids: dict[str, Tensor | None] = {}  # per split: each lane's last K ids, newest first
        self._report: dict = {}

    # ---- no cache: contexts are carried ----------------------------------------------------------
    def _announce(self) -> None:
        rank_zero_info(f"Phase2EndToEnd: {NO_CACHE}")

    def on_fit_start(self) -> None:
        self._announce()
        self._check_tokenizer()

    def on_validation_start(self) -> None:
        pass

    def on_test_start(self) -> None:
        pass

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._carry["train"] = self._carry_ids["train"] = None

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._carry["val"] = self._carry_ids["val"] = None

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._carry["test"] = self._carry_ids["test"] = None

    # ---- the model -------------------------------------------------------------------------------
    def logits_targets(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        """``{"input_ids" (B, T), "targets" (B, T), "continues" (B,)}`` -> ``(logits (B, T, V), targets (B, T))``."""
        ids, continues = batch["input_ids"], batch["continues"]
        B = ids.shape[0]
        carry = self._carry.get(split)
        start = ids.new_zeros((), dtype=torch.float32)
        if carry is not None and carry.shape[0] == B:
            c0 = torch.where(continues.unsqueeze(-1), carry, start)  # (B, D)
        else:
            c0 = start.expand(B, self.lm.updater.context_dim)
        embedded = self.lm.drop(self.lm.context_embed(ids))  # (B, T, E): the model's dropout, training only
        contexts, layers = unroll(self.lm.updater, embedded, c0, return_all_layers=True)
        self._carry[split] = contexts[:, -1].detach()  # (B, D): truncated BPTT, no gradient into the past
        history = self._window_history(split, ids, continues)
        return (self.lm.logits(layers, self.lm.embedding(ids), self.lm.history_embeds(history)),  # (B, T, V)
                batch["targets"])  # (B, T)

    def _window_history(self, split: str, ids: Tensor, continues: Tensor) -> Tensor | None:
        """``history (B, T, K)`` of a window, newest first: ``[:, t, j]`` is the id j + 1 before position t,
        from the lane's previous window where the window continues it, -1 before a sequence's start."""
        K = self.lm.token_history
        if not K:
            return None
        B, T = ids.shape
        before = ids.new_full((B, K), -1)
        carried = self._carry_ids.get(split)
        if carried is not None and carried.shape[0] == B:
            before = torch.where(continues.unsqueeze(-1), carried, before)
        run = torch.cat([before.flip(1), ids], dim=1)  # (B, K + T), oldest first
        self._carry_ids[split] = run[:, -K:].flip(1)
        return run.unfold(1, K, 1)[:, :T].flip(-1)  # [:, t] = run[:, t .. t + K - 1] = ids t - K .. t - 1

    def configure_optimizers(self):
        """Adam (AdamW with ``weight_decay``) with two parameter groups: the context block at
        ``context_lr``, the rest at ``lr``."""
        context = [p for p in self.lm.updater.parameters() if p.requires_grad]
        ids = {id(p) for p in context}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": rest, "lr": self.hparams.lr}]
        if context:
            groups.append({"params": context, "lr": self.hparams.context_lr})
        return adam(groups, lr=self.hparams.lr, trainer=self._trainer, weight_decay=self.hparams.weight_decay)

    # ---- checkpoints -------------------------------------------------------------------------------
    def phase1_record(self) -> dict:
        """The Phase 1 pairing; its weights are where training started (``initial_weights``), not this block's."""
        record = super().phase1_record()
        record["initial_weights"] = record.pop("weights")
        return record

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The pairing record without ``weights``, so loading checks no digest of the (trained) block;
        ``checkpoint["cvfp_phase2"]["module"]`` names this class for ``cvfp export``."""
        record = self.phase1_record()
        checkpoint[STATE_KEY] = {"phase1_checkpoint": record["checkpoint"],
                                 "phase1_initial_weights": record["initial_weights"], MODULE_KEY: type(self).__name__}
        checkpoint.setdefault("hyper_parameters", {})["phase1"] = record

    # ---- what fine-tuning did to the fixed points --------------------------------------------------
    @torch.no_grad()
    def fixed_point_report(self) -> dict:
        """Phase 1 convergence rate and effective rank (val split) of this block and of the Phase 1 block."""
        dm = getattr(self.trainer, "datamodule", None)
        seqs = getattr(dm, "val_sequences", None)
        if seqs is None or not seqs.num_tokens:
            return {}
        blocks = {"": self.lm.context_modules()}
        if self.phase1_path.is_file():
            embedding, updater, _ = load_phase1(self.phase1_path)
            blocks["_phase1"] = (embedding.to(self.device), updater.to(self.device))
        report = {"phase1/convergence_threshold": self.phase1_threshold, "phase1/noise_std": self.phase1_noise_std}
        for suffix, (embedding, updater) in blocks.items():
            stats = phase1_fixed_point_stats(updater, embedding, seqs, self.phase1_threshold, self.phase1_noise_std,
                                             batch_size=self.seq_batch_size)
            report.update({f"phase1/{name}{suffix}": value for name, value in stats.items()})
        for logger in self.loggers:
            logger.log_metrics({k: v for k, v in report.items() if k.startswith("phase1/")}, step=self.global_step)
        rank_zero_info("Phase2EndToEnd: Phase 1 measures of the fine-tuned block (validation split): "
                       + ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in report.items()))
        return report

    def summary_extra(self) -> dict:
        if not self._report:
            self._report = self.fixed_point_report()
        return {**super().summary_extra(), "context_lr": self.hparams.context_lr, **self._report}
