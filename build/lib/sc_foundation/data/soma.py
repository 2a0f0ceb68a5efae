"""TileDB-SOMA experiments (and the CELLxGENE Census) as count sources, read in bounded-memory row chunks.

A SOMA experiment is what atlases ship: ``obs`` (cells), one measurement (``RNA``) with ``var`` (genes) and sparse
``X`` layers (``raw`` counts). :class:`SomaCountSource` selects cells by an ``obs`` value filter and offers them the
way :class:`sc_foundation.data.io.CountSource` offers a file: ``gene_names``, ``obs`` and ``iter_chunks``, so the store
and the tokenizer treat both alike. Reading goes through ``tiledbsoma`` (the ``soma`` extra); the Census shortcut
opens a published Census release through ``cellxgene-census``.

Only ``obs`` of the selected cells (the columns asked for) is held in memory; ``X`` is read ``chunk_size`` cells at a
time by their ``soma_joinid``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse

from sc_foundation.data.io import InvalidInputError, validate_counts

SOMA_EXTRA = 'pip install "sc_foundation[soma]"'
CENSUS_ORGANISMS = ("homo_sapiens", "mus_musculus")
OBS_ID_COLUMN = "obs_id"
"""The obs column holding cell ids (``tiledbsoma.io.from_h5ad`` writes AnnData's obs names there); experiments
without it (the Census) use the ``soma_joinid`` as the cell id."""


def _tiledbsoma():
    try:
        import tiledbsoma
    except ImportError as error:
        raise ImportError(f"Reading a TileDB-SOMA experiment needs tiledbsoma: {SOMA_EXTRA}") from error
    return tiledbsoma


def is_soma_uri(path: str) -> bool:
    """Whether ``path`` names a SOMA experiment: a remote URI, or a local TileDB group folder."""
    if "://" in path:
        return True
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "__tiledb_group.tdb"))


def open_census(version: str, organism: str):
    """The SOMA experiment of one organism in a pinned Census release (needs the network and ``cellxgene-census``).

    Returns:
        ``(experiment, census)``; close ``census`` when done.
    """
    if organism not in CENSUS_ORGANISMS:
        raise InvalidInputError(f"census organism {organism!r} is not one of {CENSUS_ORGANISMS}.")
    if not version or version in ("stable", "latest"):
        raise InvalidInputError(
            f"census version {version!r}: pin a release date (e.g. '2025-01-30') so that the store's plan names "
            "exactly the cells it holds."
        )
    try:
        import cellxgene_census
    except ImportError as error:
        raise ImportError(f"The Census shortcut needs cellxgene-census: {SOMA_EXTRA}") from error
    census = cellxgene_census.open_soma(census_version=version)
    return census["census_data"][organism], census


class SomaCountSource:
    """The raw counts of the cells of a SOMA experiment that pass an ``obs`` filter, in ``soma_joinid`` order.

    Attributes:
        path: the experiment's URI (or ``census:<version>/<organism>``); every error message starts with it.
        gene_names: ``(n_genes,)`` str, the ``var`` column ``gene_key`` (Ensembl ``feature_id`` by default).
        obs: ``(n_cells, k)`` DataFrame of the selected cells, indexed by cell id, holding the ``obs_columns`` that
            exist (the others are reported missing by the store).
        joinids: ``(n_cells,)`` int64 ``soma_joinid`` of each selected cell, increasing.
    """

    def __init__(
        self,
        experiment,
        *,
        path: str,
        measurement: str = "RNA",
        layer: str = "raw",
        value_filter: str | None = None,
        gene_key: str = "feature_id",
        obs_columns: Sequence[str] = (),
        owner=None,
    ):
        self.path = path
        self._experiment = experiment
        self._owner = owner  # what to close with this source (the experiment, or the Census collection)
        if measurement not in experiment.ms:
            raise InvalidInputError(
                f"{path}: no measurement {measurement!r}; measurements here: {sorted(experiment.ms.keys())}. "
                "Pass one as measurement=."
            )
        ms = experiment.ms[measurement]
        if "X" not in ms or layer not in ms.X:
            layers = sorted(ms.X.keys()) if "X" in ms else []
            raise InvalidInputError(
                f"{path}: no X layer {layer!r} in {measurement}; layers here: {layers}. Pass layer=."
            )
        self._X = ms.X[layer]
        var_columns = list(ms.var.keys())
        if gene_key not in var_columns:
            raise InvalidInputError(
                f"{path}: no var column {gene_key!r} in {measurement}; var columns: {var_columns}. Pass the column "
                "with Ensembl ids or gene symbols as gene_key=."
            )
        var = ms.var.read(column_names=["soma_joinid", gene_key]).concat().to_pandas().sort_values("soma_joinid")
        self._var_joinids = var["soma_joinid"].to_numpy(np.int64)
        self.gene_names = var[gene_key].astype(str).to_numpy(dtype=str)
        obs_schema = experiment.obs.keys()
        id_column = OBS_ID_COLUMN if OBS_ID_COLUMN in obs_schema else "soma_joinid"
        present = [c for c in dict.fromkeys(obs_columns) if c in obs_schema and c not in (id_column, "soma_joinid")]
        try:
            table = experiment.obs.read(
                column_names=list(dict.fromkeys(["soma_joinid", id_column, *present])), value_filter=value_filter
            ).concat()
        except Exception as error:  # tiledbsoma raises several types for a bad filter; all mean the same here
            if value_filter is None:
                raise
            raise InvalidInputError(
                f"{path}: obs value_filter {value_filter!r} failed ({str(error).splitlines()[0]}). Fix the filter; obs "
                f"columns: {list(obs_schema)}."
            ) from error
        obs = table.to_pandas().sort_values("soma_joinid", kind="stable")
        self.joinids = obs["soma_joinid"].to_numpy(np.int64)
        obs.index = pd.Index(obs[id_column].astype(str).to_numpy(), name=None)
        self.obs = obs[present]

    @property
    def n_cells(self) -> int:
        return len(self.joinids)

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    def iter_chunks(
        self, chunk_size: int = 8192, require_integer: bool = True, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, scipy.sparse.csr_matrix]]:
        """Yield ``(start_row, counts)`` for the selected cells ``start .. stop - 1``, ``chunk_size`` at a time.

        ``counts`` is a ``(k, n_genes)`` float32 CSR matrix in ``var`` order, checked by
        :func:`sc_foundation.data.io.validate_counts`, explicit zeros removed; only that chunk is read.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        stop = self.n_cells if stop is None else min(stop, self.n_cells)
        for lo in range(start, stop, chunk_size):
            hi = min(lo + chunk_size, stop)
            rows = self.joinids[lo:hi]
            coo = self._X.read(coords=(rows,)).tables().concat()
            # Joinids are sorted, so positions follow by binary search (no dictionary over millions of cells).
            row = np.searchsorted(rows, coo["soma_dim_0"].to_numpy())
            column = np.searchsorted(self._var_joinids, coo["soma_dim_1"].to_numpy())
            data = coo["soma_data"].to_numpy()
            block = scipy.sparse.csr_matrix((data, (row, column)), shape=(hi - lo, self.n_genes))
            validate_counts(
                block,
                source=self.path,
                matrix_desc=f"X (cells {lo}-{hi - 1} of the selection)",
                require_integer=require_integer,
                hint="Fix: pass the layer holding raw counts as layer= (the Census's is 'raw').",
            )
            counts = block.astype(np.float32)
            counts.eliminate_zeros()
            yield lo, counts

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()

    def __enter__(self) -> SomaCountSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_soma(
    uri: str,
    *,
    measurement: str = "RNA",
    layer: str = "raw",
    value_filter: str | None = None,
    gene_key: str = "feature_id",
    obs_columns: Sequence[str] = (),
) -> SomaCountSource:
    """Open the SOMA experiment at ``uri`` (a local folder or a URI tiledbsoma reads) as a count source."""
    soma = _tiledbsoma()
    if "://" not in uri and not os.path.exists(uri):
        raise InvalidInputError(f"{uri}: no such SOMA experiment. Check the path or URI.")
    try:
        experiment = soma.Experiment.open(uri)
    except soma.DoesNotExistError as error:
        raise InvalidInputError(f"{uri}: not a SOMA experiment ({error}).") from error
    try:
        return SomaCountSource(
            experiment,
            path=uri,
            measurement=measurement,
            layer=layer,
            value_filter=value_filter,
            gene_key=gene_key,
            obs_columns=obs_columns,
            owner=experiment,
        )
    except BaseException:
        experiment.close()
        raise


def census_source(
    version: str, organism: str, *, value_filter: str | None = None, obs_columns: Sequence[str] = ()
) -> SomaCountSource:
    """The Census shortcut: raw counts of ``organism`` in Census ``version`` passing ``value_filter``."""
    experiment, census = open_census(version, organism)
    try:
        return SomaCountSource(
            experiment,
            path=f"census:{version}/{organism}",
            value_filter=value_filter,
            obs_columns=obs_columns,
            owner=census,
        )
    except BaseException:
        census.close()
        raise
