"""The CVFP language model: embedding -> frozen context block -> token block -> head.

For position i of a sequence with ids ``x_0 .. x_{T-1}``:

    e_i                 = embedding(x_i)                                   (E,)
    c_i, [c_i1..c_iL]   = updater.update_context_one_step(c_{i-1}, e_i,
                                                          return_all_layers=True)   c_{-1} = 0
    t_i                 = TokenBlock([c_i1 .. c_iL], e_i, [e_{i-1} .. e_{i-K}])   (E,)
    logits_i            = head(t_i)                                        (V,) -> predicts x_{i+1}

The history ``e_{i-1} .. e_{i-K}`` (``token_history`` K, default 0: none) are the token
embeddings of the K ids before position i in its sequence, 0 where it has fewer.

With a ``continuous_cache`` (:mod:`cvfp_lightning.models.continuous_cache`), reading text
(scoring it, generating) mixes ``softmax(logits_i)`` with the ids that followed the earlier
positions whose ``t_j`` are most like ``t_i``; training reads ``logits_i`` alone.

The context block (the Phase 1 updater) is frozen, so the contexts of a fixed text never
change during Phase 2: they are computed once (or read from the cache) and position
batches can be shuffled. The head is a zero-initialised ``Linear(E, V)`` (first loss
``ln V``) or, with ``weight_tying``, shares its weight tensor with the embedding matrix.

With ``dropout`` p > 0, training (``module.train()``) drops each entry of ``c_il``, ``e_i`` and
its history (as the token block reads them) and ``t_i`` (before the head) with probability p (``nn.Dropout``,
kept ones scaled by 1 / (1 - p)); the contexts themselves and every evaluation are untouched.

With ``train_embedding`` the embedding trains (and a tied head with it) while the context
block keeps reading a frozen copy of the Phase 1 embedding (``context_embedding``), so the
contexts stay those of Phase 1.
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from cvfp_lightning.errors import check
from cvfp_lightning.generation import decode
from cvfp_lightning.models.context import ContextUpdater
from cvfp_lightning.models.continuous_cache import ContinuousCache
from cvfp_lightning.models.embedding import TokenEmbedding
from cvfp_lightning.models.token import TokenBlock


class ReadState(NamedTuple):
    """What :meth:`CVFPLanguageModel.read` carries from token to token (batch of B texts)."""

    context: Tensor  #: ``(B, D)``, the final context after the last id read
    recent: Tensor  #: ``(B, K)``, the last K ids read, newest first (-1: none)
    memory_keys: Tensor  #: ``(B, m, E)``, the continuous cache's keys (m = 0 without one)
    memory_next: Tensor  #: ``(B, m)``, the id that followed each key
    last: Tensor | None  #: ``(B, E)``, the key of the last id read (its next id is not yet known)


def _remember(keys: Tensor, nexts: Tensor, key: Tensor, nxt: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """A continuous cache's memory ``keys (B, m, E), nexts (B, m)`` with ``key (B, E)`` followed by
    ``nxt (B, 1)`` (-1: no next id) appended, the last ``size`` kept."""
    return (torch.cat([keys, key.unsqueeze(1)], dim=1)[:, -size:],
            torch.cat([nexts, nxt.to(nexts)], dim=1)[:, -size:])


class CVFPLanguageModel(nn.Module):
    """Embedding + frozen context block + token block + head.

    Args:
        embedding: the token embedding (``vocab_size x E``).
        updater: the (Phase 1) context block; its parameters are frozen here.
        weight_tying: the head's weight *is* the embedding matrix (same storage); it then
            trains only when the embedding does.
        train_embedding: train the embedding; the context block then reads a frozen copy.
        dropout: training-time dropout on the token block's inputs and output (0 disables).
        token_history: K, the ids before each position whose embeddings the token block reads
            (:class:`~cvfp_lightning.models.token.TokenBlock`); 0: none, the seed documents' model.
        continuous_cache: the cache of reading text (:class:`ContinuousCache` or a dict of its
            fields); None: the model's own distribution.
    """

    def __init__(self, embedding: TokenEmbedding, updater: ContextUpdater, weight_tying: bool = False,
                 train_embedding: bool = False, dropout: float = 0.0, token_history: int = 0,
                 continuous_cache: ContinuousCache | dict | None = None):
        super().__init__()
        check(0.0 <= dropout < 1.0, f"model.dropout={dropout!r} is invalid: expected a value in [0, 1).")
        check(updater.embed_dim == embedding.embed_dim,
              f"the context block expects {updater.embed_dim}-dim token embeddings but the embedding has "
              f"{embedding.embed_dim}.")
        self.embedding, self.updater = embedding, updater
        self.updater.requires_grad_(False)
        self.context_embedding: TokenEmbedding | None = None
        if train_embedding:
            self.context_embedding = copy.deepcopy(embedding).requires_grad_(False)
        self.embedding.embed.weight.requires_grad_(train_embedding)
        E, V = embedding.embed_dim, embedding.vocab_size
        self.token_block = TokenBlock(updater.layer_dims, E, token_history)
        self.token_history = token_history
        self.continuous_cache = ContinuousCache.from_option(continuous_cache)
        self.drop = nn.Dropout(dropout)
        self.weight_tying = weight_tying
        if weight_tying:
            self.head = nn.Linear(E, V, bias=False)
            self.head.weight = embedding.embed.weight  # one Parameter, one storage
        else:
            self.head = nn.Linear(E, V)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @property
    def continuous_cache(self) -> ContinuousCache | None:
        """How the model reads text (:class:`ContinuousCache`; None: its own distribution); set it to an
        instance, a dict of its fields or None."""
        return self._continuous_cache

    @continuous_cache.setter
    def continuous_cache(self, value: ContinuousCache | dict | None) -> None:
        self._continuous_cache = ContinuousCache.from_option(value)

    @property
    def vocab_size(self) -> int:
        return self.embedding.vocab_size

    def num_trainable_parameters(self) -> int:
        """Trainable parameters, a tied weight counted once."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def context_modules(self) -> tuple[TokenEmbedding, ContextUpdater]:
        """The modules the contexts depend on: the embedding the context block reads, and the block."""
        return (self.embedding if self.context_embedding is None else self.context_embedding), self.updater

    def context_embed(self, ids: Tensor) -> Tensor:
        """The embedding the context block reads: ``(...,) -> (..., E)``."""
        return self.context_modules()[0](ids)

    def history_embeds(self, history: Tensor | None) -> Tensor | None:
        """The token block's history input: ids ``(..., K)``, -1 for none -> ``(..., K, E)``, 0 where -1.

        None without a history (K = 0); with one, ``history`` must hold K ids per position.
        """
        if not self.token_history:
            return None
        if history is None or history.shape[-1] != self.token_history:
            raise ValueError(f"this model reads the {self.token_history} ids before each position: pass history "
                             f"(..., {self.token_history}) (-1 where there is none), got "
                             f"{None if history is None else tuple(history.shape)}.")
        known = history >= 0
        return self.embedding(history.clamp(min=0)) * known.unsqueeze(-1).to(self.embedding.weight.dtype)

    def features(self, context_layers: list[Tensor], token_embed: Tensor, history_embeds: Tensor | None = None) -> Tensor:
        """``t_L``, what the head reads: ``[(..., d_l)] x L, (..., E)``, history ``(..., K, E)`` when K > 0 ``-> (..., E)``.

        In training with ``dropout``, the inputs and the output are dropped."""
        if not (self.training and self.drop.p > 0):
            return self.token_block(context_layers, token_embed, history_embeds)
        dropped_history = None if history_embeds is None else self.drop(history_embeds)
        tokens = self.token_block([self.drop(c) for c in context_layers], self.drop(token_embed), dropped_history)
        return self.drop(tokens)

    def logits(self, context_layers: list[Tensor], token_embed: Tensor, history_embeds: Tensor | None = None) -> Tensor:
        """``head(features)``: ``[(..., d_l)] x L, (..., E)``, history ``(..., K, E)`` when K > 0 ``-> (..., V)``."""
        return self.head(self.features(context_layers, token_embed, history_embeds))

    def step_features(self, context: Tensor, ids: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Read one token: ``context (B, D), ids (B,)``, history ``(B, K)`` ``-> (new context (B, D), t_L (B, E))``."""
        new_context, layers = self.updater.update_context_one_step(context, self.context_embed(ids),
                                                                   return_all_layers=True)
        return new_context, self.features(layers, self.embedding(ids), self.history_embeds(history))

    def step(self, context: Tensor, ids: Tensor, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Read one token: ``context (B, D), ids (B,)`` and, with a history, the ids before them
        ``history (B, K)`` (-1: none) ``-> (new context (B, D), logits (B, V))`` (the model's own, no cache)."""
        new_context, features = self.step_features(context, ids, history)
        return new_context, self.head(features)

    def score_positions(self, batch: dict[str, Tensor], previous: Tensor,
                        rows: Callable[[Tensor], tuple[dict[str, Tensor], Tensor]] | None = None) -> Tensor:
        """Scores ``(n, V)`` of a position batch (``positions``, ``ids``, ``history``, from
        ``TokenSequences.position_batch``) whose contexts before each position are ``previous (n, D)``:
        the logits, or with a ``continuous_cache`` the log-probabilities of the mixture.

        The cache's memory is read through ``rows(positions) -> (position batch, previous
        contexts)`` of the same text: the positions from ``size`` before the batch's first one
        to its last are read once, the batch's own rows among them.
        """
        cache = self.continuous_cache
        if cache is None or cache.weight == 0 or batch["positions"].numel() == 0:
            return self.step(previous, batch["ids"], batch.get("history"))[1]
        check(rows is not None, "scoring with a continuous cache needs the text's earlier positions (rows).")
        positions = batch["positions"].to(previous.device)
        first = int(positions.min())
        span = torch.arange(max(0, first - cache.size), int(positions.max()) + 1)
        span_batch, span_previous = rows(span)
        span_batch = {k: v.to(previous.device) for k, v in span_batch.items()}
        features = self.step_features(span_previous.to(previous.device), span_batch["ids"],
                                      span_batch.get("history"))[1]  # (m, E)
        keys = features[positions - int(span[0])]  # (n, E): the batch's rows
        return cache.log_probs(self.head(keys), keys, positions, features, span_batch["targets"],
                               span_batch["positions"])

    def start_state(self, batch_size: int = 1) -> ReadState:
        """What :meth:`read` carries at a sequence's start: ``c = 0 (B, D)``, no ids before ``(B, K) = -1``,
        an empty cache memory."""
        device = self.embedding.weight.device
        E = self.embedding.embed_dim
        return ReadState(torch.zeros(batch_size, self.updater.context_dim, device=device),
                         torch.full((batch_size, self.token_history), -1, dtype=torch.long, device=device),
                         torch.zeros(batch_size, 0, E, device=device),
                         torch.zeros(batch_size, 0, dtype=torch.long, device=device), None)

    def next_sequence(self, state: ReadState) -> ReadState:
        """The state at the start of the next sequence of the same text, as scoring reads a split: the
        context and the ids before restart (:meth:`start_state`), a continuous cache's memory stays, the
        last position read kept in it without a next id (it counts for the ``size`` window, never as a match)."""
        fresh = self.start_state(state.context.shape[0])
        cache = self.continuous_cache
        if cache is None or state.last is None:
            return fresh._replace(memory_keys=state.memory_keys, memory_next=state.memory_next)
        no_next = torch.full_like(state.memory_next[:, :1], -1)
        keys, nexts = _remember(state.memory_keys, state.memory_next, state.last, no_next, cache.size)
        return fresh._replace(memory_keys=keys, memory_next=nexts)

    def read(self, state: ReadState, ids: Tensor) -> tuple[ReadState, Tensor]:
        """Read ``ids (B, t)`` token by token with :meth:`step_features` from ``state`` (:meth:`start_state`)
        ``-> (state after the last id, scores of the last id (B, V))``: logits, or with a
        ``continuous_cache`` the log-probabilities of the mixture over the memory of everything read
        (the last ``size`` positions with their next ids)."""
        context, recent, memory_keys, memory_next, last = state
        cache = self.continuous_cache if self.continuous_cache is not None and self.continuous_cache.weight > 0 else None
        features = None
        for t in range(ids.shape[1]):
            x = ids[:, t]
            if cache is not None and last is not None:  # the position before now knows its next id: x
                memory_keys, memory_next = _remember(memory_keys, memory_next, last, x.reshape(-1, 1), cache.size)
            context, features = self.step_features(context, x, recent if self.token_history else None)
            recent = torch.cat([ids[:, t:t + 1].to(recent), recent], dim=1)[:, :self.token_history]
            last = features
        logits = None if features is None else self.head(features)
        if cache is not None and features is not None:
            m = memory_keys.shape[1]
            here, before = torch.tensor([m], device=features.device), torch.arange(m, device=features.device)
            logits = torch.cat([cache.log_probs(logits[b:b + 1], features[b:b + 1], here, memory_keys[b],
                                                memory_next[b], before) for b in range(ids.shape[0])])
        return ReadState(context, recent, memory_keys, memory_next, last), logits

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool = False, generator: torch.Generator | None = None, top_p: float | None = None,
                 seed: int | None = None) -> Tensor:
        """Continue ``prompt_ids (T,)`` by ``max_new_tokens`` ids, ``-> (max_new_tokens,)``.

        The context (and the last K ids, with a history) is carried token by token with the
        update rule of training, from ``c = 0`` through the prompt and then through every
        generated token (:meth:`read`);
        the next id is chosen by :func:`cvfp_lightning.generation.decode` (``greedy``, or
        temperature / top-k / top-p sampling with ``generator`` or ``seed``).
        """
        device = self.embedding.weight.device
        return decode(lambda state, ids: self.read(state, ids.to(device)), self.start_state(1), prompt_ids,
                      max_new_tokens, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      generator=generator)
