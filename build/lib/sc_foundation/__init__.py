"""sc_foundation: single-cell foundation models from raw counts to embeddings.

Importing the package registers the model with the transformers Auto classes. Everything else is imported on first
use: the data layer's worker processes import ``sc_foundation.data.store`` and must not pay for Lightning or scanpy.
"""

import importlib

from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import (
    ScFoundationForBatchIntegration,
    ScFoundationForCellClassification,
    ScFoundationForImputation,
    ScFoundationForMaskedGeneModeling,
    ScFoundationForMaskedValueModeling,
    ScFoundationForMultimodal,
    ScFoundationModel,
)

_LAZY = {
    "CorpusDataModule": "data.datamodule",
    "CorpusStore": "data.store",
    "build_store": "data.store",
    "GeneMatchError": "data.tokenization",
    "GeneTokenizer": "data.tokenization",
    "TokenizerConfig": "data.tokenization",
    "GeneVocab": "data.genes",
    "resolve_genes": "data.genes",
    "InvalidInputError": "data.io",
    "counts_from_anndata": "data.io",
    "open_counts": "data.io",
    "TrainingModule": "training.lightning_module",
    "load_pretrained": "models.export",
    "export_pretrained": "models.export",
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
