"""Tests for sc_foundation.data.store: building corpus stores from small real slices, reading them back, resuming
builds."""

import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sc_foundation.data.genes import GeneVocab, resolve_genes
from sc_foundation.data.io import InvalidInputError
from sc_foundation.data.store import CorpusInput, CorpusStore, build_store, load_report
from sc_foundation.data.tokenization import GeneMatchError, GeneTokenizer, TokenizerConfig, cell_keys

KANG = "kang_ifnb/kang_ifnb.h5ad"
CELLBENCH = "cellbench_3cl/cellbench_3cl.h5ad"
ECCITE = "eccite_pbmc/eccite_rna.h5ad"
GENEFORMER_VOCAB = "genecorpus_tokenized/vocab.txt"
OBS_KEYS = ["condition"]
CONTEXT = 256


# --- fixtures and helpers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slices(real_slice, tmp_path_factory) -> dict[str, Path]:
    """Small real slices written as .h5ad: kang (300 cells), cellbench (100 cells of each protocol), eccite (200)."""
    folder = tmp_path_factory.mktemp("slices")
    rows = {KANG: 300, CELLBENCH: np.r_[0:100, 399:499], ECCITE: 200}
    names = {KANG: "kang.h5ad", CELLBENCH: "cellbench.h5ad", ECCITE: "eccite.h5ad"}
    out = {}
    for relative, selection in rows.items():
        adata = real_slice(relative, selection)
        adata.write_h5ad(folder / names[relative])
        out[names[relative]] = folder / names[relative]
    return out


def corpus_inputs(slices) -> list:
    return [
        str(slices["kang.h5ad"]),
        {"path": slices["cellbench.h5ad"], "batch_key": "batch"},
        CorpusInput(path=str(slices["eccite.h5ad"])),
    ]


def build(slices, out, encoding="binned", **kw):
    settings = {
        "tokenizer_config": TokenizerConfig(encoding=encoding, context_length=CONTEXT),
        "obs_keys": OBS_KEYS,
        "chunk_size": 64,
        "min_cells_per_gene": 3,
        **kw,
    }
    return build_store(corpus_inputs(slices), out, **settings)


@pytest.fixture(scope="module", params=["binned", "rank", "continuous"])
def store_dir(request, slices, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"store_{request.param}") / "store"
    report = build(slices, out, encoding=request.param)
    assert report.n_cells == 700
    return out


@pytest.fixture(scope="module")
def binned_store(slices, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("binned") / "store"
    build(slices, out)
    return out


def content(store: CorpusStore) -> tuple[pd.DataFrame, list[tuple[list[int], list[float]]]]:
    cells = [store[i] for i in range(len(store))]
    return store.obs, [(ids.tolist(), values.tolist()) for ids, values in cells]


def assert_same_store(a: Path, b: Path) -> None:
    left, right = CorpusStore(a), CorpusStore(b)
    assert left.tokenizer == right.tokenizer
    obs_a, cells_a = content(left)
    obs_b, cells_b = content(right)
    pd.testing.assert_frame_equal(obs_a, obs_b)
    assert cells_a == cells_b


def as_stored(tokenizer: GeneTokenizer, values: np.ndarray) -> np.ndarray:
    """What a store gives back for a cell's tokenizer values: a rank store keeps none (the order is the value)."""
    return np.zeros_like(values) if tokenizer.config.encoding == "rank" else values


def write_h5ad(path: Path, X, var_names, obs=None, layers=None) -> Path:
    obs = obs if obs is not None else pd.DataFrame(index=[f"cell{i}" for i in range(X.shape[0])])
    adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(var_names)), layers=layers)
    adata.write_h5ad(path)
    return path


# --- a built store ------------------------------------------------------------------------------------------------


