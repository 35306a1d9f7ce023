"""The CVFP language model: embedding -> frozen context block -> token block -> head.

For position i of a sequence with ids ``x_0 .. x_{T-1}``:

    e_i                 = embedding(x_i)                                   (E,)
    c_i, [c_i1..c_iL]   = updater.update_context_one_step(c_{i-1}, e_i,
                                                          return_all_layers=True)   c_{-1} = 0
    t_i                 = TokenBlock([c_i1 .. c_iL], e_i)                  (E,)
    logits_i            = head(t_i)                                        (V,) -> predicts x_{i+1}

The context block (the Phase 1 updater) is frozen, so the contexts of a fixed text never
change during Phase 2: they are computed once (or read from the cache) and position
batches can be shuffled. The head is a zero-initialised ``Linear(E, V)`` (first loss
``ln V``) or, with ``weight_tying``, shares its weight tensor with the embedding matrix.

With ``dropout`` p > 0, training (``module.train()``) drops each entry of ``c_il``, ``e_i`` (as
the token block reads it) and ``t_i`` (before the head) with probability p (``nn.Dropout``,
kept ones scaled by 1 / (1 - p)); the contexts themselves and every evaluation are untouched.

With ``train_embedding`` the embedding trains (and a tied head with it) while the context
block keeps reading a frozen copy of the Phase 1 embedding (``context_embedding``), so the
contexts stay those of Phase 1.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from cvfp_lightning.errors import check
from cvfp_lightning.generation import decode
from cvfp_lightning.models.context import ContextUpdater
from cvfp_lightning.models.embedding import TokenEmbedding
from cvfp_lightning.models.token import TokenBlock


class CVFPLanguageModel(nn.Module):
    """Embedding + frozen context block + token block + head.

    Args:
        embedding: the token embedding (``vocab_size x E``).
        updater: the (Phase 1) context block; its parameters are frozen here.
        weight_tying: the head's weight *is* the embedding matrix (same storage); it then
            trains only when the embedding does.
        train_embedding: train the embedding; the context block then reads a frozen copy.
        dropout: training-time dropout on the token block's inputs and output (0 disables).
    """

    def __init__(self, embedding: TokenEmbedding, updater: ContextUpdater, weight_tying: bool = False,
                 train_embedding: bool = False, dropout: float = 0.0):
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
        self.token_block = TokenBlock(updater.layer_dims, E)
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

    def logits(self, context_layers: list[Tensor], token_embed: Tensor) -> Tensor:
        """``[(..., d_l)] x L, (..., E) -> (..., V)``."""
        if not (self.training and self.drop.p > 0):
            return self.head(self.token_block(context_layers, token_embed))
        tokens = self.token_block([self.drop(c) for c in context_layers], self.drop(token_embed))
        return self.head(self.drop(tokens))

    def step(self, context: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Read one token: ``context (B, D), ids (B,) -> (new context (B, D), logits (B, V))``."""
        new_context, layers = self.updater.update_context_one_step(context, self.context_embed(ids),
                                                                   return_all_layers=True)
        return new_context, self.logits(layers, self.embedding(ids))

    def read(self, context: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Read ``ids (B, t)`` token by token from ``context (B, D)`` with :meth:`step`:
        ``-> (context after the last id (B, D), logits of the last id (B, V))``."""
        logits = None
        for t in range(ids.shape[1]):
            context, logits = self.step(context, ids[:, t])
        return context, logits

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 greedy: bool = False, generator: torch.Generator | None = None, top_p: float | None = None,
                 seed: int | None = None) -> Tensor:
        """Continue ``prompt_ids (T,)`` by ``max_new_tokens`` ids, ``-> (max_new_tokens,)``.

        The context is carried token by token with the update rule of training, from
        ``c = 0`` through the prompt and then through every generated token (:meth:`read`);
        the next id is chosen by :func:`cvfp_lightning.generation.decode` (``greedy``, or
        temperature / top-k / top-p sampling with ``generator`` or ``seed``).
        """
        device = self.embedding.weight.device
        context = torch.zeros(1, self.updater.context_dim, device=device)
        return decode(lambda c, ids: self.read(c, ids.to(device)), context, prompt_ids, max_new_tokens,
                      greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      generator=generator)
