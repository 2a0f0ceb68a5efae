"""Tests for sc_foundation.data.io: every reader on small real files, layers/raw on synthetic files, every bad input."""

import time
import warnings
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse

from sc_foundation.data.io import (
    InvalidInputError,
    RoundedLogWarning,
    counts_from_anndata,
    open_counts,
    validate_counts,
    write_h5ad_once,
)

TENX = "tenx_readers"
V2_H5 = f"{TENX}/1.2.0/filtered_gene_bc_matrices_h5.h5"
V2_MTX = f"{TENX}/1.2.0/filtered_gene_bc_matrices/hg19_chr21"
V3_H5 = f"{TENX}/3.0.0/filtered_feature_bc_matrix.h5"
V3_MTX = f"{TENX}/3.0.0/filtered_feature_bc_matrix"


def data_path(shared_data: Path, relative: str) -> Path:
    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"{relative} is missing from {shared_data}")
    return path


def all_counts(source, chunk_size: int = 1000) -> scipy.sparse.csr_matrix:
    """Every chunk stacked back into one ``(n_cells, n_genes)`` float32 CSR matrix."""
    starts, chunks = zip(*source.iter_chunks(chunk_size=chunk_size), strict=True)
    assert list(starts) == list(range(0, source.n_cells, chunk_size))
    return scipy.sparse.vstack(chunks, format="csr")


def assert_same(actual: scipy.sparse.csr_matrix, expected) -> None:
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    assert (actual != scipy.sparse.csr_matrix(expected, dtype=np.float32)).nnz == 0


# --- real files -------------------------------------------------------------------------------------------------


def test_kang_backed_chunks_match_in_memory(shared_data):
    path = data_path(shared_data, "kang_ifnb/kang_ifnb.h5ad")
    in_memory = anndata.read_h5ad(path)
    with open_counts(path) as source:
        assert source.adata.isbacked
        assert source.adata.file["X/data"].dtype == np.uint16
        assert (source.n_cells, source.n_genes) == in_memory.shape
        assert list(source.gene_names[:3]) == list(in_memory.var_names[:3])
        assert source.obs["condition"].equals(in_memory.obs["condition"])
        chunks = source.iter_chunks(chunk_size=1000)
        for expected_start in (0, 1000, 2000):
            start, counts = next(chunks)
            assert start == expected_start
            assert isinstance(counts, scipy.sparse.csr_matrix)
            assert_same(counts, in_memory.X[start : start + 1000])
    assert not source.adata.file.is_open


def test_pbmc3k_gene_key_and_short_last_chunk(shared_data):
    path = data_path(shared_data, "pbmc3k/pbmc3k.h5ad")
    with open_counts(path) as symbols, open_counts(path, gene_key="gene_ids") as ids:
        assert symbols.gene_names[2] == "OR4F5"
        assert ids.gene_names[2] == "ENSG00000186092"
        assert all(name.startswith("ENSG") for name in ids.gene_names)
        chunk_rows = [counts.shape[0] for _, counts in ids.iter_chunks(chunk_size=1000)]
    assert chunk_rows == [1000, 1000, 700]


def test_eccite_float32_counts_keep_genome_prefix(shared_data):
    path = data_path(shared_data, "eccite_pbmc/eccite_rna.h5ad")
    in_memory = anndata.read_h5ad(path)
    assert in_memory.X.dtype == np.float32
    with open_counts(path) as source:
        assert source.n_genes == 19521
        assert all(name.startswith("hg19_") for name in source.gene_names)
        assert_same(all_counts(source, chunk_size=200), in_memory.X)


def test_merfish_gene_key_feature_name(shared_data):
    path = data_path(shared_data, "merfish_mouse_brain/mouse_val.h5ad")
    with open_counts(path, gene_key="feature_name") as source:
        assert source.adata.var_names[0] == "0"
        assert list(source.gene_names[:3]) == ["Htr7", "Gzmk", "Arhgap36"]
        assert "cell_type" in source.obs.columns
        _, counts = next(source.iter_chunks(chunk_size=500))
    assert counts.shape == (500, 1122)


