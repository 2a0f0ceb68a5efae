"""sc_foundation: single-cell foundation models from raw counts to embeddings.

Importing the package registers the model with the transformers Auto classes. Everything else is imported on first
use: the data layer's worker processes import ``sc_foundation.store`` and must not pay for Lightning or scanpy.
"""

import importlib

from .configuration import ScFoundationConfig
from .modeling import (
    ScFoundationForBatchIntegration,
    ScFoundationForCellClassification,
    ScFoundationForImputation,
    ScFoundationForMaskedGeneModeling,
    ScFoundationForMaskedValueModeling,
    ScFoundationForMultimodal,
    ScFoundationModel,
)

_LAZY = {
    "CorpusDataModule": "data",
    "CorpusStore": "store",
    "build_store": "store",
    "GeneMatchError": "tokenization",
    "GeneTokenizer": "tokenization",
    "TokenizerConfig": "tokenization",
    "GeneVocab": "genes",
    "resolve_genes": "genes",
    "InvalidInputError": "io",
    "counts_from_anndata": "io",
    "open_counts": "io",
    "TrainingModule": "training",
    "load_pretrained": "export",
    "export_pretrained": "export",
    "embed": "inference",
    "annotate": "inference",
    "impute": "inference",
    "predict_modality": "inference",
    "transfer_labels": "inference",
}

__all__ = [
    "ScFoundationConfig",
    "ScFoundationForBatchIntegration",
    "ScFoundationForCellClassification",
    "ScFoundationForImputation",
    "ScFoundationForMaskedGeneModeling",
    "ScFoundationForMaskedValueModeling",
    "ScFoundationForMultimodal",
    "ScFoundationModel",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