def test_store_length_and_obs(store_dir, slices):
    store = CorpusStore(store_dir)
    report = load_report(store_dir)
    kang = anndata.read_h5ad(slices["kang.h5ad"])
    cellbench = anndata.read_h5ad(slices["cellbench.h5ad"])
    eccite = anndata.read_h5ad(slices["eccite.h5ad"])
    assert len(store) == 700 == report.n_cells
    assert [s.source for s in report.shards] == ["kang.h5ad", "cellbench.h5ad", "eccite.h5ad"]
    assert [s.n_cells_in for s in report.shards] == [300, 200, 200]
    assert all(s.n_empty == 0 for s in report.shards)
    obs = store.obs
    assert obs["source"].tolist() == ["kang.h5ad"] * 300 + ["cellbench.h5ad"] * 200 + ["eccite.h5ad"] * 200
    assert obs["cell_id"].tolist() == [*kang.obs_names, *cellbench.obs_names, *eccite.obs_names]
    expected_batch = ["kang.h5ad"] * 300 + cellbench.obs["batch"].astype(str).tolist() + ["eccite.h5ad"] * 200
    assert obs["batch"].tolist() == expected_batch
    assert set(obs["batch"].iloc[300:500]) == {"sc_celseq2", "sc_dropseq"}
    assert obs["condition"].iloc[:300].tolist() == kang.obs["condition"].astype(str).tolist()
    assert obs["condition"].iloc[300:].isna().all()
    assert report.shards[0].missing_obs_keys == []
    assert report.shards[1].missing_obs_keys == ["condition"] == report.shards[2].missing_obs_keys
    for column in ("source", "batch", "condition"):
        assert isinstance(obs[column].dtype, pd.CategoricalDtype)
    totals = np.concatenate([np.asarray(a.X.sum(axis=1)).ravel() for a in (kang, cellbench, eccite)])
    np.testing.assert_allclose(obs["n_counts"], totals, rtol=1e-6)
    assert np.all(store.lengths <= CONTEXT)
    assert np.all(store.lengths == np.minimum(obs["n_expressed"] + 1, CONTEXT))
    assert report.n_vocab == len(store.vocab)
    assert report.shards[2].species == "human"
    assert report.shards[2].n_genes_in == eccite.n_vars


def test_vocabulary_and_medians_come_from_the_whole_corpus(store_dir, slices):
    """Pass 1, checked independently: genes detected in >= 3 cells over all files; rank medians over all cells."""
    detection: dict[str, int] = {}
    values: dict[str, list[np.ndarray]] = {}
    for name in ("kang.h5ad", "cellbench.h5ad", "eccite.h5ad"):
        adata = anndata.read_h5ad(slices[name])
        canonical = resolve_genes(list(adata.var_names)).canonical
        genes = sorted({c for c in canonical if c is not None})
        column = {g: j for j, g in enumerate(genes)}
        resolved = np.flatnonzero([c is not None for c in canonical])
        select = sp.csr_matrix(
            (np.ones(len(resolved)), (resolved, [column[canonical[i]] for i in resolved])),
            shape=(adata.n_vars, len(genes)),
        )
        counts = sp.csr_matrix(adata.X, dtype=np.float64)
        totals = np.asarray(counts.sum(axis=1)).ravel()
        per_gene = sp.csc_matrix(sp.diags(1e4 / totals) @ counts @ select)
        per_gene.eliminate_zeros()
        for j, gene in enumerate(genes):
            nonzero = per_gene.data[per_gene.indptr[j] : per_gene.indptr[j + 1]]
            detection[gene] = detection.get(gene, 0) + len(nonzero)
            values.setdefault(gene, []).append(nonzero)
    store = CorpusStore(store_dir)
    assert store.vocab.tokens[3:] == sorted(g for g, n in detection.items() if n >= 3)
    if store.tokenizer.config.encoding == "rank":
        medians = store.tokenizer.gene_medians
        common = [g for g, n in detection.items() if n >= 150]
        assert len(common) > 1000
        exact = np.array([np.median(np.concatenate(values[g])) for g in common])
        error = np.abs(medians[store.vocab.lookup(common)] / exact - 1)
        # Histogram medians of discrete counts: nearly all within one bin (7.5%), none far off.
        assert np.mean(error < 0.075) > 0.99
        assert error.max() < 0.15
        assert np.isnan(medians[store.vocab.special_ids]).all()


