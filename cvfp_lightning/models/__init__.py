"""Plain ``nn.Module``s of CVFP models (no Lightning)."""

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

__all__ = [
    "ContextConfig", "ContextUpdater", "GatedContextBlock", "ResidualContextBlock", "SimpleContextBlock",
    "build_context_updater", "unroll", "EmbeddingConfig", "TokenEmbedding", "build_embedding",
]
