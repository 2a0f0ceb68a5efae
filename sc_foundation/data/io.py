"""Readers for raw-count matrices, and the check that a matrix really holds raw counts.

Every supported input becomes a :class:`CountSource`: a cells x genes matrix plus its cell metadata and gene
identifiers, read in row chunks so that a corpus never has to fit in memory at once.

Supported inputs (``open_counts`` picks the reader from the path):

* ``.h5ad`` -- AnnData; opened backed (on disk) by default, counts from ``X``, ``layers[layer]`` or ``.raw``;
* ``.h5`` -- 10x Cell Ranger feature-barcode matrix, v2 (one group per genome) or v3 (``/matrix``);
* a folder holding ``matrix.mtx`` + ``genes.tsv`` + ``barcodes.tsv`` (Cell Ranger v2) or their gzipped v3
  counterparts ``matrix.mtx.gz`` + ``features.tsv.gz`` + ``barcodes.tsv.gz``;
* ``.h5mu`` -- MuData; one modality (``modality="rna"``) is read.

The readers are anndata's and scanpy's; this module only picks the matrix, keeps it on disk where it can, and
turns every bad input into an :class:`InvalidInputError` that names the file and says how to fix it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse

from sc_foundation.data.genes import current_umask

__all__ = [
    "CountSource",
    "InvalidInputError",
    "RoundedLogWarning",
    "counts_from_anndata",
    "open_counts",
    "validate_counts",
    "write_h5ad_atomic",
]

SUPPORTED_FORMATS = (
    ".h5ad (AnnData), .h5 (10x Cell Ranger v2/v3), .h5mu (MuData, with modality=...), or a 10x folder holding "
    "matrix.mtx + genes.tsv + barcodes.tsv (v2) or matrix.mtx.gz + features.tsv.gz + barcodes.tsv.gz (v3)"
)
# The two 10x matrix-market layouts scanpy.read_10x_mtx reads: it decides between them on genes.tsv alone and
# expects every file of the v3 layout gzipped, so a folder is checked against both before it is handed over.
_MTX_V2_FILES = ("matrix.mtx", "genes.tsv", "barcodes.tsv")
_MTX_V3_FILES = ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz")
_EXAMPLES = 3  # offending values quoted in an error message
# Rounded log1p values stay small: log1p(1e4) = 9.2 (counts per 10k), log1p(1e6) = 13.8 (per million). Real cells'
# raw counts exceed this on their top genes (mitochondrial, ribosomal, MALAT1) once a chunk holds a few cells.
_ROUNDED_LOG_MAX = 15
_ROUNDED_LOG_MIN_ENTRIES = 1000  # fewer stored values say too little to warn


class InvalidInputError(ValueError):
    """Bad user input. The message names the file (and column/layer/genes) and says how to fix it."""


class RoundedLogWarning(UserWarning):
    """Integer values that look like rounded log-normalised data rather than raw counts (see :func:`iter_chunks`).

    Silence it where the counts are right: ``warnings.filterwarnings("ignore", category=RoundedLogWarning)``.
    """


@dataclass(eq=False)
class CountSource:
    """A cells x genes raw-count matrix from one file (or an in-memory AnnData), read in row chunks in bounded memory.

    Build one with :func:`open_counts` or :func:`counts_from_anndata`, which check ``layer``, ``use_raw`` and the
    gene identifiers before returning it.

    Attributes:
        path: the file path, or ``"<AnnData>"`` (or the caller's name) for in-memory input; every error message
            starts with it.
        adata: the AnnData the counts come from. For an ``.h5ad`` opened backed by :func:`open_counts` it is
            read-only on disk and holds only ``obs``, ``var`` and ``raw.var`` in memory: the matrices stay on disk
            and ``layers``, ``obsm``, ``obsp``, ``varm``, ``varp`` and ``uns`` are not loaded (read those with
            ``anndata.read_h5ad``).
        layer: the layer the counts come from, or ``None`` for ``X`` / ``raw.X``.
        use_raw: whether the counts come from ``raw.X`` (genes are then ``raw.var``).
        gene_names: ``(n_genes,)`` array of ``str``: ``var_names`` or ``var[gene_key]`` (``raw.var`` when
            ``use_raw``), exactly as stored -- prefixes, versions and duplicates are left to the gene resolver.
    """

    path: str
    adata: anndata.AnnData
    layer: str | None
    use_raw: bool
    gene_names: np.ndarray = field(repr=False)
    # Only a file this module opened is closed by close(): an AnnData handed in by the caller stays theirs.
    _owns_file: bool = field(default=False, init=False, repr=False)

    @property
    def n_cells(self) -> int:
        """Number of cells (rows)."""
        return self.adata.n_obs

    @property
    def n_genes(self) -> int:
        """Number of genes (columns) of the chosen matrix."""
        return len(self.gene_names)

    @property
    def obs(self) -> pd.DataFrame:
        """Cell metadata, ``(n_cells, n_columns)``; the index holds the cell ids."""
        return self.adata.obs

    def iter_chunks(
        self, chunk_size: int = 8192, require_integer: bool = True, start: int = 0, stop: int | None = None
    ) -> Iterator[tuple[int, scipy.sparse.csr_matrix]]:
        """Yield the counts of rows ``start .. stop - 1`` (default: all) in consecutive row chunks.

        Args:
            chunk_size: rows per chunk (the last chunk may be shorter). A densely stored matrix holds
                ``chunk_size x n_genes`` values in memory at a time, so lower it for dense files with many genes.
            require_integer: refuse non-integer values (see :func:`validate_counts`).
            start, stop: the row range to read (a part of a file that several processes share out).

        Yields:
            ``(start_row, counts)``: ``counts`` is a ``(k, n_genes)`` float32 ``scipy.sparse.csr_matrix`` holding
            rows ``start_row .. start_row + k - 1`` of the chosen matrix (``X``, ``layers[layer]`` or ``raw.X``),
            validated by :func:`validate_counts`, with explicitly stored zeros removed so that the stored
            entries are exactly the expressed genes. Empty cells are kept. Only that slice is in memory.

        Raises:
            InvalidInputError: a chunk holds negative, NaN/inf or (with ``require_integer``) non-integer values.

        Warns:
            RoundedLogWarning: the first chunk holds integers that look like rounded log values (at least 1000
                stored values, none above 15), which the integer check cannot catch.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size}.")
        matrix = self._row_sliceable()
        desc = _matrix_desc(self.layer, self.use_raw)
        hint = self._fix_hint()
        end = self.n_cells if stop is None else min(stop, self.n_cells)
        for lo in range(start, end, chunk_size):
            hi = min(lo + chunk_size, end)
            block = scipy.sparse.csr_matrix(matrix[lo:hi])
            validate_counts(
                block,
                source=self.path,
                matrix_desc=f"{desc} (rows {lo}-{hi - 1})",
                require_integer=require_integer,
                hint=hint,
            )
            # astype copies, so dropping zeros below never touches the caller's in-memory matrix.
            counts = block.astype(np.float32)
            counts.eliminate_zeros()
            if lo == 0 and require_integer:
                _warn_if_rounded_log(counts, f"{self.path}: {desc}", hint)
            yield lo, counts

    def close(self) -> None:
        """Close the backing file if :func:`open_counts` opened one; in-memory data needs no closing."""
        if self._owns_file and self.adata.isbacked:
            self.adata.file.close()

    def __enter__(self) -> CountSource:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _row_sliceable(self):
        """The chosen matrix as an object whose ``[start:stop]`` reads only those rows.

        Backed: an anndata CSR dataset or an h5py dense dataset (on disk). In memory: a CSR matrix or an ndarray.
        """
        if self.adata.isbacked:
            # anndata reopens a closed backing file on X access; do the same for layers and raw.
            if not self.adata.file.is_open:
                self.adata.file.open()
            return _backed_matrix(self.path, self.adata, self.layer, self.use_raw)
        matrix = _in_memory_matrix(self.adata, self.layer, self.use_raw)
        if scipy.sparse.issparse(matrix) and matrix.format != "csr":
            # Row slices of CSC/COO cost a pass over the whole matrix each; convert once per pass instead.
            matrix = scipy.sparse.csr_matrix(matrix)
        return matrix

    def _fix_hint(self) -> str:
        """How to point the reader at raw counts instead, listing what this input offers."""
        options = []
        layers = _layer_names(self.adata)
        other_layers = [name for name in layers if name != self.layer]
        if other_layers:
            suggestion = next((name for name in other_layers if "count" in name.lower()), other_layers[0])
            options.append(f"pass layer={suggestion!r} (layers here: {layers})")
        if self.adata.raw is not None and not self.use_raw:
            options.append("use_raw=True (this input has .raw)")
        options.append("point to the raw-count file")
        return "Fix: " + ", or ".join(options) + "."