def test_store_reproduces_the_tokenizer(store_dir, slices):
    """h5ad -> store -> batch gives exactly what the store's tokenizer gives for the same cells."""
    store = CorpusStore(store_dir)
    tokenizer = GeneTokenizer.from_pretrained(store_dir)
    assert tokenizer == store.tokenizer
    if tokenizer.config.encoding == "rank":
        assert np.isfinite(tokenizer.gene_medians).sum() > 1000
    start = 0
    for name in ("kang.h5ad", "cellbench.h5ad", "eccite.h5ad"):
        adata = anndata.read_h5ad(slices[name])
        match = tokenizer.match_genes(list(adata.var_names))
        cells = tokenizer.encode(sp.csr_matrix(adata.X, dtype=np.float32), match, cell_keys(adata.obs_names))
        assert len(cells) == adata.n_obs
        indices = np.arange(start, start + len(cells))
        assert store.obs["cell_id"].iloc[indices].tolist() == adata.obs_names[cells.rows].tolist()
        # One cell at a time.
        for i, index in enumerate(indices):
            ids, values = store[index]
            expected_ids, expected_values = cells.cell(i)
            assert np.array_equal(ids, expected_ids)
            assert values.dtype == np.float32
            assert np.array_equal(values, as_stored(tokenizer, expected_values))
        np.testing.assert_array_equal(store.lengths[indices], cells.lengths)
        # A padded batch, in shuffled order.
        picked = np.random.default_rng(0).permutation(len(cells))[:40]
        batch = store.get_batch(indices[picked])
        width = batch["input_ids"].shape[1]
        assert width % 8 == 0 and width >= cells.lengths[picked].max() > width - 8
        assert batch["input_ids"].dtype == np.int64 and batch["values"].dtype == np.float32
        assert np.array_equal(batch["cell_index"], indices[picked])
        for row, i in enumerate(picked):
            ids, values = cells.cell(i)
            n = len(ids)
            assert np.array_equal(batch["input_ids"][row, :n], ids)
            assert np.array_equal(batch["values"][row, :n], as_stored(tokenizer, values))
            assert np.all(batch["input_ids"][row, n:] == tokenizer.vocab.pad_id)
            assert np.all(batch["values"][row, n:] == 0)
            assert batch["attention_mask"][row].tolist() == [True] * n + [False] * (width - n)
        # Packed.
        packed = store.get_packed(indices[picked])
        lengths = cells.lengths[picked]
        assert packed["cu_seqlens"].tolist() == [0, *np.cumsum(lengths).tolist()]
        assert int(packed["max_seqlen"]) == lengths.max()
        assert packed["input_ids"].shape == (1, lengths.sum())
        assert np.array_equal(packed["input_ids"][0], np.concatenate([cells.cell(i)[0] for i in picked]))
        expected = np.concatenate([cells.cell(i)[1] for i in picked])
        assert np.array_equal(packed["values"][0], as_stored(tokenizer, expected))
        start += len(cells)
    assert start == len(store)


def test_to_hf_dataset_has_the_same_rows(binned_store):
    store = CorpusStore(binned_store)
    dataset = store.to_hf_dataset()
    assert len(dataset) == len(store)
    assert dataset["cell_id"] == store.obs["cell_id"].tolist()
    assert dataset["source"] == store.obs["source"].astype(str).tolist()
    for index in (0, 1, 299, 300, 499, 500, 699):
        row = dataset[index]
        ids, values = store[index]
        assert row["gene_ids"] == ids.tolist()
        np.testing.assert_array_equal(np.asarray(row["values"], dtype=np.float32), values)
        assert row["length"] == len(ids)


def test_fixed_geneformer_vocab(slices, shared_data, tmp_path):
    vocab_path = shared_data / GENEFORMER_VOCAB
    if not vocab_path.exists():
        pytest.skip("Geneformer vocab missing")
    kang = slices["kang.h5ad"]
    report = build_store(
        [kang], tmp_path / "store", vocab=vocab_path, tokenizer_config=TokenizerConfig(context_length=4096)
    )
    store = CorpusStore(tmp_path / "store")
    geneformer = GeneVocab.from_file(vocab_path)
    assert store.vocab == geneformer
    assert report.n_vocab == len(geneformer)
    assert (store.vocab.pad_id, store.vocab.mask_id, store.vocab.cls_id) == (0, 1, len(geneformer) - 1)
    # The stored ids are Geneformer ids of the expressed genes, computed here independently.
    adata = anndata.read_h5ad(kang)
    ids = geneformer.lookup(resolve_genes(list(adata.var_names)).canonical)
    counts = sp.csr_matrix(adata.X)
    for index in (0, 7, 150):
        columns = counts[index].indices
        expected = np.unique(ids[columns][ids[columns] >= 0])
        stored, _ = store[index]
        assert stored[0] == geneformer.cls_id
        assert stored[1:].tolist() == expected.tolist()
    batch = store.get_batch([0, 1, 2], pad_to_multiple=64)
    assert np.all(batch["input_ids"][~batch["attention_mask"]] == 0)


