"""Plain ``nn.Module``s of CVFP models (no Lightning)."""

from cvfp_lightning.models.baselines import RecurrentLM, TransformerLM, build_baseline, match_hidden_dim
from cvfp_lightning.models.context import (
    ContextConfig,
    ContextUpdater,
    GatedContextBlock,
    ResidualContextBlock,
    SimpleContextBlock,
    build_context_updater,
    unroll,
)
from cvfp_lightning.models.embedding import EmbeddingConfig, TokenEmbedding, build_embedding
from cvfp_lightning.models.lm import CVFPLanguageModel
from cvfp_lightning.models.token import TokenBlock

__all__ = [
    "ContextConfig", "ContextUpdater", "GatedContextBlock", "ResidualContextBlock", "SimpleContextBlock",
    "build_context_updater", "unroll", "EmbeddingConfig", "TokenEmbedding", "build_embedding",
]
__all__ += ["TokenBlock", "CVFPLanguageModel", "RecurrentLM", "TransformerLM", "build_baseline", "match_hidden_dim"]
