"""Task metrics, and the baselines they are compared with on the same cells and the same split.

Annotation (DESIGN.md §6): accuracy and macro-F1 on held-out cells; the baselines are logistic regressions on
log-normalised highly variable genes and on their principal components, everything fitted on the training cells only.

Integration (DESIGN.md §6): scIB metrics (the scib-metrics implementations) of a cell embedding of all cells, the
scIB convention; the baselines are the unintegrated PCA of log-normalised HVGs and Harmony on that PCA, same cells.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import anndata
import harmonypy
import numpy as np
import pandas as pd
import scanpy as sc
import scib_metrics
import scipy.sparse
from scib_metrics.nearest_neighbors import NeighborsResults
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sc_foundation.data.store import CorpusInput, CorpusStore
from sc_foundation.inference import UNKNOWN
from sc_foundation.jax_cache import use_persistent_compilation_cache

# scib-metrics compiles hundreds of small JAX kernels per process; keep them on disk (sc_foundation.jax_cache).
use_persistent_compilation_cache()


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, label_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class F1 and the confusion matrix of predicted class ids.

    Args:
        y_true: (n,) int class ids into ``label_names``.
        y_pred: (n,) int class ids, or :data:`UNKNOWN`: such a cell counts as wrong in every score.
        label_names: (C,) the class names; every class counts in the macro average, present in ``y_true`` or not.
    Returns:
        ``accuracy``, ``macro_f1``, ``per_class_f1`` (name -> F1), ``confusion_matrix`` ((C, C) nested lists, rows
        true, columns predicted, in ``labels`` order; unknown calls are left out of it), ``labels``, ``n_cells`` and
        ``unknown_rate``.
    """
    classes = np.arange(len(label_names))
    with warnings.catch_warnings():  # a class absent from both truth and predictions scores 0, which is meant
        warnings.simplefilter("ignore")
        per_class = f1_score(y_true, y_pred, labels=classes, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(per_class.mean()),
        "per_class_f1": {name: float(f) for name, f in zip(label_names, per_class, strict=True)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        "labels": list(label_names),
        "n_cells": len(y_true),
        "unknown_rate": float(np.mean(y_pred == UNKNOWN)) if len(y_pred) else 0.0,
    }


def read_counts(inputs: Iterable[str | Mapping | CorpusInput], obs_keys: Sequence[str] = ()) -> anndata.AnnData:
    """The raw counts of every cell of the inputs, in one matrix.

    Returns:
        AnnData (n_cells, n_shared_genes) of float32 counts in CSR, the inputs' cells in order; the genes are those
        all inputs share (by the names each input reads, made unique). ``obs`` holds ``source`` (the input's name),
        ``cell_id`` and the ``obs_keys`` columns; ``obs_names`` are ``source:cell_id``.
    """
    parts = []
    for spec in map(CorpusInput.coerce, inputs):
        with spec.open() as counts:
            matrix = scipy.sparse.vstack([chunk for _, chunk in counts.iter_chunks()]).tocsr().astype(np.float32)
            missing = [key for key in obs_keys if key not in counts.obs.columns]
            if missing:
                raise ValueError(f"{spec.path}: no obs columns {missing}; obs columns: {list(counts.obs.columns)}")
            obs = counts.obs[list(obs_keys)].copy()
            obs.insert(0, "cell_id", counts.obs.index.astype(str))
            obs.insert(0, "source", spec.name)
            part = anndata.AnnData(matrix, obs=obs, var={"gene": counts.gene_names})
        part.var_names = part.var["gene"].astype(str).to_numpy()
        part.var_names_make_unique()
        part.obs_names = (part.obs["source"] + ":" + part.obs["cell_id"]).to_numpy()
        parts.append(part)
    adata = parts[0] if len(parts) == 1 else anndata.concat(parts, join="inner", merge="same")
    if adata.n_vars == 0:
        raise ValueError("the inputs share no gene names: the baselines need one gene space")
    return adata


def store_counts(store: CorpusStore, inputs: Iterable[str | Mapping | CorpusInput]) -> anndata.AnnData:
    """The raw counts of every store cell, read back from the files the store was built from (:func:`read_counts`).

    Rows follow the store (row ``i`` is store cell ``i``), matched by each cell's ``source`` and ``cell_id``.
    """
    adata = read_counts(inputs)
    rows = adata.obs_names.get_indexer(store.obs["source"].astype(str) + ":" + store.obs["cell_id"].astype(str))
    if (rows < 0).any():
        raise ValueError(
            f"{int((rows < 0).sum())} store cells are not in the inputs {sorted(adata.obs['source'].unique())}"
        )
    return adata[rows].copy()


def fit_logistic_regressions(
    counts: anndata.AnnData,
    labels: np.ndarray,
    train: np.ndarray,
    *,
    n_top_genes: int = 2000,
    n_pcs: int = 50,
    seed: int = 0,
) -> tuple[dict, np.ndarray]:
    """Logistic regression on log-normalised HVGs (``hvg_logreg``) and on their PCA (``pca_logreg``), fitted on the
    ``train`` rows.

    Per-cell normalisation (total 1e4, log1p) uses no other cell; the HVG selection (scanpy, Seurat flavour), the
    scaling and the PCA are fitted on the training cells alone, so nothing is learnt from the other cells.

    Args:
        counts: (n_cells, n_genes) raw counts, rows indexed like ``labels`` (:func:`store_counts`).
        labels: (n_cells,) int class ids (only the training rows are read).
    Returns:
        name -> fitted scikit-learn pipeline, and the (n_cells, n_hvg) features they read.
    """
    adata = counts.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    hvg = sc.pp.highly_variable_genes(adata[train], n_top_genes=min(n_top_genes, adata.n_vars), inplace=False)
    x = adata.X[:, hvg["highly_variable"].to_numpy()].toarray()  # (n_cells, n_hvg)
    n_components = min(n_pcs, len(train) - 1, x.shape[1])
    models = {
        "hvg_logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)),
        "pca_logreg": make_pipeline(
            StandardScaler(),
            PCA(n_components=n_components, random_state=seed),
            LogisticRegression(max_iter=2000, random_state=seed),
        ),
    }
    return {name: model.fit(x[train], labels[train]) for name, model in models.items()}, x


def class_log_probabilities(model, x: np.ndarray, n_classes: int) -> np.ndarray:
    """(n, n_classes) log-probabilities of a fitted scikit-learn classifier; a class it never saw in training gets
    probability 0 (log -inf would break the softmax, so -1e4)."""
    log_p = np.full((len(x), n_classes), -1e4)
    log_p[:, model.classes_] = np.maximum(model.predict_log_proba(x), -1e4)
    return log_p


def logistic_regression_baselines(
    counts: anndata.AnnData,
    labels: np.ndarray,
    splits: Mapping[str, np.ndarray],
    label_names: Sequence[str],
    *,
    n_top_genes: int = 2000,
    n_pcs: int = 50,
    seed: int = 0,
) -> dict[str, dict]:
    """:func:`fit_logistic_regressions` on ``splits["train"]``, scored on ``splits["test"]``.

    Args:
        counts: (n_cells, n_genes) raw counts, rows indexed like ``labels`` and the splits (:func:`store_counts`).
        labels: (n_cells,) int class ids.
        splits: ``train`` and ``test`` row indices.
    Returns:
        ``hvg_logreg`` and ``pca_logreg`` -> :func:`classification_metrics` of the test cells.
    """
    models, x = fit_logistic_regressions(
        counts, labels, splits["train"], n_top_genes=n_top_genes, n_pcs=n_pcs, seed=seed
    )
    test = splits["test"]
    return {
        name: classification_metrics(labels[test], model.predict(x[test]), label_names)
        for name, model in models.items()
    }


def _neighbors(x: np.ndarray) -> NeighborsResults:
    """Exact neighbours (scikit-learn) for the scIB graph scores: 90, as scib-metrics' ``Benchmarker`` uses for the
    LISI scores; each cell is its own first neighbour."""
    distances, indices = NearestNeighbors(n_neighbors=min(90, len(x) - 1)).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices, distances=distances)