def test_num_workers_two_gives_the_same_store(slices, binned_store, tmp_path):
    """Inputs cut into row ranges of 128 cells (7 parts) on two workers: the store of one process, uncut."""
    build(slices, tmp_path / "parallel", num_workers=2, part_size=128)
    shards = sorted(p.stem for p in (tmp_path / "parallel" / "shards").glob("*.arrow"))
    assert shards == [
        "00000-00000",
        "00000-00001",
        "00000-00002",
        "00001-00000",
        "00001-00001",
        "00002-00000",
        "00002-00001",
    ]
    assert_same_store(tmp_path / "parallel", binned_store)
    assert [s.n_cells_in for s in load_report(tmp_path / "parallel").shards] == [300, 200, 200]


# --- reports ------------------------------------------------------------------------------------------------------


def with_empty_rows(kang: anndata.AnnData, rows, path: Path) -> Path:
    X = sp.lil_matrix(sp.csr_matrix(kang.X, dtype=np.float32))
    X[list(rows), :] = 0
    return write_h5ad(path, sp.csr_matrix(X), kang.var_names, obs=kang.obs)


def test_report_counts_empty_cells(real_slice, tmp_path):
    kang = real_slice(KANG, 120)
    # A few empty cells, and one chunk (rows 50-99) holding nothing but empty cells.
    empty_rows = [4, 17, *range(50, 100)]
    path = with_empty_rows(kang, empty_rows, tmp_path / "with_empty.h5ad")
    report = build_store([path], tmp_path / "store", min_cells_per_gene=1, chunk_size=50)
    shard = report.shards[0]
    assert (shard.n_cells_in, shard.n_empty, shard.n_cells) == (120, 52, 68)
    store = CorpusStore(tmp_path / "store")
    assert len(store) == 68
    kept = [i for i in range(120) if i not in empty_rows]
    assert store.obs["cell_id"].tolist() == kang.obs_names[kept].tolist()
    # Cells on both sides of the empty chunk read back as the tokenizer makes them.
    tokenizer = store.tokenizer
    counts = sp.csr_matrix(kang.X[kept], dtype=np.float32)
    match = tokenizer.match_genes(
        list(kang.var_names), cells_per_gene=np.bincount(counts.indices, minlength=kang.n_vars)
    )
    cells = tokenizer.encode(counts, match, cell_keys(kang.obs_names[kept]))
    for index in (0, 46, 47, 67):
        assert np.array_equal(store[index][0], cells.cell(index)[0])
        assert np.array_equal(store[index][1], cells.cell(index)[1])
    assert len(store.to_hf_dataset()) == 68
    text = report.format()
    assert str(tmp_path / "store") in text
    line = next(line for line in text.splitlines() if line.startswith("with_empty.h5ad"))
    assert line.split()[1:4] == ["120", "52", "68"]
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert total.split()[1:4] == ["120", "52", "68"]
    # The saved report is the same.
    assert load_report(tmp_path / "store").shards == report.shards


def test_file_starting_with_empty_cells_builds(real_slice, tmp_path):
    """A file whose first chunk holds only empty cells (empty droplets first) is valid input."""
    kang = real_slice(KANG, 120)
    path = with_empty_rows(kang, range(50), tmp_path / "empty_first.h5ad")
    report = build_store([path], tmp_path / "store", min_cells_per_gene=1, chunk_size=50)
    assert (report.shards[0].n_empty, report.n_cells) == (50, 70)


# --- bad inputs ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kang_small(real_slice) -> anndata.AnnData:
    return real_slice(KANG, 60)


def test_negative_values_are_refused(kang_small, tmp_path):
    X = sp.csr_matrix(kang_small.X, dtype=np.float32)
    X.data[5] = -3
    path = write_h5ad(tmp_path / "negative.h5ad", X, kang_small.var_names)
    with pytest.raises(InvalidInputError, match="negative") as error:
        build_store([path], tmp_path / "store", min_cells_per_gene=1)
    assert "negative.h5ad" in str(error.value)


def test_log_normalised_values_are_refused_pointing_to_the_counts_layer(kang_small, tmp_path):
    counts = sp.csr_matrix(kang_small.X, dtype=np.float32)
    logged = counts.copy()
    logged.data = np.log1p(logged.data / 3.0)
    path = write_h5ad(tmp_path / "logged.h5ad", logged, kang_small.var_names, layers={"counts": counts})
    with pytest.raises(InvalidInputError, match="non-integer") as error:
        build_store([path], tmp_path / "store", min_cells_per_gene=1)
    assert "layer='counts'" in str(error.value)
    assert "logged.h5ad" in str(error.value)
    # Following the advice works.
    report = build_store([{"path": path, "layer": "counts"}], tmp_path / "fixed", min_cells_per_gene=1)
    assert report.n_cells == 60


