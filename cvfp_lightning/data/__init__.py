"""LightningDataModules and tokenisation."""

from cvfp_lightning.data.base import TokenDataModule
from cvfp_lightning.data.sequences import IGNORE_INDEX, PositionChunks, PositionCollate, TokenSequences, Windows
from cvfp_lightning.data.repetition import RepeatedPhraseDataModule
from cvfp_lightning.data.text import SyntheticTokensDataModule, TextDataModule, UltraChatDataModule
from cvfp_lightning.data.tokenizer import load_tokenizer
from cvfp_lightning.data.topk import TopKRoundRobinDataModule

__all__ = [
    "TokenDataModule", "TextDataModule", "UltraChatDataModule", "SyntheticTokensDataModule", "TokenSequences",
    "PositionChunks", "PositionCollate", "Windows", "IGNORE_INDEX", "load_tokenizer",
]
__all__ += ["RepeatedPhraseDataModule", "TopKRoundRobinDataModule"]