@pytest.mark.parametrize(("h5", "mtx"), [(V2_H5, V2_MTX), (V3_H5, V3_MTX)], ids=["v2", "v3"])
def test_tenx_h5_and_mtx_folder_agree(shared_data, h5, mtx):
    from_h5 = open_counts(data_path(shared_data, h5))
    from_mtx = open_counts(data_path(shared_data, mtx))
    assert not from_h5.adata.isbacked
    assert list(from_mtx.gene_names) == list(from_h5.gene_names)
    assert list(from_mtx.obs.index) == list(from_h5.obs.index)
    assert list(from_mtx.adata.var["gene_ids"]) == list(from_h5.adata.var["gene_ids"])
    assert_same(all_counts(from_mtx, chunk_size=5), all_counts(from_h5, chunk_size=5))


def test_tenx_v3_gene_ids_are_ensembl(shared_data):
    source = open_counts(data_path(shared_data, V3_H5), gene_key="gene_ids")
    assert source.n_genes == source.adata.n_vars > 0
    assert all(name.startswith("ENSG") for name in source.gene_names)
    assert source.adata.var["feature_types"].eq("Gene Expression").all()
    assert open_counts(data_path(shared_data, V3_H5), genome="GRCh38_chr21").n_genes == source.n_genes
    with pytest.raises(InvalidInputError, match=r"bc_matrix\.h5: no genome 'mm10'; .*\['GRCh38_chr21'\]"):
        open_counts(data_path(shared_data, V3_H5), genome="mm10")


def test_tenx_v2_multiple_genomes(shared_data):
    path = data_path(shared_data, f"{TENX}/1.2.0/multiple_genomes.h5")
    with pytest.raises(InvalidInputError, match=r"multiple_genomes\.h5.*another_genome.*hg19_chr21.*genome="):
        open_counts(path)
    with pytest.raises(InvalidInputError, match=r"multiple_genomes\.h5: no genome 'mm10'.*genome="):
        open_counts(path, genome="mm10")
    source = open_counts(path, genome="another_genome")
    assert source.gene_names[0] == "gene_0"
    assert all_counts(source, chunk_size=4).shape == (source.n_cells, source.n_genes)


def test_tenx_parent_folder_points_to_genome_folders(shared_data):
    path = data_path(shared_data, f"{TENX}/1.2.0/filtered_gene_bc_matrices")
    with pytest.raises(InvalidInputError, match=r"filtered_gene_bc_matrices: .*\['hg19_chr21'\].*Point to one"):
        open_counts(path)


# The muon-era test file predates anndata's encoding metadata; anndata says so for every element it reads.
@pytest.mark.filterwarnings("ignore::anndata.OldFormatWarning")
def test_h5mu_rna_modality(shared_data):
    path = data_path(shared_data, "multiome_pbmc/test_rna_atac.h5mu")
    source = open_counts(path, modality="rna", gene_key="gene_ids")
    assert (source.n_cells, source.n_genes) == (1000, 45)
    assert source.adata.var_names[0] == "CDC14A"
    assert source.gene_names[0] == "ENSG00000079335"
    with h5py.File(path) as f:
        expected = anndata.io.read_elem(f["mod/rna/X"])
    assert_same(all_counts(source, chunk_size=300), expected)


@pytest.mark.parametrize("modality", ["protein", None])
def test_h5mu_missing_modality_lists_available(shared_data, modality):
    path = data_path(shared_data, "multiome_pbmc/test_rna_atac.h5mu")
    with pytest.raises(InvalidInputError, match=r"test_rna_atac\.h5mu: no modality.*\['atac', 'rna'\].*modality="):
        open_counts(path, modality=modality)