def test_nan_values_are_refused(kang_small, tmp_path):
    X = sp.csr_matrix(kang_small.X, dtype=np.float32)
    X.data[[3, 30]] = np.nan
    path = write_h5ad(tmp_path / "nan.h5ad", X, kang_small.var_names)
    with pytest.raises(InvalidInputError, match="NaN"):
        build_store([path], tmp_path / "store", min_cells_per_gene=1)


def fake_genes_file(folder: Path) -> Path:
    counts = np.random.default_rng(0).poisson(1.0, (50, 40)).astype(np.float32)
    return write_h5ad(folder / "fake.h5ad", sp.csr_matrix(counts), [f"FAKEGENE{i}" for i in range(40)])


def test_file_without_gene_overlap_is_refused(slices, tmp_path):
    fake = fake_genes_file(tmp_path)
    with pytest.raises(GeneMatchError, match="FAKEGENE") as error:
        build_store([slices["kang.h5ad"], fake], tmp_path / "store", min_cells_per_gene=1)
    assert "fake.h5ad" in str(error.value)


def test_only_file_without_resolvable_genes_names_the_file(tmp_path):
    """With no resolvable gene at all, the error must say which file and which names, not only 'lower min_cells'."""
    fake = fake_genes_file(tmp_path)
    with pytest.raises(ValueError, match="FAKEGENE") as error:
        build_store([fake], tmp_path / "store", min_cells_per_gene=1)
    assert "fake.h5ad" in str(error.value)


def test_unknown_batch_key_is_refused(slices, tmp_path):
    with pytest.raises(InvalidInputError, match="donor") as error:
        build_store([{"path": slices["kang.h5ad"], "batch_key": "donor"}], tmp_path / "store", min_cells_per_gene=1)
    assert "condition" in str(error.value)  # the columns it does have