def open_counts(
    path: str | os.PathLike[str],
    *,
    layer: str | None = None,
    use_raw: bool = False,
    modality: str | None = None,
    gene_key: str | None = None,
    backed: bool = True,
    genome: str | None = None,
) -> CountSource:
    """Open a raw-count file; the reader is chosen from the path.

    Args:
        path: an ``.h5ad``, 10x ``.h5`` or ``.h5mu`` file, or a 10x matrix-market folder (see module docstring).
        layer: take counts from ``layers[layer]`` instead of ``X``.
        use_raw: take counts (and genes) from ``.raw``.
        modality: the MuData modality to read (``.h5mu`` only, required there), e.g. ``"rna"``.
        gene_key: ``var`` column holding the gene identifiers; default ``var_names``. For every 10x input
            ``var_names`` are gene symbols as written by Cell Ranger (duplicates kept, not suffixed) and
            ``gene_key="gene_ids"`` gives the Ensembl ids.
        backed: keep an ``.h5ad`` on disk and read row slices only (other formats are always read into memory).
        genome: the genome to read from a 10x ``.h5`` holding several (required for multi-genome v2 files).

    Returns:
        A :class:`CountSource`; close it (or use it as a context manager) to release a backed file.

    Raises:
        InvalidInputError: missing or unsupported path, unknown layer/modality/genome/gene_key, no ``.raw``,
            or a CSC matrix in backed mode.
    """
    name = os.fspath(path)
    p = Path(name)
    if not p.exists():
        raise InvalidInputError(
            f"{name}: no such file or directory. Check the path (a relative path is resolved from {os.getcwd()})."
        )
    suffix = p.suffix.lower() if p.is_file() else ""
    if modality is not None and suffix != ".h5mu":
        raise InvalidInputError(f"{name}: modality={modality!r} only applies to .h5mu (MuData) files. Drop modality=.")
    if genome is not None and suffix != ".h5":
        raise InvalidInputError(f"{name}: genome={genome!r} only applies to 10x .h5 files. Drop genome=.")
    if suffix in (".h5ad", ".h5", ".h5mu") and not h5py.is_hdf5(p):
        raise InvalidInputError(
            f"{name}: not an HDF5 file, although {suffix} files are. It may be truncated or corrupt: "
            "download or write it again."
        )

    if suffix == ".h5ad":
        if not backed:
            return _make_source(name, anndata.read_h5ad(p), layer=layer, use_raw=use_raw, gene_key=gene_key)
        adata = _open_h5ad_backed(p)
        try:
            source = _make_source(name, adata, layer=layer, use_raw=use_raw, gene_key=gene_key)
        except InvalidInputError:
            # No CountSource will own the file, so nobody else could close it.
            adata.file.close()
            raise
        source._owns_file = True
        return source
    if suffix == ".h5":
        adata = _read_10x_h5(p, genome)
    elif suffix == ".h5mu":
        adata = _read_h5mu_modality(p, modality)
    elif p.is_dir():
        adata = _read_10x_mtx(p)
    else:
        raise InvalidInputError(f"{name}: unsupported input. Supported: {SUPPORTED_FORMATS}.")
    return _make_source(name, adata, layer=layer, use_raw=use_raw, gene_key=gene_key)