def bio_metrics(
    embedding: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray | None = None,
    neighbors: NeighborsResults | None = None,
) -> dict:
    """scIB bio-conservation scores of a cell embedding against cell-type labels, each in [0, 1], higher is better.

    ``nmi`` and ``ari`` of k-means clusters (k = number of labels), ``asw_label``, ``isolated_labels`` (labels in the
    fewest batches; all cells one batch when ``batches`` is None) and ``clisi``; ``bio`` is their mean and scGPT's
    ``avg_bio`` the mean of nmi, ari and asw_label.

    Args:
        embedding: (n_cells, d); labels, batches: (n_cells,).
    """
    x = np.asarray(embedding, dtype=np.float32)
    labels = np.asarray(labels)
    batches = np.zeros(len(x), dtype=np.int64) if batches is None else np.asarray(batches)
    neighbors = neighbors or _neighbors(x)
    bio = {
        **{name: float(value) for name, value in scib_metrics.nmi_ari_cluster_labels_kmeans(x, labels).items()},
        "asw_label": float(scib_metrics.silhouette_label(x, labels)),
        "isolated_labels": float(scib_metrics.isolated_labels(x, labels, batches)),
        "clisi": float(scib_metrics.clisi_knn(neighbors, labels)),
    }
    return {
        **bio,
        "bio": float(np.mean(list(bio.values()))),
        "avg_bio": float(np.mean([bio["nmi"], bio["ari"], bio["asw_label"]])),
    }