def test_missing_file_is_refused(slices, tmp_path):
    with pytest.raises(InvalidInputError, match="no such file"):
        build_store([slices["kang.h5ad"], tmp_path / "absent.h5ad"], tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_unknown_input_setting_is_refused(slices, tmp_path):
    with pytest.raises(ValueError, match="batchkey"):
        build_store([{"path": slices["kang.h5ad"], "batchkey": "condition"}], tmp_path / "store")
    with pytest.raises(ValueError, match="at least one"):
        build_store([], tmp_path / "store")


def test_obs_keys_named_like_store_columns(slices, tmp_path):
    """cellbench has an obs column "batch"; asking to keep it must not corrupt the store's own batch column."""
    out = tmp_path / "store"
    inputs = [slices["kang.h5ad"], slices["cellbench.h5ad"]]
    try:
        build_store(inputs, out, min_cells_per_gene=3, obs_keys=["batch"])
    except ValueError as error:  # refusing the clash up front is fine, if the message names it
        assert "batch" in str(error) and "obs_keys" in str(error)
        return
    store = CorpusStore(out)
    assert list(store.obs.columns).count("batch") == 1, list(store.obs.columns)
    assert store.obs["batch"].iloc[:300].astype(str).tolist() == ["kang.h5ad"] * 300


def test_small_single_file_and_min_cells_per_gene(slices, tmp_path):
    """Genes seen in fewer than min_cells_per_gene cells are left out of a built vocabulary; on a 300-cell file that
    drops most detected genes, and the refusal must point at min_cells_per_gene, not only at the gene names."""
    with pytest.raises(GeneMatchError, match="min_cells_per_gene") as error:
        build_store([slices["kang.h5ad"]], tmp_path / "default")
    assert "kang.h5ad" in str(error.value)
    report = build_store([slices["kang.h5ad"]], tmp_path / "low", min_cells_per_gene=1)
    assert report.n_cells == 300
    assert report.shards[0].match_rate > 0.8


# --- interrupted builds, reruns, settings -------------------------------------------------------------------------


def test_killed_build_is_refused_then_resumed(slices, binned_store, tmp_path):
    out = tmp_path / "store"
    build(slices, out)
    shards = out / "shards"  # one shard per input part; each input here is one part
    kept_times = {k: (shards / f"{k:05d}-00000.arrow").stat().st_mtime_ns for k in (0, 2)}
    # Simulate a build killed while writing shard 1: no manifest, no shard 1, a half-written temporary file.
    (out / "manifest.json").unlink()
    (shards / "00001-00000.json").unlink()
    (shards / "00001-00000.arrow").unlink()
    (shards / ".00001-00000.arrow.tmp").write_bytes(b"half a shard")
    with pytest.raises(FileNotFoundError, match="build_store") as error:
        CorpusStore(out)
    assert "again" in str(error.value)
    report = build(slices, out)
    assert report.resumed == ["kang.h5ad", "eccite.h5ad"]
    assert report.n_cells == 700
    assert not list(out.rglob("*.tmp*"))
    assert sorted(p.name for p in shards.iterdir()) == [
        f"{k:05d}-00000.{ext}" for k in range(3) for ext in ("arrow", "json")
    ]
    assert {k: (shards / f"{k:05d}-00000.arrow").stat().st_mtime_ns for k in (0, 2)} == kept_times
    assert_same_store(out, binned_store)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["n_cells"] == 700


def test_rerun_of_a_complete_store_changes_nothing(slices, tmp_path):
    out = tmp_path / "store"
    first = build(slices, out)
    times = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = build(slices, out)
    assert again.shards == first.shards
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == times


def test_rerun_with_other_settings_needs_overwrite(slices, tmp_path):
    out = tmp_path / "store"
    build(slices, out)
    other = {"tokenizer_config": TokenizerConfig(encoding="continuous", context_length=CONTEXT)}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build(slices, out, **other)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build(slices, out, obs_keys=[])
    assert CorpusStore(out).tokenizer.config.encoding == "binned"
    build(slices, out, overwrite=True, **other)
    store = CorpusStore(out)
    assert store.tokenizer.config.encoding == "continuous"
    assert len(store) == 700


def test_directory_that_is_not_a_store_is_not_replaced(slices, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a corpus store"):
        build(slices, out)
    assert (out / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="build_store"):
        CorpusStore(out)


def test_a_given_tokenizer_is_used_as_it_is(tmp_path, real_slice):
    """Fine-tuning data must be encoded exactly as the pretrained model's data: same vocabulary, rank medians."""
    from sc_foundation.data.store import CorpusStore, build_store
    from sc_foundation.data.tokenization import GeneTokenizer, TokenizerConfig

    real_slice("kang_ifnb/kang_ifnb.h5ad", 200).write_h5ad(tmp_path / "pre.h5ad")
    real_slice("kang_ifnb/kang_ifnb.h5ad", range(5000, 5100)).write_h5ad(tmp_path / "fine.h5ad")
    config = TokenizerConfig(encoding="rank", context_length=128)
    build_store([tmp_path / "pre.h5ad"], tmp_path / "pre", tokenizer_config=config, min_cells_per_gene=1)
    pretrained = GeneTokenizer.from_pretrained(tmp_path / "pre")
    build_store([tmp_path / "fine.h5ad"], tmp_path / "fine", tokenizer=pretrained)
    fine = CorpusStore(tmp_path / "fine")
    assert fine.tokenizer == pretrained
    assert not (tmp_path / "fine" / "stats").exists(), "no statistics pass: the medians are the pretrained ones"
    with pytest.raises(ValueError, match="either tokenizer="):
        build_store([tmp_path / "fine.h5ad"], tmp_path / "x", tokenizer=pretrained, tokenizer_config=config)


# --- store format -------------------------------------------------------------------------------------------------


def reference_decode(table) -> list[list[int]]:
    """A format-3 table's gene ids, decoded one cell at a time: the plain reference for the store's batch decoder."""
    cells = []
    for deltas, exceptions in zip(
        table["gene_id_deltas"].to_pylist(), table["gene_id_exceptions"].to_pylist(), strict=True
    ):
        steps = np.asarray(deltas, dtype=np.int64)
        steps[steps == 0] = exceptions
        cells.append(np.cumsum(steps).tolist())
    return cells


def rewrite_store(source: Path, out: Path, format: int, columns) -> Path:
    """A copy of the store ``source`` at ``out`` whose shards hold ``columns(table)`` and whose manifest says
    ``format``: an older store, as an older sc_foundation wrote it."""
    import shutil

    import pyarrow as pa

    shutil.copytree(source, out)
    for shard in sorted((out / "shards").glob("*.arrow")):
        table = pa.ipc.open_stream(shard.read_bytes()).read_all()  # in memory: the file is rewritten below
        rewritten = pa.table(columns(table))
        with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, rewritten.schema) as writer:
            writer.write_table(rewritten, max_chunksize=64)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": format}))
    return out


def test_id_steps_and_formats_1_and_2_still_read(binned_store, tmp_path):
    """Format 3 keeps a binned store's ids as uint8 steps with int32 exceptions and its bins in uint8; the same cells
    written as format 2 (uint16 ids) and format 1 (int32 ids, float32 values in large lists, plain strings) read back
    the same; a store of a newer format is refused with a message."""
    import pyarrow as pa

    store = CorpusStore(binned_store)
    assert store.format == 3
    tables = [pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in store.shard_paths]
    schema = tables[0].schema
    assert "gene_ids" not in schema.names
    assert schema.field("gene_id_deltas").type == pa.list_(pa.uint8())
    assert schema.field("gene_id_exceptions").type == pa.list_(pa.int32())
    assert schema.field("values").type == pa.list_(pa.uint8())
    assert pa.types.is_dictionary(schema.field("source").type)
    # The real cells need exceptions (a first gene past id 255, gaps over 255) but few: one byte an id holds most.
    cells = [cell for table in tables for cell in reference_decode(table)]
    first_steps = np.array([cell[1] - cell[0] for cell in cells])  # after CLS
    gaps = np.concatenate([np.diff(cell[1:]) for cell in cells])
    n_exceptions = sum(len(e) for table in tables for e in table["gene_id_exceptions"].to_pylist())
    assert (first_steps > 255).any() and (gaps > 255).any()
    steps = np.concatenate([np.diff(cell, prepend=0) for cell in cells])
    assert n_exceptions == np.count_nonzero((steps < 1) | (steps > 255))
    assert n_exceptions < 0.05 * store.lengths.sum()
    assert [store[i][0].tolist() for i in range(len(store))] == cells

    def format2(table):
        names = [n for n in table.column_names if n not in ("gene_id_deltas", "gene_id_exceptions")]
        ids = pa.array(reference_decode(table), type=pa.list_(pa.uint16()))
        return {**{n: table[n] for n in names if n != "values"}, "gene_ids": ids, "values": table["values"]}

    def format1(table):
        columns = {
            n: c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c
            for n, c in zip(table.column_names, table.columns, strict=True)
        }
        columns["gene_ids"] = table["gene_ids"].cast(pa.large_list(pa.int32()))
        columns["values"] = table["values"].cast(pa.large_list(pa.float32()))
        return columns

    two = rewrite_store(binned_store, tmp_path / "format2", 2, format2)
    one = rewrite_store(two, tmp_path / "format1", 1, format1)
    for old, format in ((two, 2), (one, 1)):
        assert CorpusStore(old).format == format
        assert_same_store(old, binned_store)
        picked = np.random.default_rng(format).permutation(len(store))[:50]
        for method in ("get_batch", "get_packed"):
            for key, value in getattr(store, method)(picked).items():
                assert np.array_equal(getattr(CorpusStore(old), method)(picked)[key], value), (method, key)
        hf = CorpusStore(old).to_hf_dataset()[:]
        assert hf["gene_ids"] == store.to_hf_dataset()[:]["gene_ids"] == cells
    (one / "manifest.json").write_text(json.dumps({**json.loads((one / "manifest.json").read_text()), "format": 99}))
    with pytest.raises(ValueError, match="format 99, newer than this sc_foundation reads"):
        CorpusStore(one)


def test_steps_round_trip_any_ids():
    """delta_encode then delta_decode, over any subset of cells gathered in any order, gives the ids back: sorted
    ids with small and large gaps, unsorted and repeated ids (steps below 1), ids past uint16, empty cells."""
    from sc_foundation.data.store import delta_decode, delta_encode

    rng = np.random.default_rng(0)
    cells = [np.sort(rng.choice(300_000, rng.integers(1, 400), replace=False)) for _ in range(40)]
    cells += [rng.integers(0, 70_000, 50), np.array([7, 7, 7, 3]), np.array([], dtype=np.int64), np.array([300])]
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in cells])])
    deltas, exceptions, exception_offsets = delta_encode(np.concatenate(cells), offsets)
    assert deltas.dtype == np.uint8 and exceptions.dtype == np.int32 and len(deltas) == offsets[-1]
    assert np.count_nonzero(deltas == 0) == len(exceptions) == exception_offsets[-1]
    for picked in (rng.permutation(len(cells)), np.array([42, 0, 42, 43]), np.array([], dtype=np.int64)):
        ids = np.concatenate([deltas[offsets[i] : offsets[i + 1]] for i in picked] + [[]]).astype(np.int64)
        jumps = [exceptions[exception_offsets[i] : exception_offsets[i + 1]] for i in picked]
        lengths = np.diff(offsets)[picked]
        delta_decode(ids, np.concatenate([*jumps, np.zeros(0, np.int32)]), lengths)
        expected = np.concatenate([cells[i] for i in picked] + [[]]).astype(np.int64)
        assert np.array_equal(ids, expected)
    with pytest.raises(ValueError):  # a store whose exceptions do not match its steps
        delta_decode(deltas[:10].astype(np.int64), np.zeros(0, np.int32), np.array([10]))


