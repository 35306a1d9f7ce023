"""Token embedding: learned, or the input embedding of a pretrained HF model (GPT-2 ``wte``).

``TokenEmbedding(ids) = LN(E[ids])`` (LayerNorm without affine parameters when
``layer_norm``), ``(...,) -> (..., embed_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cvfp_lightning.errors import ConfigMixin, CVFPUserError, check, check_positive


@dataclass
class EmbeddingConfig(ConfigMixin):
    """Token embedding options.

    Args:
        embed_dim: width E. None: the context width for a learned embedding, the
            pretrained model's width for a pretrained one.
        pretrained: a HF hub name (``gpt2``) or a local folder saved with
            ``save_pretrained``; its input embedding matrix initialises ours.
        freeze: keep the embedding fixed during training.
        layer_norm: LayerNorm (no affine) on the looked-up vectors.
        init_std: std of the normal init of a learned embedding: N(0, 0.02), the research code's
            stand-in for GPT-2's ``wte``. The context block reads ``LN(E[ids])``, so the scale
            matters only where the raw matrix is used: a head tied to it starts with logits of
            std ``init_std * sqrt(E)`` (0.55 at E = 768; with N(0, 1) they were 28 and the first
            loss 410 nats), and a trained embedding's Adam steps are relative to it.
        trust_remote_code: passed to ``AutoModel.from_pretrained``; off unless you set it.
    """

    _name = "embedding"  # for messages (a class attribute, not a field)
    embed_dim: int | None = None
    pretrained: str | None = None
    freeze: bool = True
    layer_norm: bool = True
    init_std: float = 0.02
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.embed_dim is not None:
            check(isinstance(self.embed_dim, int) and not isinstance(self.embed_dim, bool),
                  f"embedding.embed_dim={self.embed_dim!r} is invalid: expected an integer.")
            check_positive("embedding.embed_dim", self.embed_dim)
        check_positive("embedding.init_std", self.init_std)


def load_pretrained_embedding(name_or_path: str, trust_remote_code: bool = False) -> Tensor:
    """Return the ``(vocab, E)`` input embedding matrix of a HF model (hub name or folder)."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CVFPUserError(
            f"embedding.pretrained={name_or_path!r} could not be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pass a local folder saved with "
            "save_pretrained, allow hub access (unset HF_HUB_OFFLINE), or set embedding.pretrained: null "
            "for a learned embedding.") from exc
    return model.get_input_embeddings().weight.detach().clone()


class TokenEmbedding(nn.Module):
    """``ids (...,) -> LN(E[ids]) (..., embed_dim)``."""

    def __init__(self, vocab_size: int, embed_dim: int, *, freeze: bool = True, layer_norm: bool = True,
                 init_std: float = 0.02, weight: Tensor | None = None):
        super().__init__()
        check_positive("vocab_size", vocab_size)
        self.vocab_size, self.embed_dim = vocab_size, embed_dim
        self.embed = nn.Embedding(vocab_size, embed_dim)
        if weight is not None:
            check(tuple(weight.shape) == (vocab_size, embed_dim),
                  f"pretrained embedding has shape {tuple(weight.shape)}, expected ({vocab_size}, {embed_dim}): "
                  "the tokenizer's vocabulary size must equal the pretrained model's; use that model's tokenizer.")
            with torch.no_grad():
                self.embed.weight.copy_(weight)
        else:
            nn.init.normal_(self.embed.weight, 0.0, init_std)
        self.embed.weight.requires_grad_(not freeze)
        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False) if layer_norm else nn.Identity()

    @property
    def weight(self) -> Tensor:
        return self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.norm(self.embed(ids))


def build_embedding(vocab_size: int, cfg: EmbeddingConfig | dict | None, default_dim: int,
                    load_pretrained: bool = True) -> TokenEmbedding:
    """Build the embedding of ``cfg``; with ``load_pretrained`` fetch the pretrained matrix.

    ``load_pretrained=False`` builds the right shape without touching the hub (used when
    the weights come from a checkpoint anyway); the width then must be known from
    ``cfg.embed_dim``.
    """
    cfg = EmbeddingConfig.coerce(cfg)
    weight = None
    embed_dim = cfg.embed_dim or default_dim
    if cfg.pretrained and load_pretrained:
        weight = load_pretrained_embedding(cfg.pretrained, cfg.trust_remote_code)
        check(weight.shape[0] == vocab_size,
              f"embedding.pretrained={cfg.pretrained!r} has a vocabulary of {weight.shape[0]} tokens but the "
              f"tokenizer has {vocab_size}: use the tokenizer of that model (e.g. --data.tokenizer {cfg.pretrained}).")
        check(cfg.embed_dim is None or cfg.embed_dim == weight.shape[1],
              f"embedding.embed_dim={cfg.embed_dim} differs from the pretrained width {weight.shape[1]}: "
              "leave embed_dim unset (null) to take the pretrained width.")
        embed_dim = weight.shape[1]
    return TokenEmbedding(vocab_size, embed_dim, freeze=cfg.freeze, layer_norm=cfg.layer_norm,
                          init_std=cfg.init_std, weight=weight)