# --- layers and .raw on synthetic files -------------------------------------------------------------------------


@pytest.fixture
def processed_h5ad(tmp_path) -> tuple[Path, np.ndarray]:
    """A typical processed file: X log-normalised, raw counts in layers['counts'] (CSR), a dense copy, and .raw."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.8, size=(60, 15)).astype(np.int32)
    counts[5] = 0  # an empty cell, which must come through
    lognorm = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4).astype(np.float32)
    adata = anndata.AnnData(X=scipy.sparse.csr_matrix(lognorm))
    adata.var_names = [f"G{i}" for i in range(15)]
    adata.var["ensembl"] = [f"ENSG{i:011d}" for i in range(15)]
    adata.layers["counts"] = scipy.sparse.csr_matrix(counts)
    adata.layers["counts_dense"] = counts.astype(np.float64)
    adata.raw = anndata.AnnData(X=scipy.sparse.csr_matrix(counts.astype(np.uint16)), var=adata.var.copy())
    path = tmp_path / "processed.h5ad"
    adata.write_h5ad(path)
    return path, counts


@pytest.mark.parametrize("backed", [True, False], ids=["backed", "in_memory"])
@pytest.mark.parametrize(
    "choice", [{"layer": "counts"}, {"layer": "counts_dense"}, {"use_raw": True}], ids=["layer", "dense", "raw"]
)
def test_counts_from_layer_or_raw(processed_h5ad, backed, choice):
    path, counts = processed_h5ad
    with open_counts(path, backed=backed, gene_key="ensembl", **choice) as source:
        assert source.adata.isbacked == backed
        if backed:
            assert len(source.adata.layers) == 0  # layers stay on disk until a chunk is read
        assert source.gene_names[3] == "ENSG00000000003"
        stacked = all_counts(source, chunk_size=16)
    assert_same(stacked, counts)
    assert stacked[5].nnz == 0


@pytest.mark.parametrize("backed", [True, False], ids=["backed", "in_memory"])
def test_log_normalised_x_is_refused_with_the_fix(processed_h5ad, backed):
    path, _ = processed_h5ad
    with open_counts(path, backed=backed) as source:
        with pytest.raises(InvalidInputError) as error:
            next(source.iter_chunks())
        message = str(error.value)
        assert message.startswith(f"{path}: X (rows 0-59) holds ")
        assert "non-integer values (e.g. " in message
        assert "log-normalised" in message
        assert "layer='counts' (layers here: ['counts', 'counts_dense'])" in message
        assert "use_raw=True" in message
        # Normalised values are still readable when the caller asks for them.
        _, values = next(source.iter_chunks(require_integer=False))
        assert values.dtype == np.float32 and values.max() > 5


def test_callers_backed_anndata_is_read_on_disk_and_left_open(processed_h5ad):
    path, counts = processed_h5ad
    adata = anndata.read_h5ad(path, backed="r")
    with counts_from_anndata(adata, layer="counts", name=str(path)) as source:
        assert_same(all_counts(source, chunk_size=25), counts)
    assert adata.file.is_open
    adata.file.close()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32, np.float64])
def test_any_numeric_dtype_becomes_float32(dtype):
    counts = np.arange(24).reshape(6, 4) % 5
    for matrix in (counts.astype(dtype), scipy.sparse.csc_matrix(counts.astype(dtype))):
        source = counts_from_anndata(anndata.AnnData(X=matrix))
        assert source.path == "<AnnData>"
        assert_same(all_counts(source, chunk_size=4), counts)


def test_explicit_zeros_are_dropped_without_touching_the_input():
    matrix = scipy.sparse.csr_matrix((np.array([0.0, 3.0]), np.array([0, 1]), np.array([0, 2, 2])), shape=(2, 3))
    source = counts_from_anndata(anndata.AnnData(X=matrix))
    _, counts = next(source.iter_chunks())
    assert counts.nnz == 1 and counts[0, 1] == 3
    assert matrix.nnz == 2


def test_csc_is_refused_in_backed_mode_only(tmp_path):
    counts = np.arange(12).reshape(4, 3) % 4
    path = tmp_path / "csc.h5ad"
    anndata.AnnData(X=scipy.sparse.csc_matrix(counts.astype(np.float32))).write_h5ad(path)
    with pytest.raises(InvalidInputError, match=r"csc\.h5ad: X is stored as CSC.*tocsr\(\).*backed=False"):
        open_counts(path)
    with open_counts(path, backed=False) as source:
        assert_same(all_counts(source, chunk_size=3), counts)


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_value", "expected"),
    [
        (-2.0, r"holds 1 negative values \(e\.g\. -2\): it looks scaled"),
        (np.nan, r"holds 1 NaN and 0 infinite values"),
        (np.inf, r"holds 0 NaN and 1 infinite values"),
        (0.693, r"holds 1 non-integer values \(e\.g\. 0\.693\): it looks log-normalised"),
    ],
    ids=["negative", "nan", "inf", "non_integer"],
)
def test_bad_values_are_refused(tmp_path, bad_value, expected):
    counts = np.ones((3, 4), dtype=np.float32)
    counts[1, 2] = bad_value
    path = tmp_path / "bad.h5ad"
    anndata.AnnData(X=scipy.sparse.csr_matrix(counts)).write_h5ad(path)
    with open_counts(path) as source, pytest.raises(InvalidInputError, match=rf"bad\.h5ad: X \(rows 0-2\) {expected}"):
        list(source.iter_chunks())


def test_validate_counts_checks_stored_entries_and_counts_offenders():
    lognorm = np.log1p(np.array([[0, 1, 3], [0, 0, 1]], dtype=np.float64))
    # Three offending entries, two distinct values: examples are not repeated.
    with pytest.raises(InvalidInputError, match=r"^f\.h5ad: X holds 3 non-integer values \(e\.g\. 0\.6931, 1\.386\):"):
        validate_counts(scipy.sparse.csr_matrix(lognorm), source="f.h5ad", matrix_desc="X")
    with pytest.raises(InvalidInputError, match=r"Fix: point to the raw-count matrix"):
        validate_counts(lognorm, source="f.h5ad", matrix_desc="X")
    with pytest.raises(InvalidInputError, match=r"f\.h5ad: X has dtype bool, but raw counts must be numeric"):
        validate_counts(lognorm > 0, source="f.h5ad", matrix_desc="X")
    validate_counts(lognorm, source="f.h5ad", matrix_desc="X", require_integer=False)
    validate_counts(np.array([[0, 7]], dtype=np.uint16), source="f.h5ad", matrix_desc="X")


def test_unknown_layer_lists_layers(processed_h5ad):
    path, _ = processed_h5ad
    with pytest.raises(InvalidInputError, match=r"processed\.h5ad: no layer 'raw_counts'; layers here: \['counts',"):
        open_counts(path, layer="raw_counts")


def test_layer_and_raw_together_are_refused(processed_h5ad):
    path, _ = processed_h5ad
    with pytest.raises(InvalidInputError, match=r"processed\.h5ad: .*Pass only one of them"):
        open_counts(path, layer="counts", use_raw=True)


@pytest.mark.parametrize("backed", [True, False], ids=["backed", "in_memory"])
def test_missing_raw(tmp_path, backed):
    path = tmp_path / "noraw.h5ad"
    anndata.AnnData(X=scipy.sparse.csr_matrix(np.ones((2, 2), dtype=np.float32))).write_h5ad(path)
    with pytest.raises(InvalidInputError, match=r"noraw\.h5ad: use_raw=True, but this input has no \.raw\. Drop"):
        open_counts(path, use_raw=True, backed=backed)


def test_unknown_gene_key_lists_columns(processed_h5ad):
    path, _ = processed_h5ad
    with pytest.raises(InvalidInputError, match=r"processed\.h5ad: no column 'gene_ids' in var; .*\['ensembl'\]"):
        open_counts(path, gene_key="gene_ids")
    with pytest.raises(InvalidInputError, match=r"^<AnnData>: no column 'symbol' in raw\.var"):
        counts_from_anndata(anndata.read_h5ad(path), use_raw=True, gene_key="symbol")


def test_unsupported_missing_and_corrupt_files(tmp_path):
    loom = tmp_path / "cells.loom"
    loom.write_text("not a loom file")
    with pytest.raises(InvalidInputError, match=r"cells\.loom: unsupported input\. Supported: \.h5ad .*matrix\.mtx"):
        open_counts(loom)
    with pytest.raises(InvalidInputError, match=r"absent\.h5ad: no such file or directory\. Check the path"):
        open_counts(tmp_path / "absent.h5ad")
    fake = tmp_path / "fake.h5ad"
    fake.write_text("truncated download")
    with pytest.raises(InvalidInputError, match=r"fake\.h5ad: not an HDF5 file.*download or write it again"):
        open_counts(fake)


def test_format_specific_options_are_refused_elsewhere(processed_h5ad):
    path, _ = processed_h5ad
    with pytest.raises(InvalidInputError, match=r"processed\.h5ad: modality='rna' only applies to \.h5mu"):
        open_counts(path, modality="rna")
    with pytest.raises(InvalidInputError, match=r"processed\.h5ad: genome='hg19' only applies to 10x \.h5"):
        open_counts(path, genome="hg19")


def test_incomplete_mtx_folder(tmp_path):
    (tmp_path / "matrix.mtx.gz").write_bytes(b"")
    (tmp_path / "features.tsv").write_text("")
    with pytest.raises(InvalidInputError, match=r"incomplete 10x folder.*gzip/gunzip them to match one layout"):
        open_counts(tmp_path)


def test_rounded_log_values_warn_and_raw_counts_do_not(real_slice):
    """Integers pass the count check, but log1p(counts per 10k) rounded to integers stays below 10."""
    import scanpy as sc

    raw = real_slice("pbmc3k/pbmc3k.h5ad", 300)
    rounded = raw.copy()
    sc.pp.normalize_total(rounded, target_sum=1e4)
    sc.pp.log1p(rounded)
    rounded.X.data = np.rint(rounded.X.data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoundedLogWarning)
        list(counts_from_anndata(raw, name="raw.h5ad").iter_chunks(100))
    with pytest.warns(
        RoundedLogWarning, match=r"rounded.h5ad: X: .* integers from 1 to [5-9] .*filterwarnings"
    ) as seen:
        list(counts_from_anndata(rounded, name="rounded.h5ad").iter_chunks(100))
    assert len(seen) == 1, "one warning per input, not per chunk"


def test_write_h5ad_once_keeps_a_file_of_the_same_cells(tmp_path):
    """DDP ranks of one task derive the same cells at once: the file is written once and then left alone (a store
    built from it is keyed on its modification time); other cells replace it."""
    cells = anndata.AnnData(scipy.sparse.random(30, 12, density=0.3, format="csr", dtype=np.float32, random_state=0))
    path = tmp_path / "corrupted.h5ad"
    write_h5ad_once(cells, path)
    written = path.stat().st_mtime_ns
    time.sleep(0.01)
    write_h5ad_once(cells.copy(), path)
    assert path.stat().st_mtime_ns == written and path.stat().st_mode & 0o044 == 0o044
    other = cells.copy()
    other.X = other.X * 2
    write_h5ad_once(other, path)
    assert path.stat().st_mtime_ns != written
    np.testing.assert_array_equal(anndata.read_h5ad(path).X.toarray(), other.X.toarray())
    assert [p.name for p in tmp_path.iterdir()] == ["corrupted.h5ad"], "no temporary file left behind"