def counts_from_anndata(
    adata: anndata.AnnData,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_key: str | None = None,
    name: str = "<AnnData>",
) -> CountSource:
    """Wrap an AnnData already in memory (or backed) as a :class:`CountSource`; nothing is copied.

    Args:
        adata: ``n_cells x n_genes``; it is not modified, and a backed one is left open by ``close()``.
        layer, use_raw, gene_key: as in :func:`open_counts`.
        name: what error messages call this input (e.g. the file it came from).

    Raises:
        InvalidInputError: unknown layer/gene_key, no ``.raw``, or a CSC matrix in a backed AnnData.
    """
    return _make_source(name, adata, layer=layer, use_raw=use_raw, gene_key=gene_key)


def validate_counts(
    X: np.ndarray | scipy.sparse.spmatrix | scipy.sparse.sparray,
    *,
    source: str,
    matrix_desc: str,
    require_integer: bool = True,
    hint: str = "",
) -> None:
    """Refuse a matrix that cannot hold raw counts.

    Only stored entries of a sparse matrix (CSR, CSC or COO) are checked: the implicit zeros are valid counts.
    Any integer or floating dtype is accepted.

    Args:
        X: ``(n_cells, n_genes)`` dense ndarray or scipy sparse matrix/array.
        source: the file (or ``"<AnnData>"``) the matrix comes from; starts every message.
        matrix_desc: which matrix this is, e.g. ``"X"`` or ``"layers['counts'] (rows 0-8191)"``.
        require_integer: also refuse non-integer values (normalised or log-transformed data).
        hint: how to fix it for this input (e.g. the layers it offers); a generic fix is used when empty.

    Raises:
        InvalidInputError: non-numeric dtype, NaN or infinite values, negative values, or (with
            ``require_integer``) non-integer values; the message gives how many and example values.
    """
    values = np.asarray(X.data if scipy.sparse.issparse(X) else X).ravel()
    fix = hint or "Fix: point to the raw-count matrix (unnormalised integer UMI or read counts)."
    where = f"{source}: {matrix_desc}"
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise InvalidInputError(f"{where} has dtype {values.dtype}, but raw counts must be numeric. {fix}")
    # Integer dtypes cannot hold NaN or fractions, so only the sign check applies to them.
    is_float = np.issubdtype(values.dtype, np.floating)
    if is_float and not np.isfinite(values).all():
        n_nan = int(np.isnan(values).sum())
        n_inf = int(np.isinf(values).sum())
        raise InvalidInputError(
            f"{where} holds {n_nan:,} NaN and {n_inf:,} infinite values, but raw counts are finite. {fix}"
        )
    if np.issubdtype(values.dtype, np.signedinteger) or is_float:
        negative = values < 0
        if negative.any():
            raise InvalidInputError(
                f"{where} holds {int(negative.sum()):,} negative values (e.g. {_examples(values[negative])}): "
                f"it looks scaled or centred, but raw counts are required. {fix}"
            )
    if require_integer and is_float:
        fractional = values != np.rint(values)
        if fractional.any():
            raise InvalidInputError(
                f"{where} holds {int(fractional.sum()):,} non-integer values (e.g. "
                f"{_examples(values[fractional])}): it looks log-normalised, but raw counts are required. {fix}"
            )


