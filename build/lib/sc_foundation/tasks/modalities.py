"""A second modality beside RNA (surface protein, chromatin accessibility): reading, normalising and scoring it.

Protein (ADT) counts are CLR-normalised within each cell, ``log1p(x) - mean(log1p(x))`` over the antibodies (the
Seurat/muon convention for ADTs). ATAC counts become binary accessibility (open or not) over a panel of the most
often open peaks. A prediction of the modality from RNA is scored by Pearson correlation per feature (across cells)
and per cell (across features), and compared with a ridge regression from the RNA PCA fitted on the same training
cells (DESIGN.md §6).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sc_foundation.data.io import InvalidInputError

MODALITIES = ("protein", "atac")


def read_modality(path: str | os.PathLike, cell_ids: Sequence[str], *, layer: str | None = None) -> anndata.AnnData:
    """The second modality's raw counts of the given cells, in their order.

    Args:
        path: an ``.h5ad`` whose ``obs_names`` are the cell ids of the RNA file it belongs to.
        cell_ids: (n,) the RNA cells to read.
        layer: the layer holding the counts (default ``X``).
    Returns:
        (n, n_features) float32 CSR counts, ``var_names`` the feature names.
    Raises:
        InvalidInputError: the file is missing, or lacks some of the cells (how many, with examples), or the
            counts are negative.
    """
    if not os.path.exists(path):
        raise InvalidInputError(f"{path}: no such modality file. Check modality.files.")
    adata = anndata.read_h5ad(path)
    rows = adata.obs_names.get_indexer(pd.Index(cell_ids))
    if (rows < 0).any():
        missing = np.asarray(cell_ids)[rows < 0]
        raise InvalidInputError(
            f"{path}: {len(missing)} of {len(cell_ids)} RNA cells have no row here, e.g. {list(missing[:5])}; "
            "the modality file's obs_names must be the RNA file's cell ids (the same cells, measured together)."
        )
    x = adata.layers[layer] if layer else adata.X
    x = sp.csr_matrix(x, dtype=np.float32)[rows]
    if x.nnz and x.data.min() < 0:
        raise InvalidInputError(f"{path}: negative values; the modality needs raw counts (pass layer=...)")
    out = anndata.AnnData(x)
    out.var_names = adata.var_names.astype(str)
    out.obs_names = pd.Index(cell_ids).astype(str)
    return out


def select_features(counts: anndata.AnnData, kind: str, n_features: int) -> np.ndarray:
    """The features the model will predict: every antibody (protein), or the ``n_features`` peaks open in the most
    cells (ATAC). Returns (F,) sorted column indices."""
    check_kind(kind)
    if kind == "protein" or counts.n_vars <= n_features:
        return np.arange(counts.n_vars)
    open_cells = np.diff(sp.csc_matrix(counts.X).indptr)  # (n_features,) cells in which each peak is open
    return np.sort(np.argsort(-open_cells, kind="stable")[:n_features])


def normalise_modality(counts: sp.spmatrix, kind: str) -> np.ndarray:
    """(n, F) raw counts -> (n, F) float32 model values: per-cell CLR (protein) or 0/1 accessibility (ATAC)."""
    check_kind(kind)
    x = np.asarray(sp.csr_matrix(counts).todense(), dtype=np.float32)
    if kind == "atac":
        return (x > 0).astype(np.float32)
    logged = np.log1p(x)
    return logged - logged.mean(axis=1, keepdims=True)


def check_kind(kind: str) -> None:
    if kind not in MODALITIES:
        raise ValueError(f"modality kind must be one of {MODALITIES}, got {kind!r}")


def prediction_metrics(true: np.ndarray, predicted: np.ndarray, feature_names: Sequence[str]) -> dict:
    """Pearson correlation of a predicted modality per feature (across cells) and per cell (across features).

    Args:
        true, predicted: (n_cells, F).
    Returns:
        ``pearson_feature_mean`` / ``_median`` over the features that vary in both, ``pearson_cell_mean`` over the
        cells that do, ``per_feature`` (name -> r, NaN where undefined), ``n_cells``, ``n_features_scored``.
    """
    per_feature = _columnwise_pearson(true, predicted)
    per_cell = _columnwise_pearson(true.T, predicted.T)
    scored = per_feature[np.isfinite(per_feature)]
    return {
        "pearson_feature_mean": float(scored.mean()) if len(scored) else float("nan"),
        "pearson_feature_median": float(np.median(scored)) if len(scored) else float("nan"),
        "pearson_cell_mean": float(np.nanmean(per_cell)) if np.isfinite(per_cell).any() else float("nan"),
        "per_feature": {name: float(r) for name, r in zip(feature_names, per_feature, strict=True)},
        "n_cells": len(true),
        "n_features_scored": len(scored),
    }


def _columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, F), (n, F) -> (F,) Pearson r of each column pair; NaN where a column is constant."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a, axis=0)
    b = np.asarray(b, dtype=np.float64) - np.mean(b, axis=0)
    denominator = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(0) / denominator, np.nan)


def ridge_from_rna_pca(
    rna: anndata.AnnData,
    targets: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    *,
    n_top_genes: int = 2000,
    n_pcs: int = 50,
) -> np.ndarray:
    """The baseline: ridge regression (alpha by cross-validation) from the PCA of log-normalised RNA HVGs.

    The HVG selection, scaling, PCA and ridge are fitted on the ``train`` cells only.

    Args:
        rna: (n_cells, n_genes) raw RNA counts.
        targets: (n_cells, F) the normalised second modality.
        train, test: row indices.
    Returns:
        (len(test), F) float32 predictions.
    """
    adata = rna.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    hvg = sc.pp.highly_variable_genes(adata[train], n_top_genes=min(n_top_genes, adata.n_vars), inplace=False)
    x = adata.X[:, hvg["highly_variable"].to_numpy()]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    n_components = min(n_pcs, len(train) - 1, x.shape[1])
    model = make_pipeline(
        StandardScaler(), PCA(n_components=n_components, random_state=0), RidgeCV(alphas=np.logspace(-2, 4, 13))
    )
    return model.fit(x[train], targets[train]).predict(x[test]).astype(np.float32)
