"""Representation probes: does a model's cell embedding know one cell type from another, as well as PCA does?

dinov2's lesson, applied to cells: a pretraining loss says little about the representation, so every run scores its
cell embedding on labelled probe sets, next to PCA of the same cells, and logs the scores like a loss.

A probe set is a labelled AnnData of raw counts (a registered dataset or a file, seeded subsample). For each set:

* **ours**: :func:`sc_foundation.embed` on its counts, exactly the embedding a user gets;
* **pca**: PCA-50 of log-normalised highly variable genes (scanpy: ``normalize_total`` to 1e4, ``log1p``, 2,000
  HVGs of the Seurat flavour, ``scale`` clipped at 10, ``pca``), the field's standard baseline, on the same cells;
* **scvi** (``scvi=True``, the ``baselines`` extra): scVI's latent mean, trained on the probe cells themselves (their
  batch as scVI's batch covariate when the set has one), the field's standard integration baseline; skipped with
  the reason recorded when scvi-tools is not installed.

All are scored by :func:`score_embedding`: kNN accuracy (5-fold, stratified), AvgBIO = mean(NMI, ARI, label ASW)
(scGPT's convention; scib-metrics computes them), the depth correlation (how strongly the embedding's leading
axes follow the number of detected genes: an embedding that encodes sequencing depth has learnt the protocol, not
the cell) and, on a set with a known technical batch (``batch_key``: plates, protocols, libraries), the batch
mixing: ``batch_score`` = mean(batch ASW, iLISI, graph connectivity) (scib-metrics), higher is better mixed.

:class:`ProbeCallback` runs the probes during pretraining every ``every_n_validations`` validations and logs
``probe/<set>/<metric>`` (and the ratio to PCA) to the run's loggers (CSV, wandb).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata
import numpy as np
import pytorch_lightning as pl
import scanpy as sc
import scib_metrics
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from sc_foundation.data.io import open_counts
from sc_foundation.jax_cache import use_persistent_compilation_cache
from sc_foundation.training.console import announce
from sc_foundation.training.sharding import gather_model

logger = logging.getLogger(__name__)

# scib-metrics compiles hundreds of small JAX kernels per process; keep them on disk (sc_foundation.jax_cache).
use_persistent_compilation_cache()

METRICS = ("knn_accuracy", "avg_bio", "nmi", "ari", "asw_label", "depth_correlation")
"""What :func:`score_embedding` returns; the first two decide whether an embedding beats PCA."""
BATCH_METRICS = ("batch_score", "batch_asw", "ilisi", "graph_connectivity")
"""What :func:`score_embedding` adds for a set with batches; ``batch_score`` is their mean."""
HEADLINE = ("knn_accuracy", "avg_bio", "batch_score")
"""The scores that decide whether an embedding beats a reference (``batch_score`` only where a set has batches)."""
REFERENCES = ("pca", "scvi")


@dataclass(frozen=True)
class ProbeSet:
    """A labelled set of cells to probe an embedding with.

    Attributes:
        name: short name used in metric keys (``probe/<name>/knn_accuracy``).
        dataset: a registered dataset (:mod:`sc_foundation.data.datasets`), or None to read ``path``.
        path: a raw-count file (``.h5ad``, 10x, ...), when ``dataset`` is None.
        label_key: the obs column of the cell types.
        batch_key: the obs column of the technical batch (plate, protocol, library), for the batch-mixing scores;
            None for a set without one.
        gene_key: the var column of the gene ids (default ``var_names``).
        species: ``"human"``, ``"mouse"`` or ``"auto"``.
        max_cells: a seeded random subsample of at most this many cells (probes run often: keep them cheap).
        seed: the subsample's seed.
    """

    name: str
    dataset: str | None = None
    path: str | None = None
    label_key: str = "cell_type"
    batch_key: str | None = None
    gene_key: str | None = None
    species: str = "auto"
    max_cells: int | None = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.path is None):
            raise ValueError(f"probe set {self.name!r}: give exactly one of dataset= or path=")


def load_probe_set(probe: ProbeSet) -> anndata.AnnData:
    """The probe set's cells: AnnData with float32 CSR raw counts in ``X``, gene ids as ``var_names``, the labels in
    ``obs["label"]`` and, with ``batch_key``, the batches in ``obs["batch"]``; cells without a label (or batch) are
    dropped."""
    if probe.dataset is not None:
        from sc_foundation.data.datasets import dataset_inputs

        (spec,) = dataset_inputs(probe.dataset)
        path, gene_key, species = spec["path"], spec.get("gene_key", probe.gene_key), spec.get("species", "auto")
    else:
        path, gene_key, species = probe.path, probe.gene_key, probe.species
    with open_counts(path, gene_key=gene_key) as source:
        if probe.label_key not in source.obs.columns:
            raise ValueError(
                f"probe set {probe.name!r} ({path}): no obs column {probe.label_key!r} for the labels; obs columns: "
                f"{list(source.obs.columns)}. Set label_key."
            )
        if probe.batch_key is not None and probe.batch_key not in source.obs.columns:
            raise ValueError(
                f"probe set {probe.name!r} ({path}): no obs column {probe.batch_key!r} for the batches; obs columns: "
                f"{list(source.obs.columns)}. Set batch_key, or null for a set without batches."
            )
        counts = sp.vstack([chunk for _, chunk in source.iter_chunks()]).tocsr().astype(np.float32)
        columns = list(dict.fromkeys([probe.label_key, *([probe.batch_key] if probe.batch_key else [])]))
        adata = anndata.AnnData(counts, obs=source.obs[columns].copy())
        adata.var_names = [str(g) for g in source.gene_names]
    adata.var_names_make_unique()
    known = adata.obs[columns].notna().all(axis=1).to_numpy()
    adata = adata[known].copy()
    adata.obs["label"] = adata.obs[probe.label_key].astype(str).astype("category")
    if probe.batch_key is not None:
        adata.obs["batch"] = adata.obs[probe.batch_key].astype(str).astype("category")
        if adata.obs["batch"].nunique() < 2:
            raise ValueError(f"probe set {probe.name!r}: batch_key {probe.batch_key!r} holds one batch; need two")
    if probe.max_cells is not None and adata.n_obs > probe.max_cells:
        rng = np.random.default_rng(probe.seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, probe.max_cells, replace=False))].copy()
    adata.uns["probe"] = {"name": probe.name, "path": str(path), "species": species}
    return adata


def pca_embedding(adata: anndata.AnnData, n_top_genes: int = 2000, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """(n_cells, n_comps) PCA of log-normalised, scaled HVGs of the raw counts in ``adata.X`` (scanpy defaults)."""
    x = anndata.AnnData(sp.csr_matrix(adata.X, dtype=np.float32))
    sc.pp.normalize_total(x, target_sum=1e4)
    sc.pp.log1p(x)
    with warnings.catch_warnings():
        # "n_top_genes > number of normalized dispersions": a small panel keeps every gene, which is what we ask
        warnings.filterwarnings("ignore", message=".*number of normalized dispersions", category=UserWarning)
        sc.pp.highly_variable_genes(x, n_top_genes=min(n_top_genes, x.n_vars), flavor="seurat")
    x = x[:, x.var["highly_variable"].to_numpy()].copy()
    x.X = x.X.toarray()  # scaling centres the genes, which densifies them anyway (scanpy would warn)
    sc.pp.scale(x, max_value=10)
    n_comps = min(n_comps, x.n_obs - 1, x.n_vars - 1)
    return PCA(n_components=n_comps, random_state=seed).fit_transform(np.asarray(x.X)).astype(np.float32)


def detected_genes(adata: anndata.AnnData) -> np.ndarray:
    """(n_cells,) number of genes with non-zero counts in each cell."""
    return np.diff(sp.csr_matrix(adata.X).indptr) if sp.issparse(adata.X) else (np.asarray(adata.X) > 0).sum(1)


def score_embedding(
    embedding: np.ndarray,
    labels: Sequence,
    depth: np.ndarray | None = None,
    n_folds: int = 5,
    n_neighbors: int = 15,
    seed: int = 0,
    batches: Sequence | None = None,
) -> dict[str, float]:
    """Scores of a cell embedding against labels (and batches); higher is better except ``depth_correlation``.

    Args:
        embedding: (n_cells, d).
        labels: (n_cells,) cell types.
        depth: (n_cells,) detected genes per cell, for ``depth_correlation``; None leaves it out.
        n_folds: kNN accuracy is the mean over stratified folds of a ``n_neighbors``-NN classifier (Euclidean).
        batches: (n_cells,) technical batch of each cell, for the batch-mixing scores; None leaves them out.
    Returns:
        ``knn_accuracy``; ``nmi`` and ``ari`` of k-means clusters with k = number of labels (scib-metrics);
        ``asw_label`` (scib-metrics' silhouette, rescaled to [0, 1]); ``avg_bio`` = mean(nmi, ari, asw_label);
        ``depth_correlation``: the largest |Pearson r| between log(detected genes) and each of the embedding's
        first two principal components; with ``batches``, :func:`batch_scores`.
    """
    x = np.asarray(embedding, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} embedding rows for {len(labels)} labels")
    if not np.isfinite(x).all():
        raise ValueError("the embedding has NaN or infinite rows (cells without matched genes?): drop them first")
    # A class with fewer members than folds cannot be stratified; scikit-learn would warn and score it anyway.
    folds = StratifiedKFold(
        n_splits=min(n_folds, np.unique(labels, return_counts=True)[1].max()), shuffle=True, random_state=seed
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The least populated class has only N members"
        knn = cross_val_score(KNeighborsClassifier(n_neighbors=n_neighbors), x, labels, cv=folds).mean()
    clusters = scib_metrics.nmi_ari_cluster_labels_kmeans(x, labels)
    scores = {
        "knn_accuracy": float(knn),
        "nmi": float(clusters["nmi"]),
        "ari": float(clusters["ari"]),
        "asw_label": float(scib_metrics.silhouette_label(x, labels)),
    }
    scores["avg_bio"] = float(np.mean([scores["nmi"], scores["ari"], scores["asw_label"]]))
    if depth is not None:
        components = PCA(n_components=min(2, x.shape[1]), random_state=seed).fit_transform(x)
        log_depth = np.log1p(np.asarray(depth, dtype=np.float64))
        scores["depth_correlation"] = float(
            max(abs(np.corrcoef(log_depth, components[:, i])[0, 1]) for i in range(components.shape[1]))
        )
    if batches is not None:
        scores.update(batch_scores(x, labels, batches, n_neighbors))
    return scores


def batch_scores(embedding: np.ndarray, labels: Sequence, batches: Sequence, n_neighbors: int = 15) -> dict:
    """How well the technical batches mix within cell types (scib-metrics' batch-correction scores, in [0, 1]).

    Args:
        embedding: (n_cells, d).
        labels: (n_cells,) cell types; mixing is judged within each type, so batches that differ in composition are
            not penalised for it.
        batches: (n_cells,) technical batch (plate, protocol, library).
        n_neighbors: neighbours of the exact Euclidean kNN graph (scikit-learn) that iLISI and graph connectivity
            read.
    Returns:
        ``batch_asw``: 1 - |silhouette| of the batches within each type (1: batches indistinguishable);
        ``ilisi``: the scaled inverse Simpson's index of batches among each cell's neighbours (1: as mixed as can
        be); ``graph_connectivity``: the share of each type's cells in its largest connected kNN component;
        ``batch_score``: their mean.
    """
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(embedding, dtype=np.float32)
    labels, batches = np.asarray(labels).astype(str), np.asarray(batches).astype(str)
    if len(batches) != len(x):
        raise ValueError(f"{len(x)} embedding rows for {len(batches)} batches")
    if len(np.unique(batches)) < 2:
        raise ValueError("batch mixing needs cells of two or more batches")
    k = min(n_neighbors + 1, len(x))  # the first neighbour of each cell is itself, which scib-metrics expects
    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    neighbours = NeighborsResults(indices=indices, distances=distances)
    scores = {
        "batch_asw": float(scib_metrics.silhouette_batch(x, labels, batches)),
        "ilisi": float(scib_metrics.ilisi_knn(neighbours, batches)),
        "graph_connectivity": float(scib_metrics.graph_connectivity(neighbours, labels)),
    }
    scores["batch_score"] = float(np.mean(list(scores.values())))
    return scores


class RepresentationProbe:
    """Probe sets loaded once, with their reference scores (PCA, optionally scVI) computed once per process;
    :meth:`evaluate` scores a model against them.

    Args:
        probe_sets: the sets to probe with (loaded at construction; a set that cannot be loaded is an error).
        n_neighbors, n_folds, seed: see :func:`score_embedding`.
        scvi: also score scVI's latent, trained on each set's cells (its batches as the covariate): the
            ``baselines`` extra; without scvi-tools the reference is skipped and :attr:`skipped` says why.
        cache_dir: a folder where reference embeddings are kept (``<method>-<hash of the set and seed>.npy``), so
            that scVI trains once per probe set, not once per run; None keeps them in this process only.
    """

    def __init__(
        self,
        probe_sets: Sequence[ProbeSet],
        n_neighbors: int = 15,
        n_folds: int = 5,
        seed: int = 0,
        scvi: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ):
        if not probe_sets:
            raise ValueError("no probe sets given")
        self.settings = {"n_neighbors": n_neighbors, "n_folds": n_folds, "seed": seed}
        self.sets = {probe.name: load_probe_set(probe) for probe in probe_sets}
        self.skipped: dict[str, str] = {}
        methods = ["pca"]
        if scvi:
            from sc_foundation.tasks.scvi_baselines import scvi_available

            if scvi_available():
                methods.append("scvi")
            else:
                self.skipped["scvi"] = 'scvi-tools is not installed (pip install -e ".[baselines]")'
                logger.warning("probes: scVI reference skipped: %s", self.skipped["scvi"])
        # set name -> method -> scores
        self.references = {
            probe.name: {
                method: _reference_scores(probe, self.sets[probe.name], method, self.settings, cache_dir)
                for method in methods
            }
            for probe in probe_sets
        }

    def evaluate(self, model, batch_size: int | None = None) -> dict[str, dict]:
        """Score ``model``'s :func:`~sc_foundation.embed` embedding on every probe set.

        Args:
            model: a model carrying ``gene_tokenizer`` (what :func:`~sc_foundation.load_pretrained` returns), or an
                export directory.
        Returns:
            set name -> ``{"ours": scores, "pca": scores[, "scvi": scores], "ratio": {metric: ours / pca},
            "ratio_scvi": {...}}`` for the metrics of :data:`HEADLINE` that the set has, plus ``n_cells``, the gene
            ``match_rate`` and ``skipped`` (reference -> why it is missing).
        """
        from sc_foundation.inference import embed

        results = {}
        for name, adata in self.sets.items():
            cells = adata.copy()
            embed(cells, model, species=adata.uns["probe"]["species"], batch_size=batch_size, progress=False)
            x = cells.obsm["X_sc_foundation"]
            keep = np.isfinite(x).all(axis=1)  # cells without any vocabulary gene cannot be embedded
            batches = adata.obs["batch"].to_numpy()[keep] if "batch" in adata.obs else None
            ours = score_embedding(
                x[keep],
                adata.obs["label"].to_numpy()[keep],
                detected_genes(adata)[keep],
                batches=batches,
                **self.settings,
            )
            result = {"ours": ours, **self.references[name]}
            for method in self.references[name]:
                key = "ratio" if method == "pca" else f"ratio_{method}"
                result[key] = {m: ours[m] / result[method][m] for m in HEADLINE if m in ours}
            results[name] = {
                **result,
                "n_cells": int(keep.sum()),
                "match_rate": float(cells.uns["sc_foundation"]["match_rate"]),
                "skipped": dict(self.skipped),
            }
        return results


_REFERENCE_CACHE: dict[tuple, dict[str, float]] = {}
"""(probe set, method, settings) -> scores: a reference is computed once per process, however many runs probe."""


def _reference_scores(
    probe: ProbeSet, adata: anndata.AnnData, method: str, settings: Mapping, cache_dir: str | os.PathLike | None
) -> dict[str, float]:
    """A reference embedding's scores on a probe set's cells: ``pca`` (:func:`pca_embedding`) or ``scvi``
    (:func:`sc_foundation.tasks.scvi_baselines.scvi_latent`, the set's batches as covariate)."""
    key = (probe, method, tuple(sorted(settings.items())))
    if key not in _REFERENCE_CACHE:
        batches = adata.obs["batch"].to_numpy() if "batch" in adata.obs else None
        digest = hashlib.sha256(repr((probe, adata.n_obs, adata.n_vars, settings["seed"])).encode()).hexdigest()
        path = Path(cache_dir) / f"{method}-{digest[:16]}.npy" if cache_dir is not None else None
        if path is not None and path.is_file():
            x = np.load(path)
        elif method == "pca":
            x = pca_embedding(adata, seed=settings["seed"])
        else:
            from sc_foundation.tasks.scvi_baselines import scvi_latent

            x = scvi_latent(adata, batches, seed=settings["seed"])
        if path is not None and not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.npy")
            np.save(tmp, x)
            os.replace(tmp, path)  # whole or absent, however many runs write it at once
        _REFERENCE_CACHE[key] = score_embedding(
            x, adata.obs["label"], detected_genes(adata), batches=batches, **settings
        )
    return _REFERENCE_CACHE[key]


def flatten_results(results: Mapping[str, dict]) -> dict[str, float]:
    """``probe/<set>/<metric>`` (ours), ``probe/<set>/pca_<metric>``, ``probe/<set>/scvi_<metric>`` (when scored)
    and ``probe/<set>/ratio_<metric>`` (to PCA) -> value."""
    flat = {}
    for name, result in results.items():
        for metric, value in result["ours"].items():
            flat[f"probe/{name}/{metric}"] = value
        for method in REFERENCES:
            for metric, value in result.get(method, {}).items():
                flat[f"probe/{name}/{method}_{metric}"] = value
        for metric, value in result["ratio"].items():
            flat[f"probe/{name}/ratio_{metric}"] = value
    return flat


class ProbeCallback(pl.Callback):
    """Runs :class:`RepresentationProbe` on the model being trained and logs the scores.

    Runs after every ``every_n_validations``-th validation and once more at the end of training (unless the last
    validation already probed that step). The embedding runs on global rank 0 only; under FSDP every rank first
    helps gather the full weights, from which rank 0 builds an unsharded copy to embed with. Scores go to every
    logger of the trainer at the current step, and to :attr:`history`, which the checkpoint keeps so that a resumed
    run continues its curve.

    Args:
        probe_sets: see :class:`RepresentationProbe`.
        tokenizer: the tokenizer of the training corpus, which ``embed`` tokenizes the probe cells with.
        every_n_validations: probe after every N-th validation.
    """

    def __init__(self, probe_sets: Sequence[ProbeSet], tokenizer, every_n_validations: int = 1, **settings):
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be >= 1, got {every_n_validations}")
        self.probe_sets = list(probe_sets)
        self.tokenizer = tokenizer
        self.every_n_validations = every_n_validations
        self.settings = settings
        self.history: list[dict] = []
        self._validations = 0
        self._probe: RepresentationProbe | None = None
        self._probed_step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self.run(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self._probed_step != trainer.global_step:  # the same decision on every rank (history is rank 0's)
            self.run(trainer, module)

    def run(self, trainer: pl.Trainer, module: pl.LightningModule) -> dict | None:
        """Probe now and log; returns the results on rank 0 (None elsewhere). Called on every rank: under FSDP the
        full weights are gathered first, a collective."""
        self._probed_step = trainer.global_step
        model = gather_model(trainer)  # under FSDP a collective, hence on every rank
        if not trainer.is_global_zero:
            return None
        model = model.to(module.device)
        if self._probe is None:
            self._probe = RepresentationProbe(self.probe_sets, **self.settings)
        model.gene_tokenizer = self.tokenizer
        results = self._probe.evaluate(model)
        flat = flatten_results(results)
        for each in trainer.loggers:
            each.log_metrics(flat, step=trainer.global_step)
        self.history.append({"step": trainer.global_step, "results": results})
        summary = ", ".join(
            f"{name} "
            + " ".join(
                f"{label} {r['ours'][metric]:.3f}/{r['pca'][metric]:.3f}"
                for metric, label in (("knn_accuracy", "kNN"), ("avg_bio", "AvgBIO"), ("batch_score", "batch"))
                if metric in r["ours"]
            )
            for name, r in results.items()
        )
        announce(f"probes at step {trainer.global_step} (ours/PCA): {summary}", logger)
        return results

    def state_dict(self) -> dict:
        return {"history": self.history, "validations": self._validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self._validations = state_dict["validations"]
        self._probed_step = self.history[-1]["step"] if self.history else None