def test_vocabulary_past_uint16(real_slice, tmp_path):
    """A vocabulary of over 65,536 tokens: ids past uint16, steps of tens of thousands, and CLS at the end of the
    vocabulary (a step down to the first gene) round-trip exactly through a binned store."""
    import pyarrow as pa

    kang = real_slice(KANG, 60)
    counts = sp.csr_matrix(kang.X, dtype=np.float32)
    path = write_h5ad(tmp_path / "kang.h5ad", counts, kang.var_names, obs=pd.DataFrame(index=kang.obs_names))
    genes = sorted({g for g in resolve_genes(list(kang.var_names)).canonical if g is not None})
    half = len(genes) // 2
    vocab = GeneVocab([*genes[:half], *(f"filler{i}" for i in range(70_000)), *genes[half:]])
    build_store([path], tmp_path / "store", vocab=vocab, tokenizer_config=TokenizerConfig(context_length=CONTEXT))
    store = CorpusStore(tmp_path / "store")
    tokenizer = store.tokenizer
    assert len(store.vocab) > 2**16 and store.vocab.cls_id > 2**16  # the specials come after the genes
    match = tokenizer.match_genes(list(kang.var_names))
    cells = tokenizer.encode(counts, match, cell_keys(kang.obs_names))  # the same cell ids: the same truncation
    assert len(store) == len(cells) == 60
    for i in range(len(store)):
        assert np.array_equal(store[i][0], cells.cell(i)[0])
        assert np.array_equal(store[i][1], cells.cell(i)[1])
    picked = np.arange(60)[::-1]
    expected = np.concatenate([cells.cell(i)[0] for i in picked])
    assert expected.max() > 2**16
    batch = store.get_batch(picked)
    assert np.array_equal(batch["input_ids"][batch["attention_mask"]], expected)
    assert np.array_equal(store.get_packed(picked)["input_ids"][0], expected)
    tables = [pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in store.shard_paths]
    exceptions = np.concatenate([t["gene_id_exceptions"].combine_chunks().flatten().to_numpy() for t in tables])
    assert exceptions.max() > 2**16 and exceptions.min() < -(2**16)


