"""The loaders users would pick instead of our store, raced by ``data_loading.py`` on the same cells (``bench`` extra).

Each peer runs as its own documentation recommends, on a copy of the benchmark corpus in its own format, made once
under the cache folder (through a temporary folder renamed into place):

* ``bionemo_scdl``: BioNeMo's memory-mapped single-cell loader. Each corpus ``.h5ad`` converted by
  ``SingleCellMemMapDataset(path, h5ad_path=...)``; the files joined by torch's ``ConcatDataset``; a
  ``DataLoader(batch_size=64, shuffle=True, collate_fn=collate_sparse_matrix_batch)`` (its README's set-up) yields
  (64, genes) sparse CSR count tensors.
* ``tiledbsoma_ml``: TileDB-SOMA's PyTorch loader on a SOMA experiment holding the corpus files
  (``tiledbsoma.io.register_h5ads`` + ``from_h5ad``, counts in X layer ``raw``, genes the union of the files').
  ``ExperimentDataset(query, layer_name="raw", batch_size=64, shuffle=True)`` with its default I/O batch and shuffle
  chunk, through ``experiment_dataloader``, yields dense (64, genes) count arrays and the cells' obs.
* ``annbatch`` needs Python 3.12; it is listed as skipped where the interpreter is older.

A peer gives counts, the model takes tokens: each peer is timed twice, ``raw`` (its batches as it yields them) and
tokenized (the same loader, then our tokenizer on each batch's counts and padding into the model's tensors, exactly
as the AnnData loaders of ``data_loading.py`` do). The tokenized rate is the one comparable with our store.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp

BENCH_EXTRA = 'pip install "sc_foundation[bench]"'
DETECTION_ROWS = 8192  # rows whose detected genes decide the match rate, as build_store does


def tokenize(tokenizer, groups: list[tuple[sp.csr_matrix, object, np.ndarray]], pad_to_multiple: int = 8) -> dict:
    """Count rows -> one padded batch of torch tensors, as the model takes it.

    Args:
        groups: ``(counts (k, n_genes) CSR, gene match of those columns, (k,) uint64 cell keys)`` per input file.
    Returns:
        ``input_ids`` (B, L) int64, ``values`` (B, L) float32, ``attention_mask`` (B, L) bool.
    """
    import torch

    from sc_foundation.data.tokenization import pad_cells

    cells = []
    for counts, match, keys in groups:
        encoded = tokenizer.encode(counts, match, keys)
        cells += [encoded.cell(i) for i in range(len(encoded))]
    batch = pad_cells(cells, tokenizer.vocab.pad_id, pad_to_multiple)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _made_once(path: Path, make: Callable[[Path], None]) -> Path:
    """``path`` made by ``make(tmp)`` in a temporary folder beside it, renamed into place; reused when present."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        make(tmp / path.name)
        (tmp / path.name).rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _forever(make_loader: Callable[[], object]) -> Iterator:
    """The loader's batches, epoch after epoch."""
    while True:
        produced = 0
        for batch in make_loader():
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError("a peer loader produced no batch")


def _file_matches(tokenizer, files: list[Path]) -> tuple[list, list[np.ndarray]]:
    """Per corpus file: the gene match (detection from its first rows, as build_store) and the (n,) cell keys."""
    import anndata

    from sc_foundation.data.tokenization import cell_keys

    matches, keys = [], []
    for f in files:
        adata = anndata.read_h5ad(f, backed="r")
        head = sp.csr_matrix(adata.X[:DETECTION_ROWS])
        detected = np.bincount(head.indices, minlength=adata.n_vars)
        matches.append(tokenizer.match_genes(np.asarray(adata.var_names, dtype=str), cells_per_gene=detected))
        keys.append(cell_keys(adata.obs_names))
        adata.file.close()
    return matches, keys


