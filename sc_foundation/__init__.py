"""sc_foundation: single-cell foundation models from raw counts to embeddings.

Importing the package registers the model with the transformers Auto classes.
"""

from .configuration import ScFoundationConfig
from .data import CorpusDataModule
from .genes import GeneVocab, resolve_genes
from .io import InvalidInputError, counts_from_anndata, open_counts
from .modeling import (
    ScFoundationForMaskedGeneModeling,
    ScFoundationForMaskedValueModeling,
    ScFoundationModel,
)
from .store import CorpusStore, build_store
from .tokenization import GeneMatchError, GeneTokenizer, TokenizerConfig

__all__ = [
    "CorpusDataModule",
    "CorpusStore",
    "GeneMatchError",
    "GeneTokenizer",
    "GeneVocab",
    "InvalidInputError",
    "ScFoundationConfig",
    "ScFoundationForMaskedGeneModeling",
    "ScFoundationForMaskedValueModeling",
    "ScFoundationModel",
    "TokenizerConfig",
    "build_store",
    "counts_from_anndata",
    "open_counts",
    "resolve_genes",
]