@contextlib.contextmanager
def _written_beside(adata: anndata.AnnData, path: Path) -> Iterator[Path]:
    """``adata`` written to a uniquely named temporary file beside ``path`` (removed on exit unless renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        adata.write_h5ad(tmp)
        tmp.chmod(0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other readers
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def write_h5ad_atomic(adata: anndata.AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` to ``path`` through a temporary file and a rename: a crash leaves the old file or none, never
    half of one. The temporary name is unique, so processes writing the same file at once each rename a whole file
    of their own into place."""
    path = Path(path)
    with _written_beside(adata, path) as tmp:
        os.replace(tmp, path)
    return path


def write_h5ad_once(adata: anndata.AnnData, path: str | os.PathLike) -> Path:
    """Write ``adata`` to ``path`` unless ``path`` already holds the same matrix and cells, which it then leaves
    untouched (its modification time too: a corpus store built from the file is keyed on it).

    For files that several processes derive alike at once, such as DDP ranks of one fine-tuning task: the first
    complete file is linked into place atomically, the others find it and keep it. The comparison is by a digest of
    ``X`` (CSR) and ``obs_names``, kept in the file's ``uns["digest"]``; a file of other cells is replaced.
    """
    path = Path(path)
    x = scipy.sparse.csr_matrix(adata.X)
    digest = hashlib.sha256()
    for part in (x.data, x.indices, x.indptr, np.asarray(adata.obs_names, dtype=str)):
        digest.update(np.ascontiguousarray(part).tobytes())
    adata.uns["digest"] = digest.hexdigest()
    if _stored_digest(path) == adata.uns["digest"]:
        return path
    with _written_beside(adata, path) as tmp:
        try:
            os.link(tmp, path)  # creates path only where it does not exist yet
        except FileExistsError:
            if _stored_digest(path) != adata.uns["digest"]:
                os.replace(tmp, path)
    return path