def test_rank_store_keeps_no_values_and_a_negative_cls_value_fits_int8(slices, tmp_path):
    from sc_foundation.data.store import token_types

    rank = build(slices, tmp_path / "rank", encoding="rank")
    assert rank.n_cells == 700
    store = CorpusStore(tmp_path / "rank")
    batch = store.get_batch([0, 5])
    assert batch["values"].dtype == np.float32 and not batch["values"].any()
    scgpt = GeneTokenizer(store.vocab, TokenizerConfig(cls_value=-2.0))
    assert [str(t) for t in token_types(scgpt)] == ["uint16", "int8"]
    assert [str(t) for t in token_types(store.tokenizer)] == ["uint16", "None"]


def test_relative_truncation_store_keeps_the_corpus_medians_and_reads_cells_by_them(slices, tmp_path):
    config = TokenizerConfig(encoding="continuous", context_length=CONTEXT, truncation="relative")
    build(slices, tmp_path / "relative", tokenizer_config=config)
    store = CorpusStore(tmp_path / "relative")
    medians = store.tokenizer.gene_medians
    assert medians is not None and np.isfinite(np.delete(medians, store.vocab.special_ids)).all()
    # The saved tokenizer reproduces the stored cells of a file, cell for cell.
    adata = anndata.read_h5ad(slices["kang.h5ad"])
    match = store.tokenizer.match_genes(adata.var_names.tolist())
    cells = store.tokenizer.encode(sp.csr_matrix(adata.X, dtype=np.float32), match, cell_keys(adata.obs_names))
    assert (cells.lengths[:5] == CONTEXT).sum() >= 3  # most of these cells are cut: the choice matters
    stored = store.get_batch(list(range(5)))
    for i in range(5):
        ids = stored["input_ids"][i][stored["attention_mask"][i]]
        np.testing.assert_array_equal(ids, cells.cell(i)[0])
