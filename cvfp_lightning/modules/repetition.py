"""Repetition CVFP training (seed document: repetition-training): a context that returns to itself
after every cycle of a repeated phrase.

For a batch of repeated phrases (``input_ids (B, T)``, cycle lengths ``L_b``) the contexts
come from one sequential pass ``ctx = unroll(f, E(ids)) (B, T, D)`` from ``c = 0`` and

    loss = convergence_weight * MSE(ctx[:, L:], ctx[:, :-L]) + token_weight * CE(head(ctx[:, t]), ids[:, t + 1])

where MSE is the per-dimension mean squared error averaged over every real pair
``(t, t - L_b)`` of the batch (rows are grouped by their L) and the CE head
(``Linear(D, vocab)``) exists only when ``token_weight > 0``. Logged per epoch:

- ``train/conv_loss``: the MSE term above,
- ``train/change``: mean ``||ctx[t] - ctx[t-1]||_2`` over consecutive real positions,
- ``train/conv_metric``: mean ``||ctx[t] - ctx[t-L]||_2`` over real pairs one cycle apart,
- each also as ``train/stage{s}/...`` for the stage s of the epoch, and ``stage`` itself,
- ``diag/attractor_distance`` / ``diag/attractor_cosine``: mean pairwise L2 distance and
  cosine between the phrases' contexts at their last cycle end (taken from the epoch's
  training passes). Distance ~0 / cosine ~1 means every phrase ends at the same point: a
  global attractor, which satisfies the loss without telling phrases apart.

The research script's CLI parameters: ``--lr``, ``--convergence-weight``, ``--token-weight`` are arguments
here; ``--context-dim``, ``--hidden-dim``, ``--layers`` live in ``context``; ``--embed-dim``
in ``embedding``; the data ones in
:class:`~cvfp_lightning.data.repetition.RepeatedPhraseDataModule`; ``--device`` is
``trainer.accelerator`` and ``--output-dir`` the logger's ``save_dir`` (checkpoints go to
``<save_dir>/<name>/version_N/checkpoints``).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from cvfp_lightning.data.sequences import IGNORE_INDEX
from cvfp_lightning.diagnostics import attractor_stats
from cvfp_lightning.errors import check, check_positive
from cvfp_lightning.losses import CycleStats, cycle_end_contexts, cycle_stats
from cvfp_lightning.metrics import private_metric_states
from cvfp_lightning.models.context import ContextConfig, build_context_updater, unroll
from cvfp_lightning.models.embedding import EmbeddingConfig, build_embedding
from cvfp_lightning.models.legacy import upgrade_checkpoint
from cvfp_lightning.modules.checkpoint_fit import check_checkpoint_fits
from cvfp_lightning.optim import clip_gradients, configure_adam

# the research script's model: context 256, embed 256, hidden 512, 2 FNN layers, the simple updater
RESEARCH_CONTEXT = {"updater": "simple", "context_dim": 256, "hidden_dim": 512, "num_layers": 2}
RESEARCH_EMBEDDING = {"embed_dim": 256, "freeze": False, "init_std": 1.0}  # torch's nn.Embedding init, as the research script


class RepetitionCVFPT(L.LightningModule):
    """Repetition CVFP training (formulas in the module docstring).

    Args:
        vocab_size: number of token ids (linked from ``data.vocab_size`` by the CLI).
        context: the context block; None: the research script's (``simple``, 256 / 512 / 2 layers).
            A mapping fills missing keys from the research script's values.
        embedding: the token embedding; None: the research script's (learned, 256 wide, trained).
        convergence_weight: alpha, weight of the cyclic MSE (research script 1.0).
        token_weight: beta, weight of next-token CE (research script 0.0: no head is built).
        lr: Adam learning rate (research script 1e-3).
        grad_clip: max gradient norm per step (0 disables; research script 1.0).
    """

    log_stages = True  # log train/stage{s}/... and `stage` (Top-K has a single stage)

    def __init__(self, vocab_size: int = 0, context: ContextConfig | dict | None = None,
                 embedding: EmbeddingConfig | dict | None = None, convergence_weight: float = 1.0,
                 token_weight: float = 0.0, lr: float = 1e-3, grad_clip: float = 1.0):
        super().__init__()
        context = ContextConfig.coerce({**RESEARCH_CONTEXT, **context} if isinstance(context, dict)
                                       else context or dict(RESEARCH_CONTEXT))
        embedding = EmbeddingConfig.coerce({**RESEARCH_EMBEDDING, **embedding} if isinstance(embedding, dict)
                                           else embedding or dict(RESEARCH_EMBEDDING))
        check(isinstance(vocab_size, int) and vocab_size > 0,
              f"model.vocab_size={vocab_size!r} is invalid: expected a positive integer (the CLI links it from the data).")
        check_positive("model.convergence_weight", convergence_weight, allow_zero=True)
        check_positive("model.token_weight", token_weight, allow_zero=True)
        check(convergence_weight + token_weight > 0,
              "model.convergence_weight and model.token_weight are both 0: nothing to train; set one > 0.")
        check_positive("model.lr", lr)
        check_positive("model.grad_clip", grad_clip, allow_zero=True)
        self.embedding, self.updater, self.head = self.build_parts(vocab_size, context, embedding, token_weight)
        embedding = EmbeddingConfig(**{**embedding.to_dict(), "embed_dim": self.embedding.embed_dim})
        self.save_hyperparameters({"vocab_size": vocab_size, "context": context.to_dict(),
                                   "embedding": embedding.to_dict(), "convergence_weight": convergence_weight,
                                   "token_weight": token_weight, "lr": lr, "grad_clip": grad_clip})
        self.train_conv, self.train_change, self.train_metric = MeanMetric(), MeanMetric(), MeanMetric()
        self.train_token = MeanMetric()
        self._ends: dict[int, Tensor] = {}  # phrase index -> last cycle-end context of this epoch
        self._stage = 1

    @staticmethod
    def build_parts(vocab_size: int, context: ContextConfig, embedding: EmbeddingConfig, token_weight: float):
        """Embedding, updater and (when ``token_weight > 0``) the CE head, freshly initialised."""
        emb = build_embedding(vocab_size, embedding, default_dim=context.context_dim)
        updater = build_context_updater(context, emb.embed_dim)
        head = nn.Linear(context.context_dim, vocab_size) if token_weight > 0 else None
        return emb, updater, head

    # ---- the model -----------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        """Contexts of a sequential pass from ``c = 0``: ``(B, T) -> (B, T, D)``."""
        return unroll(self.updater, self.embedding(input_ids))

    def configure_optimizers(self):
        return configure_adam(self)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def batch_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, CycleStats, Tensor | None, Tensor]:
        """``(loss, stats, token CE or None, contexts (B, T, D))`` of a batch."""
        hp = self.hparams
        contexts = self(batch["input_ids"])
        stats = cycle_stats(contexts.float(), batch["cycle_length"], batch["mask"])
        loss = hp.convergence_weight * stats.conv_loss
        token_loss = None
        if self.head is not None:
            logits = self.head(contexts)  # (B, T, V)
            token_sum = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                        ignore_index=IGNORE_INDEX, reduction="sum")
            token_loss = token_sum / (batch["targets"] != IGNORE_INDEX).sum().clamp_min(1)
            loss = loss + hp.token_weight * token_loss
        return loss, stats, token_loss, contexts

    def _global_loss(self, batch: dict[str, Tensor], stats: CycleStats,
                     token_loss: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """DDP: ``(loss to backpropagate, loss of the global batch, its real rows)``.

        The global batch is the W ranks' batches together: its cyclic MSE averages over all
        their pairs and its CE over all their targets. DDP averages the ranks' gradients, so
        each rank returns its sums times ``W`` over the global counts.
        """
        hp, W = self.hparams, self.trainer.world_size
        conv_sum = stats.conv_loss * stats.pairs
        tokens = (batch["targets"] != IGNORE_INDEX).sum()
        token_sum = token_loss * tokens if token_loss is not None else conv_sum.new_zeros(())
        local = torch.stack([conv_sum.detach(), conv_sum.new_tensor(float(stats.pairs)), token_sum.detach(),
                             tokens.to(conv_sum.dtype), batch["mask"].any(dim=1).sum().to(conv_sum.dtype)])
        total = self.trainer.strategy.reduce(local, reduce_op="sum")
        pairs, targets = total[1].clamp_min(1), total[3].clamp_min(1)
        loss = hp.convergence_weight * conv_sum * W / pairs + hp.token_weight * token_sum * W / targets
        value = hp.convergence_weight * total[0] / pairs + hp.token_weight * total[2] / targets
        return loss, value, total[4]

    # ---- training ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        private_metric_states(self)

    def on_train_epoch_start(self) -> None:
        self._ends = {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, stats, token_loss, contexts = self.batch_loss(batch)
        value, rows = loss.detach(), batch["input_ids"].shape[0]
        if self.trainer.world_size > 1:  # the loss of the ranks' batches together, as one process has it
            loss, value, rows = self._global_loss(batch, stats, token_loss)
        if stats.pairs:
            self.train_conv.update(stats.conv_loss.detach(), weight=stats.pairs)
            self.train_metric.update(stats.conv_metric, weight=stats.pairs)
        if stats.steps:
            self.train_change.update(stats.change, weight=stats.steps)
        self.log("train/loss", value, on_step=True, on_epoch=True, batch_size=int(rows))
        self.log("train/conv_loss", self.train_conv, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/change", self.train_change, on_step=False, on_epoch=True)
        self.log("train/conv_metric", self.train_metric, on_step=False, on_epoch=True)
        if token_loss is not None:
            tokens = int((batch["targets"] != IGNORE_INDEX).sum())
            if tokens:
                self.train_token.update(token_loss.detach(), weight=tokens)
            self.log("train/token_loss", self.train_token, on_step=False, on_epoch=True)
        ends = cycle_end_contexts(contexts.detach().float(), batch["cycle_length"], batch["mask"])
        for row, index in enumerate(batch["index"].tolist()):
            if index >= 0:  # not a padding row
                self._ends[index] = ends[row]
        self._stage = int(batch["stage"][0]) if "stage" in batch else 1
        return loss

    def on_train_epoch_end(self) -> None:
        if self.log_stages:
            s = self._stage
            self.log("stage", float(s))
            for name, metric in (("conv_loss", self.train_conv), ("change", self.train_change),
                                 ("conv_metric", self.train_metric)):
                if metric.update_called:
                    self.log(f"train/stage{s}/{name}", metric.compute())
            ends = self._all_ends()
            if len(ends) >= 2:
                stats = attractor_stats(torch.stack([ends[k] for k in sorted(ends)]))
                self.log("diag/attractor_distance", stats["attractor_distance"])
                self.log("diag/attractor_cosine", stats["attractor_cosine"])

    def _all_ends(self) -> dict[int, Tensor]:
        """The epoch's cycle-end contexts of every phrase, from all DDP ranks."""
        if self.trainer.world_size == 1:
            return self._ends
        keys = sorted(self._ends)
        count = self.all_gather(torch.tensor(len(keys), device=self.device))
        width = int(count.max())  # ranks saw different numbers of phrases: pad to one shape
        index = torch.full((width,), -1, dtype=torch.long, device=self.device)
        ends = torch.zeros(width, self.updater.context_dim, device=self.device)
        if keys:
            index[:len(keys)] = torch.tensor(keys, device=self.device)
            ends[:len(keys)] = torch.stack([self._ends[k] for k in keys])
        index, ends = self.all_gather(index).reshape(-1), self.all_gather(ends).reshape(-1, ends.shape[-1])
        return {int(k): e for k, e in zip(index.tolist(), ends) if k >= 0}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(self, checkpoint)
        check_checkpoint_fits(self, checkpoint)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Besides config (hyper_parameters) and weights, keep the last logged metrics."""
        metrics = getattr(self.trainer, "callback_metrics", {}) if self._trainer is not None else {}
        checkpoint["metrics"] = {k: float(v) for k, v in metrics.items()}
