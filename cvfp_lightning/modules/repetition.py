"""Repetition CVFP training (seed: repetition-training): a context that returns to itself
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

Seed CLI parameters: ``--lr``, ``--convergence-weight``, ``--token-weight`` are arguments
here; ``--context-dim``, ``--hidden-dim``, ``--layers`` live in ``context``; ``--embed-dim``
in ``embedding``; the data ones in
:class:`~cvfp_lightning.data.repetition.RepeatedPhraseDataModule`; ``--device`` is
``trainer.accelerator`` and ``--output-dir`` the logger's ``save_dir`` (checkpoints go to
``<save_dir>/<name>/version_N/checkpoints``).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from cvfp_lightning.data.sequences import IGNORE_INDEX
from cvfp_lightning.diagnostics import attractor_stats
from cvfp_lightning.errors import check, check_positive
from cvfp_lightning.losses import cyclic_convergence_loss
from cvfp_lightning.models.context import ContextConfig, build_context_updater, unroll
from cvfp_lightning.models.embedding import EmbeddingConfig, build_embedding
from cvfp_lightning.models.legacy import upgrade_checkpoint
from cvfp_lightning.optim import configure_adam

# the seed's model: context 256, embed 256, hidden 512, 2 FNN layers, the simple updater
SEED_CONTEXT = {"updater": "simple", "context_dim": 256, "hidden_dim": 512, "num_layers": 2}
SEED_EMBEDDING = {"embed_dim": 256, "freeze": False, "init_std": 1.0}  # torch's nn.Embedding init, as the seed


@dataclass
class CycleStats:
    """Statistics of one batch of contexts (see :func:`cycle_stats`).

    ``conv_loss`` keeps its graph; the rest are detached. ``pairs`` / ``steps`` count the
    real (t, t-L) pairs and (t, t-1) steps behind the means.
    """

    conv_loss: Tensor
    conv_metric: Tensor
    change: Tensor
    pairs: int
    steps: int


def cycle_stats(contexts: Tensor, cycle_length: Tensor, mask: Tensor) -> CycleStats:
    """Cyclic loss and distances of ``contexts (B, T, D)`` with per-row ``cycle_length (B,)``
    and ``mask (B, T)`` (True = real position; padding only at the end of a row).

    ``conv_loss`` = mean over all real pairs of ``per_dim_mse(ctx[t], ctx[t - L_b])``
    (:func:`~cvfp_lightning.losses.cyclic_convergence_loss` per group of equal L, weighted
    by pair count), ``conv_metric`` = mean ``||ctx[t] - ctx[t - L_b]||_2`` over the same
    pairs, ``change`` = mean ``||ctx[t] - ctx[t - 1]||_2`` over real consecutive positions.
    """
    total_loss = contexts.sum() * 0.0
    dist_sum = contexts.new_zeros(())
    pairs = 0
    for L in cycle_length.unique().tolist():
        rows = cycle_length == L
        c, m = contexts[rows], mask[rows]
        pair_mask = m[:, L:] & m[:, :-L]
        n = int(pair_mask.sum())
        if n == 0:
            continue
        total_loss = total_loss + cyclic_convergence_loss(c, L, m) * n
        dist = (c[:, L:] - c[:, :-L]).detach().norm(dim=-1)
        dist_sum = dist_sum + dist[pair_mask].sum()
        pairs += n
    step_mask = mask[:, 1:] & mask[:, :-1]
    steps = int(step_mask.sum())
    change = (contexts[:, 1:] - contexts[:, :-1]).detach().norm(dim=-1)[step_mask].sum()
    return CycleStats(conv_loss=total_loss / max(pairs, 1), conv_metric=dist_sum / max(pairs, 1),
                      change=change / max(steps, 1), pairs=pairs, steps=steps)


def cycle_end_contexts(contexts: Tensor, cycle_length: Tensor, mask: Tensor) -> Tensor:
    """Context of each row at its last complete cycle: ``(B, T, D) -> (B, D)``.

    Row b with ``n_b`` real positions ends its last whole cycle at
    ``t = (n_b // L_b) * L_b - 1``; comparing rows there compares the same phase of every
    cycle (after a whole phrase), which matters when the L_b differ.
    """
    n = mask.sum(dim=1)
    last = (n // cycle_length) * cycle_length - 1
    return contexts[torch.arange(contexts.shape[0], device=contexts.device), last.clamp_min(0)]


class RepetitionCVFPT(L.LightningModule):
    """Repetition CVFP training (formulas in the module docstring).

    Args:
        vocab_size: number of token ids (linked from ``data.vocab_size`` by the CLI).
        context: the context block; None: the seed's (``simple``, 256 / 512 / 2 layers).
            A mapping fills missing keys from the seed's values.
        embedding: the token embedding; None: the seed's (learned, 256 wide, trained).
        convergence_weight: alpha, weight of the cyclic MSE (seed 1.0).
        token_weight: beta, weight of next-token CE (seed 0.0: no head is built).
        lr: Adam learning rate (seed 1e-3).
        grad_clip: max gradient norm per step (0 disables; seed 1.0).
    """

    log_stages = True  # log train/stage{s}/... and `stage` (Top-K has a single stage)

    def __init__(self, vocab_size: int = 0, context: ContextConfig | dict | None = None,
                 embedding: EmbeddingConfig | dict | None = None, convergence_weight: float = 1.0,
                 token_weight: float = 0.0, lr: float = 1e-3, grad_clip: float = 1.0):
        super().__init__()
        context = ContextConfig.coerce({**SEED_CONTEXT, **context} if isinstance(context, dict)
                                       else context or dict(SEED_CONTEXT))
        embedding = EmbeddingConfig.coerce({**SEED_EMBEDDING, **embedding} if isinstance(embedding, dict)
                                           else embedding or dict(SEED_EMBEDDING))
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

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        if clip and clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def batch_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, CycleStats, Tensor | None, Tensor]:
        """``(loss, stats, token CE or None, contexts (B, T, D))`` of a batch."""
        hp = self.hparams
        contexts = self(batch["input_ids"])
        stats = cycle_stats(contexts.float(), batch["cycle_length"], batch["mask"])
        loss = hp.convergence_weight * stats.conv_loss
        token_loss = None
        if self.head is not None:
            logits = self.head(contexts)  # (B, T, V)
            token_loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(),
                                         ignore_index=IGNORE_INDEX)
            loss = loss + hp.token_weight * token_loss
        return loss, stats, token_loss, contexts

    # ---- training ------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._ends = {}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, stats, token_loss, contexts = self.batch_loss(batch)
        if stats.pairs:
            self.train_conv.update(stats.conv_loss.detach(), weight=stats.pairs)
            self.train_metric.update(stats.conv_metric, weight=stats.pairs)
        if stats.steps:
            self.train_change.update(stats.change, weight=stats.steps)
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/conv_loss", self.train_conv, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/change", self.train_change, on_step=False, on_epoch=True)
        self.log("train/conv_metric", self.train_metric, on_step=False, on_epoch=True)
        if token_loss is not None:
            self.train_token.update(token_loss.detach())
            self.log("train/token_loss", self.train_token, on_step=False, on_epoch=True)
        ends = cycle_end_contexts(contexts.detach().float(), batch["cycle_length"], batch["mask"])
        for row, index in enumerate(batch["index"].tolist()):
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
            if len(self._ends) >= 2:
                stats = attractor_stats(torch.stack([self._ends[k] for k in sorted(self._ends)]))
                self.log("diag/attractor_distance", stats["attractor_distance"])
                self.log("diag/attractor_cosine", stats["attractor_cosine"])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_checkpoint(self, checkpoint)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Besides config (hyper_parameters) and weights, keep the last logged metrics."""
        metrics = getattr(self.trainer, "callback_metrics", {}) if self._trainer is not None else {}
        checkpoint["metrics"] = {k: float(v) for k, v in metrics.items()}