def _stored_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    with h5py.File(path, "r") as handle:
        stored = handle["uns"].get("digest") if "uns" in handle else None
        return None if stored is None else stored.asstr()[()]


def _warn_if_rounded_log(counts: scipy.sparse.csr_matrix, where: str, hint: str) -> None:
    """Warn when a chunk's integers look like rounded log1p values: many stored values, a small maximum, few
    distinct values."""
    values = counts.data
    if len(values) < _ROUNDED_LOG_MIN_ENTRIES or values.max() > _ROUNDED_LOG_MAX:
        return
    warnings.warn(
        f"{where}: its {len(values):,} non-zero values are integers from {values.min():.0f} to {values.max():.0f} "
        f"({len(np.unique(values))} distinct values): this looks like rounded log-normalised data, not raw counts, "
        f"whose top genes reach far higher. {hint} If these are raw counts, silence this warning with "
        "warnings.filterwarnings('ignore', category=sc_foundation.data.io.RoundedLogWarning).",
        RoundedLogWarning,
        stacklevel=4,
    )


def _examples(values: np.ndarray) -> str:
    """The first few distinct offending values, in storage order."""
    distinct = list(dict.fromkeys(values[: 100 * _EXAMPLES].tolist()))[:_EXAMPLES]
    return ", ".join(f"{v:.4g}" for v in distinct)


def _make_source(
    name: str,
    adata: anndata.AnnData,
    *,
    layer: str | None,
    use_raw: bool,
    gene_key: str | None,
) -> CountSource:
    """Check the choice of matrix and gene identifiers against ``adata`` and build the source."""
    if layer is not None and use_raw:
        raise InvalidInputError(
            f"{name}: layer={layer!r} and use_raw=True both name the count matrix. Pass only one of them."
        )
    if layer is not None and layer not in _layer_names(adata):
        raise InvalidInputError(
            f"{name}: no layer {layer!r}; layers here: {_layer_names(adata)}. Pass one of them as layer=, "
            "or layer=None to read X."
        )
    if use_raw and adata.raw is None:
        raise InvalidInputError(
            f"{name}: use_raw=True, but this input has no .raw. Drop use_raw=True (to read X) or pass "
            f"layer= (layers here: {_layer_names(adata)})."
        )
    if adata.isbacked:
        _backed_matrix(name, adata, layer, use_raw)
    elif _in_memory_matrix(adata, layer, use_raw) is None:
        raise InvalidInputError(f"{name}: X is empty (None). Pass layer= (layers here: {_layer_names(adata)}).")

    var = adata.raw.var if use_raw else adata.var
    var_desc = "raw.var" if use_raw else "var"
    if gene_key is None:
        genes = var.index
    elif gene_key in var.columns:
        genes = var[gene_key]
    else:
        raise InvalidInputError(
            f"{name}: no column {gene_key!r} in {var_desc}; {var_desc} columns: {list(var.columns)}. "
            f"Pass one of them as gene_key=, or gene_key=None to use {var_desc}_names."
        )
    return CountSource(
        path=name, adata=adata, layer=layer, use_raw=use_raw, gene_names=np.asarray(genes.astype(str), dtype=str)
    )


