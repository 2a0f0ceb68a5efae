"""Expression imputation: the scVI evaluation protocol, its metrics, and the simple baselines.

The protocol (Lopez et al. 2018, DESIGN.md §6): hide a random 10% of the non-zero entries of a count matrix (set them
to zero), train on the corrupted matrix, and score each method's prediction of the hidden entries against their
true counts: the median absolute error (L1) and the Pearson correlation. Every method predicts each cell's expected
*shares* of its panel counts; a prediction in counts is that share times the cell's corrupted panel total, the same
library size for every method, so the methods differ only in the shares.
"""

from __future__ import annotations

import anndata
import numpy as np
import scanpy as sc
import scipy.sparse as sp
from scipy.stats import pearsonr
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from sc_foundation.data.tokenization import GeneTokenizer


def hide_entries(counts: sp.spmatrix, fraction: float, seed: int) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """Zero a seeded random ``fraction`` of the non-zero entries of a count matrix.

    Args:
        counts: (n_cells, n_genes) raw counts.
    Returns:
        The corrupted (n_cells, n_genes) float32 CSR (the hidden entries removed), and the hidden entries:
        ``row``, ``col`` (k,) int64 and ``value`` (k,) float32, the true counts.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the hidden fraction must lie in (0, 1), got {fraction}")
    coo = sp.coo_matrix(counts, dtype=np.float32)
    coo.sum_duplicates()
    coo.eliminate_zeros()
    hidden = np.random.default_rng(seed).random(coo.nnz) < fraction
    kept = ~hidden
    corrupted = sp.csr_matrix((coo.data[kept], (coo.row[kept], coo.col[kept])), shape=coo.shape, dtype=np.float32)
    entries = {
        "row": coo.row[hidden].astype(np.int64),
        "col": coo.col[hidden].astype(np.int64),
        "value": coo.data[hidden],
    }
    return corrupted, entries


def vocabulary_counts(counts: anndata.AnnData, tokenizer: GeneTokenizer, species: str = "auto") -> anndata.AnnData:
    """Counts over the vocabulary genes the model knows: input genes matched to the vocabulary (duplicates summed).

    Args:
        counts: (n_cells, n_input_genes) raw counts, gene names or ids as ``var_names``.
    Returns:
        (n_cells, n_matched) float32 CSR counts, ``var_names`` the vocabulary tokens and ``var["token_id"]`` their
        ids, ``obs`` kept.
    Raises:
        GeneMatchError: too few genes match (see :meth:`GeneTokenizer.match_genes`).
    """
    x = sp.csr_matrix(counts.X, dtype=np.float32)
    detected = np.diff(x.tocsc().indptr)
    match = tokenizer.match_genes(list(counts.var_names), species=species, cells_per_gene=detected)
    adata = anndata.AnnData((x @ match.aggregate).tocsr(), obs=counts.obs.copy())
    tokens = tokenizer.vocab.tokens
    adata.var_names = [tokens[int(i)] for i in match.token_ids]
    adata.var["token_id"] = match.token_ids.astype(np.int64)
    return adata


def choose_panel(counts: anndata.AnnData, n_genes: int, batch_key: str | None = None) -> np.ndarray:
    """The decoder's gene panel: the ``n_genes`` most variable genes of log-normalised counts (scanpy, Seurat
    flavour; within each batch when ``batch_key`` names an obs column), or every gene when there are fewer.

    Returns:
        (G,) sorted column indices into ``counts``.
    """
    if counts.n_vars <= n_genes:
        return np.arange(counts.n_vars)
    adata = anndata.AnnData(counts.X.copy(), obs=counts.obs[[batch_key]] if batch_key else None)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    table = sc.pp.highly_variable_genes(adata, n_top_genes=n_genes, batch_key=batch_key, inplace=False)
    return np.flatnonzero(table["highly_variable"].to_numpy())


def panel_shares(counts: sp.spmatrix | np.ndarray) -> np.ndarray:
    """(n_cells, G) each gene's share of its cell's counts (rows of empty cells are 0)."""
    x = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64)
    return (x / np.maximum(x.sum(1, keepdims=True), 1)).astype(np.float32)


def knn_smoothing_shares(counts: sp.spmatrix, *, n_neighbors: int = 15, n_pcs: int = 50, seed: int = 0) -> np.ndarray:
    """kNN smoothing (Wagner et al. 2017, in one step): each cell's shares averaged over its nearest cells, itself
    included, in the PCA of log-normalised counts.

    Args:
        counts: (n_cells, G) corrupted panel counts.
    Returns:
        (n_cells, G) float32 shares, rows summing to 1 (0 for cells without neighbours' counts).
    """
    adata = anndata.AnnData(sp.csr_matrix(counts, dtype=np.float32))
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_components = min(n_pcs, adata.n_obs - 1, adata.n_vars - 1)
    x = PCA(n_components=n_components, random_state=seed).fit_transform(adata.X.toarray())  # (n_cells, n_pcs)
    _, neighbours = NearestNeighbors(n_neighbors=min(n_neighbors, len(x))).fit(x).kneighbors(x)  # self first
    return panel_shares(counts)[neighbours].mean(axis=1)


def gene_mean_shares(counts: sp.spmatrix) -> np.ndarray:
    """(n_cells, G) the same shares for every cell: each gene's share of all counts (the floor any method beats)."""
    totals = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
    shares = (totals / max(totals.sum(), 1)).astype(np.float32)
    return np.broadcast_to(shares, counts.shape).copy()


def imputation_metrics(true: np.ndarray, predicted: np.ndarray) -> dict:
    """Scores of predicted hidden entries against their true counts (the scVI protocol).

    Args:
        true, predicted: (k,) counts of the hidden entries.
    Returns:
        ``median_l1`` (lower is better), ``pearson`` of the counts and ``pearson_log1p`` of log1p counts (higher is
        better), ``mean_l1`` and ``n_entries``.
    """
    true, predicted = np.asarray(true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    if len(true) < 2 or not np.isfinite(predicted).all():
        finite = int(np.isfinite(predicted).sum())
        raise ValueError(f"need two or more finite predictions, got {len(true)} ({finite} finite)")
    error = np.abs(predicted - true)
    return {
        "median_l1": float(np.median(error)),
        "mean_l1": float(error.mean()),
        "pearson": float(pearsonr(true, predicted).statistic),
        "pearson_log1p": float(pearsonr(np.log1p(true), np.log1p(predicted)).statistic),
        "n_entries": len(true),
    }


def expression_targets(
    counts: anndata.AnnData,
    tokenizer: GeneTokenizer,
    n_genes: int,
    species: str = "auto",
    batch_key: str | None = None,
) -> tuple[np.ndarray, list[int]]:
    """An expression decoder's panel and targets: the counts of the most variable vocabulary genes.

    Args:
        counts: (n_cells, n_input_genes) raw counts, rows in the order the targets are wanted (the store's).
        n_genes: panel size G (fewer when fewer genes match); see :func:`choose_panel`.
        batch_key: obs column of batches, to choose the variable genes within each batch.
    Returns:
        (n_cells, G) float32 counts, and the G vocabulary ids (``config.decoder_gene_ids``).
    """
    vocab = vocabulary_counts(counts, tokenizer, species)
    if batch_key is not None:
        vocab.obs[batch_key] = counts.obs[batch_key].to_numpy()
    panel = choose_panel(vocab, n_genes, batch_key)
    return vocab.X[:, panel].toarray().astype(np.float32), vocab.var["token_id"].iloc[panel].tolist()