# ------------------------------------------------------------------------------------------------- bionemo-scdl
def bionemo_scdl(files: list[Path], cache: Path, tokenizer, batch_size: int, seed: int) -> dict:
    """``raw`` and ``tokenized`` batch iterators of BioNeMo's SCDL loader over the corpus files, and its set-up."""
    import torch
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
    from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch
    from torch.utils.data import ConcatDataset, DataLoader, Dataset

    started = time.perf_counter()
    folders = []
    for f in files:

        def convert(out: Path, f=f) -> None:
            SingleCellMemMapDataset(str(out), h5ad_path=str(f), use_X_not_raw=True)

        folders.append(_made_once(cache / "scdl" / f.stem, convert))
    convert_s = time.perf_counter() - started
    data = ConcatDataset([SingleCellMemMapDataset(str(p)) for p in folders])
    starts = np.asarray([0, *data.cumulative_sizes])
    matches, keys = _file_matches(tokenizer, files)

    class Indexed(Dataset):
        """SCDL's rows with their index, so that each row's file (its gene columns and cell id) is known."""

        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, index: int):
            return data[index], index

    def collate(items):
        return collate_sparse_matrix_batch([row for row, _ in items]), np.asarray([i for _, i in items])

    generator = torch.Generator().manual_seed(seed)

    def raw() -> Iterator:
        return _forever(
            lambda: DataLoader(
                data, batch_size=batch_size, shuffle=True, collate_fn=collate_sparse_matrix_batch, generator=generator
            )
        )

    def tokenized() -> Iterator:
        loader = DataLoader(Indexed(), batch_size=batch_size, shuffle=True, collate_fn=collate, generator=generator)
        for batch, index in _forever(lambda: loader):
            indptr = batch.crow_indices().numpy()
            columns = batch.col_indices().numpy()
            values = batch.values().numpy()
            file_of = np.searchsorted(starts, index, side="right") - 1
            groups = []
            for f in np.unique(file_of):
                rows = np.flatnonzero(file_of == f)
                width = matches[f].n_input
                counts = sp.csr_matrix((values, columns, indptr), shape=(len(index), max(width, batch.shape[1])))
                groups.append((counts[rows][:, :width], matches[f], keys[f][index[rows] - starts[f]]))
            yield tokenize(tokenizer, groups)

    return {"raw": raw, "tokenized": tokenized, "convert_s": convert_s, "setup_s": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------ tiledbsoma-ml
def soma_copy(files: list[Path], path: Path) -> tuple[Path, str, str]:
    """The corpus files as one SOMA experiment at ``path`` (measurement ``RNA``, counts in X layer ``raw``).

    The files are joined in memory (genes: the union; obs: the cell ids alone, as the files' obs columns differ) and
    written by ``tiledbsoma.io.from_h5ad``.

    Returns:
        The experiment's folder and the names of its obs and var id columns.
    """
    import anndata
    import tiledbsoma.io

    def ingest(out: Path) -> None:
        parts = [anndata.read_h5ad(f) for f in files]
        for part in parts:
            part.obs = part.obs[[]]
        joined = anndata.concat(parts, join="outer", merge=None)
        joined.X = sp.csr_matrix(joined.X)
        joined.write_h5ad(out.with_suffix(".h5ad"))
        tiledbsoma.io.from_h5ad(str(out), out.with_suffix(".h5ad"), "RNA", X_layer_name="raw", use_relative_uri=True)

    return _made_once(path, ingest), "obs_id", "var_id"


def tiledbsoma_ml(copy: tuple[Path, str, str], tokenizer, batch_size: int, seed: int) -> dict:
    """``raw`` and ``tokenized`` batch iterators of tiledbsoma-ml over the corpus copy of :func:`soma_copy`."""
    import tiledbsoma
    from tiledbsoma_ml import ExperimentDataset, experiment_dataloader

    from sc_foundation.data.tokenization import cell_keys

    started = time.perf_counter()
    experiment_uri, obs_id, var_id = copy
    experiment = tiledbsoma.Experiment.open(str(experiment_uri))
    genes = experiment.ms["RNA"].var.read(column_names=["soma_joinid", var_id]).concat().to_pandas()
    genes = genes.sort_values("soma_joinid")[var_id].astype(str).to_numpy()
    # Detection over the first rows, as build_store does.
    query = experiment.axis_query("RNA", obs_query=tiledbsoma.AxisQuery(coords=(slice(0, DETECTION_ROWS - 1),)))
    head = query.X("raw").tables().concat()
    detected = np.bincount(head["soma_dim_1"].to_numpy(), minlength=len(genes))
    match = tokenizer.match_genes(genes, cells_per_gene=detected)

    def loader():
        dataset = ExperimentDataset(
            experiment.axis_query("RNA"),
            layer_name="raw",
            obs_column_names=[obs_id],
            batch_size=batch_size,
            shuffle=True,
            seed=seed,
        )
        return experiment_dataloader(dataset)

    def tokenized() -> Iterator:
        for X, obs in _forever(loader):
            counts = sp.csr_matrix(X)
            yield tokenize(tokenizer, [(counts, match, cell_keys(obs[obs_id].astype(str).to_numpy()))])

    return {
        "raw": lambda: _forever(loader),
        "tokenized": tokenized,
        "setup_s": time.perf_counter() - started,
        "close": experiment.close,
    }


def annbatch_skip_reason() -> str | None:
    """Why annbatch cannot run here, or None when it can."""
    if sys.version_info < (3, 12):
        return f"annbatch needs Python >= 3.12; this interpreter is {sys.version.split()[0]}"
    try:
        import annbatch  # noqa: F401
    except ImportError:
        return f"annbatch is not installed ({BENCH_EXTRA} on Python >= 3.12)"
    return "annbatch is installed, but this benchmark has no annbatch loader yet (written where 3.12 exists)"