def _layer_names(adata: anndata.AnnData) -> list[str]:
    # A backed AnnData from _open_h5ad_backed holds no layers in memory; the file lists them.
    if adata.isbacked:
        return list(adata.file["layers"].keys()) if "layers" in adata.file else []
    return list(adata.layers.keys())


def _in_memory_matrix(adata: anndata.AnnData, layer: str | None, use_raw: bool):
    if use_raw:
        return adata.raw.X
    return adata.X if layer is None else adata.layers[layer]


def _matrix_desc(layer: str | None, use_raw: bool) -> str:
    """The chosen matrix as messages name it: ``X``, ``layers['counts']`` or ``raw.X``."""
    if use_raw:
        return "raw.X"
    return "X" if layer is None else f"layers[{layer!r}]"


def _backed_matrix(source: str, adata: anndata.AnnData, layer: str | None, use_raw: bool):
    """The chosen matrix of a backed AnnData as an on-disk object supporting ``[start:stop]`` row reads.

    Returns an anndata CSR dataset or an ``h5py.Dataset`` (dense); nothing is read yet.
    """
    key = "raw/X" if use_raw else ("X" if layer is None else f"layers/{layer}")
    desc = _matrix_desc(layer, use_raw)
    if key not in adata.file:
        raise InvalidInputError(
            f"{source}: the file stores no {desc}. Pass layer= (layers here: {_layer_names(adata)})."
        )
    element = adata.file[key]
    if isinstance(element, h5py.Dataset):
        return element
    matrix = anndata.io.sparse_dataset(element)
    if matrix.format != "csr":
        if use_raw:
            convert = "r = a.raw.to_adata(); r.X = r.X.tocsr(); a.raw = r"
        else:
            attr = "X" if layer is None else f"layers[{layer!r}]"
            convert = f"a.{attr} = a.{attr}.tocsr()"
        raise InvalidInputError(
            f"{source}: {desc} is stored as CSC (column-compressed), so reading cells in row chunks would read "
            f"the whole matrix. Convert it to CSR once (a = anndata.read_h5ad(path); {convert}; "
            "a.write_h5ad(new_path)) or open it with backed=False."
        )
    return matrix


def _open_h5ad_backed(path: Path) -> anndata.AnnData:
    """A read-only backed AnnData holding only ``obs``, ``var`` and ``raw.var`` in memory."""
    # anndata.read_h5ad(path, backed="r") keeps X and raw.X on disk but reads layers, obsm, obsp, varm, varp and
    # uns fully into memory (anndata 0.12). A counts layer is as large as X, so build the backed AnnData from the
    # annotations alone and let anndata open the file; its matrices are then sliced on disk.
    with h5py.File(path, "r") as f:
        obs = anndata.io.read_elem(f["obs"])
        var = anndata.io.read_elem(f["var"])
        raw = {"var": anndata.io.read_elem(f["raw/var"])} if "raw" in f else None
    return anndata.AnnData(obs=obs, var=var, raw=raw, filename=path, filemode="r")