def _batch_reading_scores(
    x: np.ndarray, neighbors: NeighborsResults, batches: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """The batch scores that read the batches: ``asw_batch`` (within each label) and ``ilisi`` (on ``neighbors``).
    One place for both, so that :func:`batch_mixing_control` scores its permuted batches as the table scores the
    real ones."""
    return {
        "asw_batch": float(scib_metrics.silhouette_batch(x, labels, batches)),
        "ilisi": float(scib_metrics.ilisi_knn(neighbors, batches)),
    }


def integration_metrics(embedding: np.ndarray, batches: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """scIB bio-conservation (:func:`bio_metrics`) and batch-correction scores of a cell embedding, each in [0, 1],
    higher is better.

    The neighbourhood sizes follow scib-metrics' ``Benchmarker``: 90 neighbours for the LISI scores, the first 15 of
    them for graph connectivity. Batch: ``asw_batch`` (within each label), ``ilisi`` and ``graph_connectivity``.
    kBET and PCR are left out (diffusion maps and a regression per embedding for little extra signal on small data).

    Args:
        embedding: (n_cells, d).
        batches: (n_cells,) batch of each cell (ids or names).
        labels: (n_cells,) cell type of each cell, or None: then only ``ilisi`` can be scored (the other batch scores
            are computed within labels), and ``batch`` is that alone.
    Returns:
        The scores above, ``bio`` and ``batch`` (the means of their groups), ``total`` = 0.6·bio + 0.4·batch and
        ``avg_bio``; those needing labels only when ``labels`` is given.
    """
    x = np.asarray(embedding, dtype=np.float32)
    batches = np.asarray(batches)
    neighbors = _neighbors(x)
    if labels is None:
        ilisi = float(scib_metrics.ilisi_knn(neighbors, batches))
        return {"ilisi": ilisi, "batch": ilisi}
    labels = np.asarray(labels)
    bio = bio_metrics(x, labels, batches, neighbors)
    batch = {
        **_batch_reading_scores(x, neighbors, batches, labels),
        "graph_connectivity": float(scib_metrics.graph_connectivity(neighbors.subset_neighbors(15), labels)),
    }
    batch["batch"] = float(np.mean(list(batch.values())))
    return {**bio, **batch, "total": 0.6 * bio["bio"] + 0.4 * batch["batch"]}


def batch_mixing_control(
    embedding: np.ndarray, batches: np.ndarray, labels: np.ndarray, shuffles: int = 5, seed: int = 0
) -> dict:
    """Batch ASW and iLISI of an embedding, scored as :func:`integration_metrics` does, next to the scores the same
    embedding gets when its batches are perfectly mixed: each cell type's batch labels permuted among its own cells
    (every type keeps its batch shares), averaged over ``shuffles`` permutations.

    Why: both scores depend on the embedding's geometry as well as on its batch mixing. With many small batches the
    silhouette of a well-mixed type is negative (some other batch's cells are nearer on average than the cell's own),
    the more so the fewer the directions its cells vary in; two embeddings that hold no batch signal can then score
    far apart. The gap between a real score and its mixed control is the batch signal left; the mixed score is what
    removing all of it would reach. ``graph_connectivity`` reads no batches and has no control.

    Args:
        embedding: (n_cells, d); batches, labels: (n_cells,).
        shuffles: permutations to average over (at least 1); seed: their generator's seed.
    Returns:
        ``asw_batch`` and ``ilisi`` with the real batches, ``asw_batch_mixed`` and ``ilisi_mixed`` with the permuted
        ones (means over the permutations).
    """
    if shuffles < 1:
        raise ValueError(f"shuffles must be at least 1, got {shuffles}")
    x = np.asarray(embedding, dtype=np.float32)
    batches, labels = np.asarray(batches), np.asarray(labels)
    neighbors = _neighbors(x)  # the batches do not move the neighbours: one search serves every permutation
    rng = np.random.default_rng(seed)
    mixed = []
    for _ in range(shuffles):
        permuted = batches.copy()
        for label in np.unique(labels):
            cells = np.flatnonzero(labels == label)
            permuted[cells] = rng.permutation(batches[cells])
        mixed.append(_batch_reading_scores(x, neighbors, permuted, labels))
    real = _batch_reading_scores(x, neighbors, batches, labels)
    return {**real, **{f"{name}_mixed": float(np.mean([m[name] for m in mixed])) for name in real}}


def multimodal_pca_baselines(
    rna: anndata.AnnData, modality: np.ndarray, *, n_top_genes: int = 2000, n_pcs: int = 50, seed: int = 0
) -> dict[str, np.ndarray]:
    """Embeddings to compare a joint embedding with: the PCA of log-normalised RNA HVGs (``rna_pca``), and that PCA
    beside the second modality's own PCA, each scaled to unit total variance so that neither dominates
    (``rna_modality_pca``).

    Args:
        rna: (n_cells, n_genes) raw counts; modality: (n_cells, F) normalised second modality.
    Returns:
        name -> (n_cells, d) embeddings.
    """
    adata = rna.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(n_top_genes, adata.n_vars), subset=True)
    rna_pca = sc.pp.pca(adata.X, n_comps=min(n_pcs, adata.n_obs - 1, adata.n_vars - 1), random_state=seed)
    modality_pca = PCA(n_components=min(n_pcs, *modality.shape) - 1 or 1, random_state=seed).fit_transform(modality)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.sqrt(x.var(axis=0).sum())

    return {"rna_pca": rna_pca, "rna_modality_pca": np.hstack([unit(rna_pca), unit(modality_pca)])}


def integration_baselines(
    counts: anndata.AnnData,
    batches: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    n_top_genes: int = 2000,
    n_pcs: int = 50,
    seed: int = 0,
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """The unintegrated PCA and Harmony, scored by :func:`integration_metrics` on the same cells.

    PCA of log-normalised (total 1e4, log1p) highly variable genes (scanpy, Seurat flavour, chosen within each batch
    as scIB does), then Harmony (harmonypy) on that PCA with the batch as its covariate. Nothing is held out: like the
    model's embedding, both see every cell, and neither sees the labels.

    Args:
        counts: (n_cells, n_genes) raw counts (:func:`store_counts`).
        batches, labels: (n_cells,) as for :func:`integration_metrics`.
    Returns:
        ``{"pca", "harmony"}`` -> scores, and ``{"pca", "harmony"}`` -> (n_cells, n_components) embeddings.
    """
    adata = counts.copy()
    adata.obs["batch"] = pd.Categorical(np.asarray(batches).astype(str))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=min(n_top_genes, adata.n_vars), batch_key="batch", subset=True)
    n_components = min(n_pcs, adata.n_obs - 1, adata.n_vars - 1)
    pca = sc.pp.pca(adata.X, n_comps=n_components, random_state=seed)  # (n_cells, n_components)
    # harmonypy >= 2 returns the corrected embedding cells by components, like its input.
    harmony = harmonypy.run_harmony(pca, adata.obs, ["batch"], random_state=seed, verbose=False).Z_corr
    embeddings = {"pca": pca, "harmony": np.asarray(harmony)}
    return {name: integration_metrics(x, batches, labels) for name, x in embeddings.items()}, embeddings
