"""scVI baselines (scvi-tools), an optional extra: ``pip install -e ".[baselines]"``.

Two uses of one model, scVI (Lopez et al. 2018), a variational autoencoder with a negative-binomial likelihood on raw
counts:

- :func:`scvi_latent`: a batch-corrected cell embedding for the integration benchmark, next to the PCA and Harmony
  baselines of :func:`sc_foundation.tasks.evaluation.integration_baselines` (same highly variable genes, same cells).
- :func:`scvi_normalized_expression`: the decoded expected expression fractions of every cell, an imputation baseline
  (the caller multiplies a row by that cell's library size to predict hidden counts).

scvi-tools is imported lazily, inside the functions, so importing this module never needs it; :func:`scvi_available`
says whether it is installed. Training always runs on the CPU, seeded, without a progress bar and without writing
anything to disk (no ``lightning_logs``, no checkpoints).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
import warnings
from collections.abc import Iterator

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse

_INSTALL_HINT = (
    'scvi-tools is not installed; the scVI baselines need it: pip install -e ".[baselines]" (or pip install scvi-tools)'
)

# Loggers that report routine progress at INFO ("Seed set to 0", "GPU available: False", "`Trainer.fit` stopped",
# lightning's litlogger tip). Raised to WARNING while training, so warnings and errors still show.
_CHATTY_LOGGERS = ("scvi", "lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def scvi_available() -> bool:
    """Whether scvi-tools can be imported (checked without importing it, which takes seconds)."""
    return importlib.util.find_spec("scvi") is not None


def _import_scvi():
    """Import scvi-tools, or raise an ImportError that names the fix."""
    try:
        import scvi
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return scvi


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' own heuristic, min(round(20000 / n_cells * 400), 400), at least 1.

    Small data gets the full 400 epochs (each epoch is only a few minibatches), large data fewer (each epoch already
    makes many updates). Written out here so the default does not silently change with the scvi-tools version.
    """
    return max(1, min(round(20_000 / max(n_cells, 1) * 400), 400))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence scvi-tools' and Lightning's routine chatter for the duration; restore the logging levels after.

    Only INFO messages and known harmless warnings are hidden: Lightning's ``PossibleUserWarning`` (e.g. "the
    dataloader does not have many workers", "fewer batches than the logging interval": both expected for small data
    on a CPU) and deprecation notices from inside the libraries. Exceptions propagate unchanged.
    """
    levels = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    try:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            from lightning.fabric.utilities.warnings import PossibleUserWarning

            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _as_float_csr(x) -> scipy.sparse.csr_matrix:
    """(n_cells, n_genes) counts of any numeric dtype (the shared files store uint16) as float32 CSR."""
    if scipy.sparse.issparse(x):
        return scipy.sparse.csr_matrix(x, dtype=np.float32)
    return scipy.sparse.csr_matrix(np.asarray(x, dtype=np.float32))


def _train_scvi(adata: anndata.AnnData, batch_key: str | None, n_latent: int, max_epochs: int | None, seed: int):
    """Set up and train an SCVI model on the raw counts in ``adata.X``; returns the trained model.

    Seeds scvi-tools (which seeds Python, NumPy and torch through Lightning), then trains on the CPU with scvi's
    default architecture and train/validation split. Nothing may land in the working directory: scvi-tools 1.4.0's
    default logger creates ``./lightning_logs/version_1`` (and pickles its history there), so the logger is passed
    explicitly with its folder, and the Trainer's root, in a temporary directory removed after training. The logger
    still keeps the training history in memory (``model.history``).
    """
    scvi = _import_scvi()
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata, n_latent=n_latent)
    epochs = default_max_epochs(adata.n_obs) if max_epochs is None else max_epochs
    with tempfile.TemporaryDirectory(prefix="scvi_") as root:
        model.train(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            enable_checkpointing=False,
            default_root_dir=root,
            logger=_history_logger(root),
        )
    return model


def _history_logger(root: str):
    """scvi-tools' in-memory history logger, saving (if at all) under ``root``; None (scvi's default) if not found.

    ``SimpleLogger`` is not exported by scvi-tools, hence the private import; its ``save_dir`` argument exists in 1.4.0
    to 1.4.2 at least. Should a later version move it, the default logger is used and the test that nothing is written
    to the working directory says whether that default is still clean.
    """
    try:
        from scvi.train._logger import SimpleLogger
    except ImportError:
        return None
    return SimpleLogger(save_dir=root)


def scvi_latent(
    counts: anndata.AnnData,
    batches: np.ndarray | None,
    *,
    n_top_genes: int = 2000,
    n_latent: int = 10,
    max_epochs: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """scVI's latent mean of every cell, trained on the raw counts of highly variable genes, batch-corrected.

    The genes are chosen as in :func:`sc_foundation.tasks.evaluation.integration_baselines` (normalize_total 1e4, log1p,
    scanpy Seurat-flavour ``highly_variable_genes`` within each batch), so scVI is compared with PCA and Harmony on
    the same genes; but scVI models counts, so it is trained on the raw counts of those genes, not the log values.
    Like those baselines it sees every cell and no labels.

    Args:
        counts: (n_cells, n_genes) raw counts in ``X``, sparse or dense, any numeric dtype. Not modified.
        batches: (n_cells,) batch of each cell (any values; compared as strings), or None for no batch correction.
        n_top_genes: highly variable genes to keep (all genes if there are fewer).
        n_latent: dimension of the latent space.
        max_epochs: training epochs; None for :func:`default_max_epochs` of the number of cells.
        seed: seeds scvi-tools (and so the global Python, NumPy and torch generators).
    Returns:
        (n_cells, n_latent) float32, the mean of each cell's approximate posterior q(z | x, batch).
    Raises:
        ImportError: scvi-tools is not installed (the message says how to install it).
    """
    _import_scvi()  # fail before the preprocessing when the extra is missing
    x = _as_float_csr(counts.X)
    obs = pd.DataFrame(index=counts.obs_names.astype(str))
    batch_key = None
    if batches is not None:
        batches = np.asarray(batches)
        if batches.shape != (counts.n_obs,):
            raise ValueError(f"batches has shape {batches.shape}, expected ({counts.n_obs},)")
        batch_key = "batch"
        obs[batch_key] = pd.Categorical(batches.astype(str))
    var = pd.DataFrame(index=counts.var_names.astype(str))

    # Gene selection on log-normalised values, exactly as the PCA/Harmony baseline does it.
    lognorm = anndata.AnnData(X=x.copy(), obs=obs.copy(), var=var.copy())
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    sc.pp.highly_variable_genes(lognorm, n_top_genes=min(n_top_genes, lognorm.n_vars), batch_key=batch_key)
    keep = lognorm.var["highly_variable"].to_numpy()

    # scVI's likelihood is on counts: train on the raw counts of the chosen genes.
    adata = anndata.AnnData(X=x[:, keep], obs=obs, var=var.iloc[keep])
    with _quiet():
        model = _train_scvi(adata, batch_key, n_latent, max_epochs, seed)
        latent = model.get_latent_representation(give_mean=True)  # (n_cells, n_latent)
    return np.asarray(latent, dtype=np.float32)


def scvi_normalized_expression(
    counts,
    *,
    n_latent: int = 10,
    max_epochs: int | None = None,
    seed: int = 0,
    n_samples: int = 25,
) -> np.ndarray:
    """scVI's expected expression fraction of every gene in every cell, for imputing hidden counts.

    scVI is trained (without batch) on the raw counts of all the given genes, then decoded with
    ``get_normalized_expression(library_size=1)``: the decoder's softmax over genes, so each row sums to 1. scvi-tools
    decodes a sample of the latent z, not its mean; averaging ``n_samples`` samples estimates the posterior expected
    fractions and keeps the Monte-Carlo noise small (it is still reproducible: the samples are drawn after seeding).
    Multiply a row by a cell's library size to predict its counts.

    Args:
        counts: (n_cells, n_genes) raw counts, a scipy sparse matrix or an ndarray, any numeric dtype. Every gene is
            used: the caller has already chosen them. Not modified.
        n_latent: dimension of the latent space.
        max_epochs: training epochs; None for :func:`default_max_epochs` of the number of cells.
        seed: seeds scvi-tools (and so the global Python, NumPy and torch generators).
        n_samples: posterior samples of z averaged per cell (1 gives scvi-tools' single-sample default).
    Returns:
        (n_cells, n_genes) float32, non-negative, each row summing to 1.
    Raises:
        ImportError: scvi-tools is not installed (the message says how to install it).
    """
    _import_scvi()
    x = _as_float_csr(counts)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"counts must be a non-empty (n_cells, n_genes) matrix, got shape {x.shape}")
    # Plain string names: anndata wants string indices, and the model needs none of the caller's metadata.
    adata = anndata.AnnData(
        X=x,
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(x.shape[0])]),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(x.shape[1])]),
    )
    with _quiet():
        model = _train_scvi(adata, None, n_latent, max_epochs, seed)
        fractions = model.get_normalized_expression(
            library_size=1, n_samples=n_samples, return_mean=True, return_numpy=True
        )  # (n_cells, n_genes)
    return np.asarray(fractions, dtype=np.float32)