def _read_10x_h5(path: Path, genome: str | None) -> anndata.AnnData:
    """A Cell Ranger ``.h5`` in memory: ``var_names`` symbols, ``var["gene_ids"]`` Ensembl ids."""
    with h5py.File(path, "r") as f:
        version = "v3" if "matrix" in f else "v2"
        if version == "v3":
            features = f["matrix/features"]
            genomes = sorted(set(features["genome"][:].astype(str).tolist())) if "genome" in features else []
        else:
            genomes = [key for key in f if isinstance(f[key], h5py.Group) and "gene_names" in f[key]]
    if version == "v2" and not genomes:
        raise InvalidInputError(
            f"{path}: not a 10x Cell Ranger .h5 (no /matrix group (v3) and no per-genome groups (v2)). "
            "If it is an AnnData file, rename it to .h5ad; otherwise export the matrix from Cell Ranger again."
        )
    if genome is not None and genome not in genomes:
        raise InvalidInputError(f"{path}: no genome {genome!r}; genomes here: {genomes}. Pass one as genome=.")
    if genome is None and version == "v2" and len(genomes) > 1:
        raise InvalidInputError(
            f"{path}: this Cell Ranger v2 file holds several genomes: {genomes}. Pass one of them as genome=."
        )
    import scanpy  # only the 10x readers need it, and it adds about a second to importing this module

    return scanpy.read_10x_h5(path, genome=genome)


def _read_10x_mtx(folder: Path) -> anndata.AnnData:
    """A Cell Ranger matrix-market folder in memory: ``var_names`` symbols, ``var["gene_ids"]`` Ensembl ids."""
    present = {child.name for child in folder.iterdir()}
    if not set(_MTX_V2_FILES) <= present and not set(_MTX_V3_FILES) <= present:
        if present & {"matrix.mtx", "matrix.mtx.gz"}:
            raise InvalidInputError(
                f"{folder}: incomplete 10x folder (found {sorted(present)}). It needs either "
                f"{list(_MTX_V2_FILES)} (Cell Ranger v2) or {list(_MTX_V3_FILES)} (v3, all gzipped): "
                "add the missing files or gzip/gunzip them to match one layout."
            )
        matrix_folders = sorted(
            child.name
            for child in folder.iterdir()
            if child.is_dir() and any((child / f).is_file() for f in ("matrix.mtx", "matrix.mtx.gz"))
        )
        if matrix_folders:
            raise InvalidInputError(
                f"{folder}: the 10x matrices are one level down, one folder per genome: {matrix_folders}. "
                "Point to one of those folders."
            )
        raise InvalidInputError(f"{folder}: folder without a matrix.mtx(.gz). Supported: {SUPPORTED_FORMATS}.")
    # Symbols as var_names keep the layout of scanpy.read_10x_h5, so gene_key="gene_ids" selects Ensembl ids for
    # every 10x input; make_unique=False keeps duplicate symbols as written ("-1" suffixes would not resolve).
    import scanpy  # see _read_10x_h5

    adata = scanpy.read_10x_mtx(folder, var_names="gene_symbols", make_unique=False)
    # read_10x_mtx transposes a genes x cells file into a CSC matrix; convert once so chunks are row slices.
    adata.X = scipy.sparse.csr_matrix(adata.X)
    return adata


def _read_h5mu_modality(path: Path, modality: str | None) -> anndata.AnnData:
    """One modality of a MuData file in memory: its ``X``, ``obs``, ``var``, ``layers`` and ``raw``."""
    with h5py.File(path, "r") as f:
        available = sorted(f["mod"].keys()) if "mod" in f else []
        if not available:
            raise InvalidInputError(
                f"{path}: no /mod group, so this is not a MuData file. Save it with MuData.write_h5mu, or rename "
                "it to .h5ad if it is an AnnData file."
            )
        if modality not in available:
            found = "no modality=" if modality is None else f"no modality {modality!r}"
            raise InvalidInputError(f"{path}: {found}; modalities here: {available}. Pass one as modality=.")
        group = f["mod"][modality]
        # Files written before anndata 0.8 (e.g. by muon) leave the modality group without an encoding type, so
        # read_elem on the group returns a plain dict; reading its elements one by one works for both layouts
        # and skips what counts do not need (obsm, uns, ...).
        parts = {key: anndata.io.read_elem(group[key]) for key in ("X", "obs", "var", "layers", "raw") if key in group}
    return anndata.AnnData(**parts)
