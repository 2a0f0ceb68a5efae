"""Tests for sc_foundation.data.tokenization and sc_foundation.data.gene_statistics, on small real slices and synthetic
data.

Expected values are computed independently here with numpy from the raw counts: gene ids through ``resolve_genes`` and
the vocabulary, library sizes over all input columns, and the documented formula of each encoding.
"""

import dataclasses

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sc_foundation.data.gene_statistics import N_HIST_BINS, GeneStatistics
from sc_foundation.data.genes import GeneVocab, resolve_genes
from sc_foundation.data.tokenization import (
    GeneMatchError,
    GeneTokenizer,
    TokenizedCells,
    TokenizerConfig,
    aggregate_columns,
    cell_keys,
    hash_uniform,
    normalise_counts,
)

TP53 = "ENSG00000141510"
KANG = "kang_ifnb/kang_ifnb.h5ad"
DATASETS = {
    # name: (file, gene_key, species detection should give)
    "kang": (KANG, None, "human"),
    "pbmc3k_gene_ids": ("pbmc3k/pbmc3k.h5ad", "gene_ids", "human"),
    "cellbench": ("cellbench_3cl/cellbench_3cl.h5ad", None, "human"),
    "eccite_hg19": ("eccite_pbmc/eccite_rna.h5ad", None, "human"),
    "merfish_feature_name": ("merfish_mouse_brain/mouse_val.h5ad", "feature_name", "mouse"),
}
N_CELLS = 80


# --- helpers ------------------------------------------------------------------------------------------------------


def gene_names(adata: anndata.AnnData, gene_key: str | None = None) -> list[str]:
    return [str(g) for g in (adata.var_names if gene_key is None else adata.var[gene_key])]


def vocab_of(names, species: str = "auto") -> GeneVocab:
    canonical = resolve_genes(names, species=species).canonical
    return GeneVocab.from_genes(sorted({c for c in canonical if c is not None}))


def token_counts(adata: anndata.AnnData, vocab: GeneVocab, gene_key=None, species="auto") -> np.ndarray:
    """(n_cells, len(vocab)) float64 raw counts summed per vocabulary id, computed independently of the tokenizer."""
    ids = vocab.lookup(resolve_genes(gene_names(adata, gene_key), species=species).canonical)
    dense = np.asarray(sp.csr_matrix(adata.X).toarray(), dtype=np.float64)
    out = np.zeros((adata.n_obs, len(vocab)))
    for column in np.flatnonzero(ids >= 0):
        out[:, ids[column]] += dense[:, column]
    return out


def library_sizes(adata: anndata.AnnData) -> np.ndarray:
    return np.asarray(sp.csr_matrix(adata.X, dtype=np.float64).sum(axis=1)).ravel()


def encode(tokenizer: GeneTokenizer, adata: anndata.AnnData, gene_key=None, species="auto", **match_kw):
    match = tokenizer.match_genes(gene_names(adata, gene_key), species=species, **match_kw)
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    return match, tokenizer.encode(counts, match, cell_keys(adata.obs_names))


def cells_by_row(cells: TokenizedCells) -> dict[int, tuple[list[int], list[float]]]:
    return {
        int(r): (ids.tolist(), vals.tolist())
        for r, (ids, vals) in zip(cells.rows, map(cells.cell, range(len(cells))), strict=True)
    }


def expected_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Documented binning: 1 + floor(r (n_bins - 1) / m), r = number of the cell's m values strictly below."""
    below = (values[None, :] < values[:, None]).sum(axis=1)
    return 1 + below * (n_bins - 1) // len(values)


@pytest.fixture(scope="module")
def kang(real_slice) -> anndata.AnnData:
    return real_slice(KANG, 100)


@pytest.fixture(scope="module")
def kang_vocab(kang) -> GeneVocab:
    return vocab_of(gene_names(kang))


def random_medians(vocab: GeneVocab, seed: int = 0) -> np.ndarray:
    medians = np.random.default_rng(seed).uniform(0.5, 50.0, len(vocab)).astype(np.float32)
    medians[vocab.special_ids] = np.nan
    return medians


# --- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"encoding": "tfidf"}, "encoding"),
        ({"truncation": "middle"}, "truncation"),
        ({"duplicates": "first"}, "duplicates"),
        ({"n_bins": 2}, "n_bins"),
        ({"context_length": 1}, "context_length"),
        ({"min_match_rate": 1.5}, "min_match_rate"),
    ],
)
def test_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        TokenizerConfig(**settings)


def test_rank_needs_medians_of_the_vocab_size(kang_vocab):
    with pytest.raises(ValueError, match="gene_medians"):
        GeneTokenizer(kang_vocab, TokenizerConfig(encoding="rank"))
    with pytest.raises(ValueError, match="shape"):
        GeneTokenizer(kang_vocab, TokenizerConfig(encoding="rank"), np.ones(len(kang_vocab) - 1))


# --- the three encodings on real slices ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(DATASETS))
def real_case(request, real_slice):
    relative, gene_key, species = DATASETS[request.param]
    adata = real_slice(relative, N_CELLS)
    vocab = vocab_of(gene_names(adata, gene_key))
    return request.param, adata, gene_key, species, vocab, token_counts(adata, vocab, gene_key)


def test_real_slice_dtypes_and_species(real_case):
    name, adata, gene_key, species, vocab, _ = real_case
    match = GeneTokenizer(vocab, TokenizerConfig()).match_genes(gene_names(adata, gene_key))
    assert match.resolution.species == species
    assert match.n_matched > 0.7 * match.n_input
    if name == "eccite_hg19":
        assert adata.X.dtype == np.float32
        assert match.resolution.counts["prefixed"] == adata.n_vars
    if name == "pbmc3k_gene_ids":
        assert match.resolution.counts["ensembl"] == adata.n_vars


def test_continuous_is_log1p_of_counts_per_10k(real_case):
    _, adata, gene_key, _, vocab, expected_counts = real_case
    tokenizer = GeneTokenizer(vocab, TokenizerConfig(encoding="continuous", context_length=30_000))
    _, cells = encode(tokenizer, adata, gene_key)
    totals = library_sizes(adata)
    assert len(cells) == adata.n_obs
    np.testing.assert_allclose(cells.n_counts, totals, rtol=1e-6)
    for i, row in enumerate(cells.rows):
        ids, values = cells.cell(i)
        assert ids[0] == vocab.cls_id and values[0] == 0
        expressed = np.flatnonzero(expected_counts[row])
        assert ids[1:].tolist() == expressed.tolist()
        assert cells.n_expressed[i] == len(expressed)
        expected = np.log1p(expected_counts[row, expressed] / totals[row] * 1e4)
        np.testing.assert_allclose(values[1:], expected, rtol=1e-5)


def test_binned_values_follow_the_documented_bins(real_case):
    _, adata, gene_key, _, vocab, expected_counts = real_case
    n_bins = 21
    tokenizer = GeneTokenizer(vocab, TokenizerConfig(encoding="binned", n_bins=n_bins, context_length=30_000))
    _, cells = encode(tokenizer, adata, gene_key)
    _, again = encode(tokenizer, adata, gene_key)
    assert np.array_equal(cells.gene_ids, again.gene_ids) and np.array_equal(cells.values, again.values)
    for i, row in enumerate(cells.rows):
        ids, values = cells.cell(i)
        assert ids[0] == vocab.cls_id and values[0] == 0
        counts = expected_counts[row, ids[1:]]
        bins = values[1:]
        assert np.array_equal(bins, np.round(bins))
        assert bins.min() >= 1 and bins.max() <= n_bins - 1
        # Monotone in expression, equal expression -> equal bin.
        order = np.argsort(counts, kind="stable")
        assert np.all(np.diff(bins[order]) >= 0)
        for value in np.unique(counts):
            assert len(np.unique(bins[counts == value])) == 1
        np.testing.assert_array_equal(bins, expected_bins(counts, n_bins))


def test_rank_orders_by_normalised_count_over_median(real_case):
    _, adata, gene_key, _, vocab, expected_counts = real_case
    medians = random_medians(vocab)
    context = 64
    tokenizer = GeneTokenizer(vocab, TokenizerConfig(encoding="rank", context_length=context), medians)
    _, cells = encode(tokenizer, adata, gene_key)
    totals = library_sizes(adata)
    for i, row in enumerate(cells.rows):
        ids, values = cells.cell(i)
        assert ids[0] == vocab.cls_id and values[0] == 0
        expressed = np.flatnonzero(expected_counts[row])
        score = expected_counts[row, expressed] / totals[row] * 1e4 / medians[expressed]
        assert len(ids) == min(len(expressed), context - 1) + 1
        # Values are the scores, in descending order.
        np.testing.assert_allclose(
            values[1:], expected_counts[row, ids[1:]] / totals[row] * 1e4 / medians[ids[1:]], rtol=1e-5
        )
        assert np.all(np.diff(values[1:]) <= 0)
        # The kept genes are the top of the ranking.
        kept = np.isin(expressed, ids[1:])
        if not kept.all():
            assert score[kept].min() >= score[~kept].max() * (1 - 1e-5)
        expected_order = expressed[np.lexsort((expressed, -score))][: context - 1]
        agree = np.mean(ids[1:] == expected_order)
        assert agree > 0.95


def test_rank_skips_genes_without_a_median(kang, kang_vocab):
    medians = random_medians(kang_vocab)
    without = kang_vocab.lookup([TP53, "ENSG00000111640"])  # TP53, GAPDH
    medians[without] = np.nan
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig(encoding="rank", context_length=4096), medians)
    match, cells = encode(tokenizer, kang)
    assert not np.isin(without, match.token_ids).any()
    assert not np.isin(without, cells.gene_ids).any()
    expected_counts = token_counts(kang, kang_vocab)
    assert expected_counts[:, without[1]].sum() > 0  # GAPDH is expressed, so dropping it is a real effect


# --- duplicates ---------------------------------------------------------------------------------------------------


def with_tp53_copy(kang: anndata.AnnData) -> tuple[anndata.AnnData, np.ndarray]:
    """Kang plus a column ``ENSG00000141510.3`` that resolves to the same gene as the existing ``TP53`` column."""
    extra = np.random.default_rng(1).poisson(2.0, (kang.n_obs, 1)).astype(np.float32)
    extra[::4] = 0
    X = sp.hstack([sp.csr_matrix(kang.X, dtype=np.float32), sp.csr_matrix(extra)], format="csr")
    var = pd.DataFrame(index=[*kang.var_names, "ENSG00000141510.3"])
    return anndata.AnnData(X=X, obs=kang.obs.copy(), var=var), extra.ravel()


def test_duplicate_genes_are_summed(kang, kang_vocab):
    assert "TP53" in kang.var_names
    adata, extra = with_tp53_copy(kang)
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig(encoding="continuous", context_length=30_000))
    match, cells = encode(tokenizer, adata)
    assert match.n_duplicated == 1
    assert match.n_matched == len(match.token_ids) + 1
    tp53_id = kang_vocab[TP53]
    tp53 = np.asarray(kang[:, "TP53"].X.todense()).ravel() + extra
    totals = library_sizes(adata)
    assert np.all(totals == library_sizes(kang) + extra)
    seen = 0
    for i, row in enumerate(cells.rows):
        ids, values = cells.cell(i)
        hit = np.flatnonzero(ids == tp53_id)
        if tp53[row] == 0:
            assert len(hit) == 0
            continue
        assert len(hit) == 1
        np.testing.assert_allclose(values[hit[0]], np.log1p(tp53[row] / totals[row] * 1e4), rtol=1e-5)
        seen += 1
    assert seen > 10


def test_duplicate_genes_are_refused_by_setting(kang, kang_vocab):
    adata, _ = with_tp53_copy(kang)
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig(duplicates="error"))
    with pytest.raises(GeneMatchError, match="duplicates") as error:
        tokenizer.match_genes(gene_names(adata), source="kang+copy")
    message = str(error.value)
    assert "kang+copy" in message
    assert "'TP53'" in message and "'ENSG00000141510.3'" in message
    # Without the copy there is nothing to refuse.
    assert tokenizer.match_genes(gene_names(kang)).n_duplicated == 0


# --- context, truncation, CLS, zeros ------------------------------------------------------------------------------


def test_top_truncation_keeps_the_highest_values(kang, kang_vocab):
    full = GeneTokenizer(kang_vocab, TokenizerConfig(encoding="continuous", context_length=30_000))
    top = GeneTokenizer(kang_vocab, TokenizerConfig(encoding="continuous", context_length=64, truncation="top"))
    _, all_cells = encode(full, kang)
    _, cut = encode(top, kang)
    assert np.all(cut.lengths == np.minimum(all_cells.lengths, 64))
    assert (all_cells.lengths > 64).sum() > 50
    for i in range(len(cut)):
        ids, values = cut.cell(i)
        full_ids, full_values = all_cells.cell(i)
        kept = np.isin(full_ids[1:], ids[1:])
        assert kept.sum() == len(ids) - 1
        assert np.all(np.diff(ids[1:]) > 0)  # genes stay in vocabulary order
        if not kept.all():
            assert values[1:].min() >= full_values[1:][~kept].max()
        # Values are those of the untruncated cell.
        np.testing.assert_array_equal(values[1:], full_values[1:][kept])


def test_relative_truncation_keeps_the_genes_highest_against_their_median(kang, kang_vocab):
    medians = random_medians(kang_vocab)
    full = GeneTokenizer(kang_vocab, TokenizerConfig(encoding="continuous", context_length=30_000))
    config = TokenizerConfig(encoding="continuous", context_length=64, truncation="relative")
    relative = GeneTokenizer(kang_vocab, config, medians)
    top = GeneTokenizer(kang_vocab, dataclasses.replace(config, truncation="top"))
    _, all_cells = encode(full, kang)
    _, cut = encode(relative, kang)
    _, by_value = encode(top, kang)
    assert np.all(cut.lengths == np.minimum(all_cells.lengths, 64))
    truncated = np.flatnonzero(all_cells.lengths > 64)
    assert len(truncated) > 50
    differs_from_top = 0
    for i in range(len(cut)):
        ids, values = cut.cell(i)
        full_ids, full_values = all_cells.cell(i)
        kept = np.isin(full_ids[1:], ids[1:])
        # Values stay the encoding's (log1p of counts per 10k), genes in vocabulary order.
        np.testing.assert_array_equal(values[1:], full_values[1:][kept])
        assert np.all(np.diff(ids[1:]) > 0)
        if not kept.all():
            # The order by value / median is the order by log1p(value) - log(median): monotone in the value.
            score = np.expm1(full_values[1:].astype(np.float64)) / medians[full_ids[1:]]
            assert score[kept].min() >= score[~kept].max() * (1 - 1e-5)
        differs_from_top += not np.array_equal(ids, by_value.cell(i)[0])
    assert differs_from_top >= len(truncated) // 2  # a different choice from the highest values, not a relabelling


def test_relative_truncation_needs_medians_and_gives_genes_without_one_the_typical_median(kang, kang_vocab):
    config = TokenizerConfig(encoding="continuous", context_length=64, truncation="relative")
    with pytest.raises(ValueError, match="truncation='relative' needs gene_medians"):
        GeneTokenizer(kang_vocab, config)
    medians = random_medians(kang_vocab)
    gapdh = kang_vocab["ENSG00000111640"]
    medians[gapdh] = np.nan
    with_nan = GeneTokenizer(kang_vocab, config, medians)
    typical = medians.copy()
    typical[gapdh] = np.median(medians[np.isfinite(medians) & (medians > 0)])
    _, a = encode(with_nan, kang)
    _, b = encode(GeneTokenizer(kang_vocab, config, typical), kang)
    assert np.array_equal(a.gene_ids, b.gene_ids) and np.array_equal(a.offsets, b.offsets)
    assert np.isin(gapdh, a.gene_ids)  # still read: an unknown median neither hides the gene nor favours it


@pytest.mark.parametrize("encoding", ["binned", "continuous"])
def test_random_truncation_is_seeded_subset(kang, kang_vocab, encoding):
    def run(seed, context=64):
        config = TokenizerConfig(encoding=encoding, context_length=context, truncation="random", seed=seed)
        return encode(GeneTokenizer(kang_vocab, config), kang)[1]

    full, a, b, other = run(0, 30_000), run(0), run(0), run(1)
    assert np.array_equal(a.gene_ids, b.gene_ids) and np.array_equal(a.values, b.values)
    assert np.all(a.lengths == np.minimum(full.lengths, 64))
    differing = 0
    not_top = 0
    for i in range(len(a)):
        ids, values = a.cell(i)
        full_ids, full_values = full.cell(i)
        kept = np.isin(full_ids, ids)
        assert kept[0]  # CLS
        np.testing.assert_array_equal(full_values[kept], values)
        differing += not np.array_equal(ids, other.cell(i)[0])
        if full.lengths[i] > 64:
            not_top += not np.array_equal(ids[1:], full_ids[1:64])
    truncated = int((full.lengths > 64).sum())
    assert differing >= truncated - 1
    assert not_top == truncated  # a random subset, not the first genes in vocabulary order


@pytest.mark.parametrize("truncation", ["random", "top", "relative"])
def test_cell_tokens_do_not_depend_on_chunking_or_neighbours(kang, kang_vocab, truncation):
    config = TokenizerConfig(context_length=48, truncation=truncation, seed=7)
    tokenizer = GeneTokenizer(kang_vocab, config, random_medians(kang_vocab) if config.needs_medians else None)
    match = tokenizer.match_genes(gene_names(kang))
    counts = sp.csr_matrix(kang.X, dtype=np.float32)
    keys = cell_keys(kang.obs_names)
    whole = cells_by_row(tokenizer.encode(counts, match, keys))
    # In chunks of 7.
    parts = [tokenizer.encode(counts[lo : lo + 7], match, keys[lo : lo + 7]) for lo in range(0, kang.n_obs, 7)]
    chunked = cells_by_row(TokenizedCells.concatenate(parts, row_starts=range(0, kang.n_obs, 7)))
    assert chunked == whole
    # Reversed order.
    reverse = np.arange(kang.n_obs)[::-1]
    reversed_cells = tokenizer.encode(counts[reverse], match, keys[reverse])
    assert {int(reverse[r]): v for r, v in cells_by_row(reversed_cells).items()} == whole
    # One cell at a time.
    for row in (0, 13, 99):
        alone = cells_by_row(tokenizer.encode(counts[row : row + 1], match, keys[row : row + 1]))
        assert alone == {0: whole[row]}


def test_random_subset_depends_on_cell_id(kang, kang_vocab):
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig(context_length=48))
    match = tokenizer.match_genes(gene_names(kang))
    counts = sp.csr_matrix(kang.X[:1], dtype=np.float32)
    one = tokenizer.encode(counts, match, cell_keys(["cell-a"]))
    two = tokenizer.encode(counts, match, cell_keys(["cell-b"]))
    assert not np.array_equal(one.gene_ids, two.gene_ids)


def small_panel(kang: anndata.AnnData, n_genes: int = 300) -> GeneVocab:
    """A vocabulary of the first resolvable kang genes: a panel where most genes are zero in most cells."""
    canonical = [c for c in resolve_genes(gene_names(kang)).canonical if c is not None]
    return GeneVocab.from_genes(sorted(set(canonical[:n_genes])))


@pytest.mark.parametrize("encoding", ["binned", "continuous"])
def test_include_zeros_offers_every_panel_gene(kang, encoding):
    panel = small_panel(kang)
    base = {"encoding": encoding, "min_match_rate": 0.0}
    with_zeros = GeneTokenizer(panel, TokenizerConfig(**base, include_zeros=True, context_length=1000))
    without = GeneTokenizer(panel, TokenizerConfig(**base, context_length=1000))
    match, dense = encode(with_zeros, kang)
    _, sparse = encode(without, kang)
    n_panel = len(match.token_ids)
    assert n_panel > 250
    assert np.array_equal(dense.rows, sparse.rows)
    for i in range(len(dense)):
        ids, values = dense.cell(i)
        assert ids[0] == panel.cls_id
        assert ids[1:].tolist() == match.token_ids.tolist()
        sparse_ids, sparse_values = sparse.cell(i)
        nonzero = values[1:] > 0
        assert ids[1:][nonzero].tolist() == sparse_ids[1:].tolist()
        np.testing.assert_array_equal(values[1:][nonzero], sparse_values[1:])
        assert (~nonzero).sum() == n_panel - dense.n_expressed[i] > 0


def test_gene_panel_reads_every_cell_through_the_panel(tmp_path, kang, kang_vocab):
    """A gene panel keeps only its genes as tokens (every one, zeros included), while the library size and the
    values stay those of the whole vocabulary; it survives save/load; a gene outside the vocabulary is refused."""
    base = TokenizerConfig(encoding="continuous", context_length=30_000, min_match_rate=0.0)
    match, full = encode(GeneTokenizer(kang_vocab, base), kang)
    panel_ids = match.token_ids[::7][:40]  # 40 genes, some of them unexpressed in most cells
    genes = tuple(kang_vocab.tokens[i] for i in panel_ids)
    config = dataclasses.replace(base, gene_panel=genes, include_zeros=True, context_length=41)
    tokenizer = GeneTokenizer(kang_vocab, config)
    _, cells = encode(tokenizer, kang)
    assert np.array_equal(cells.rows, full.rows) and np.all(cells.lengths == 41)
    np.testing.assert_array_equal(cells.n_counts, full.n_counts)  # the whole library, not the panel's
    for i in range(len(cells)):
        ids, values = cells.cell(i)
        assert sorted(ids[1:].tolist()) == sorted(panel_ids.tolist())
        full_ids, full_values = full.cell(i)
        expressed = dict(zip(full_ids[1:].tolist(), full_values[1:].tolist(), strict=True))
        np.testing.assert_allclose(values[1:], [expressed.get(g, 0.0) for g in ids[1:].tolist()], rtol=1e-6)
    assert sum((cells.cell(i)[1][1:] == 0).sum() for i in range(len(cells))) > 0
    tokenizer.save(tmp_path)
    assert GeneTokenizer.from_pretrained(tmp_path) == tokenizer
    assert "a panel of 40 genes, zeros included" in repr(tokenizer)
    with pytest.raises(ValueError, match="NOT_A_GENE"):
        encode(GeneTokenizer(kang_vocab, dataclasses.replace(config, gene_panel=(*genes, "NOT_A_GENE"))), kang)


def test_panel_library_size_ignores_the_genes_a_file_adds(tmp_path, kang, kang_vocab):
    """With library_size="panel" a cell's values are log1p of its panel counts per 10k of its panel total, so the
    same cells read from a file that measures only the panel genes get the same values; with "input" they do not
    (the whole file's total is the library)."""
    panel_ids = encode(GeneTokenizer(kang_vocab, TokenizerConfig(min_match_rate=0.0)), kang)[0].token_ids[::5][:60]
    genes = tuple(kang_vocab.tokens[i] for i in panel_ids)
    # The same cells from a file that measures only the panel's genes.
    narrow = kang[:, np.isin(resolve_genes(gene_names(kang)).canonical.astype(str), genes)].copy()
    values, libraries = {}, {}
    for library in ("input", "panel"):
        config = TokenizerConfig(
            encoding="continuous", gene_panel=genes, context_length=61, min_match_rate=0.0, library_size=library
        )
        tokenizer = GeneTokenizer(kang_vocab, config)
        wide_cells, narrow_cells = encode(tokenizer, kang)[1], encode(tokenizer, narrow)[1]
        assert np.array_equal(wide_cells.rows, narrow_cells.rows)
        values[library] = (wide_cells.values, narrow_cells.values)
        libraries[library] = wide_cells
    wide, narrow_values = values["panel"]
    np.testing.assert_allclose(wide, narrow_values, rtol=1e-5)
    panel_counts = token_counts(kang, kang_vocab)[:, panel_ids]
    rows = panel_counts.sum(axis=1) > 0
    expected = np.log1p(panel_counts[rows] / panel_counts[rows].sum(axis=1, keepdims=True) * 1e4)
    ids, cell_values = encode(GeneTokenizer(kang_vocab, config), kang)[1].cell(0)  # config: the "panel" one
    order = {g: k for k, g in enumerate(panel_ids.tolist())}
    np.testing.assert_allclose(cell_values[1:], expected[0, [order[g] for g in ids[1:].tolist()]], rtol=1e-5)
    # n_counts is the library each cell was divided by: the panel's total here, the whole file's with "input".
    np.testing.assert_allclose(libraries["panel"].n_counts, panel_counts[rows].sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(libraries["input"].n_counts, library_sizes(kang)[libraries["input"].rows], rtol=1e-6)
    assert not np.allclose(*values["input"], rtol=1e-2)  # the input library shifts the narrow file's values
    tokenizer = GeneTokenizer(kang_vocab, config)
    assert "library size over the panel" in repr(tokenizer)
    tokenizer.save(tmp_path)  # the export keeps it: inference reads new cells on the same scale
    assert GeneTokenizer.from_pretrained(tmp_path).config.library_size == "panel"


@pytest.mark.parametrize("truncation", ["random", "top"])
def test_include_zeros_respects_context_length(kang, truncation):
    panel = small_panel(kang)
    config = TokenizerConfig(include_zeros=True, context_length=50, truncation=truncation, min_match_rate=0.0)
    _, cells = encode(GeneTokenizer(panel, config), kang)
    assert np.all(cells.lengths == 50)
    zeros = [int((cells.cell(i)[1][1:] == 0).sum()) for i in range(len(cells))]
    if truncation == "top":
        # Expressed genes first: zeros only fill what is left.
        assert zeros == [max(0, 49 - int(n)) for n in cells.n_expressed]
    else:
        assert sum(zeros) > 0


def test_add_cls_false_and_true(kang, kang_vocab):
    off = GeneTokenizer(kang_vocab, TokenizerConfig(add_cls=False, context_length=30_000))
    on = GeneTokenizer(kang_vocab, TokenizerConfig(add_cls=True, context_length=30_000))
    _, a = encode(off, kang)
    _, b = encode(on, kang)
    assert not np.isin(kang_vocab.cls_id, a.gene_ids)
    assert np.all(a.lengths == a.n_expressed)
    assert np.all(b.lengths == b.n_expressed + 1)
    assert np.all(b.gene_ids[b.offsets[:-1]] == kang_vocab.cls_id)
    assert np.all(b.values[b.offsets[:-1]] == 0)
    assert (b.gene_ids == kang_vocab.cls_id).sum() == len(b)
    capped = GeneTokenizer(kang_vocab, TokenizerConfig(add_cls=False, context_length=32))
    assert np.all(encode(capped, kang)[1].lengths == np.minimum(a.lengths, 32))


def test_empty_cells_are_dropped_and_counted(kang, kang_vocab):
    X = sp.lil_matrix(sp.csr_matrix(kang.X, dtype=np.float32))
    X[[3, 10, 20], :] = 0
    X = sp.hstack([X.tocsr(), sp.csr_matrix(([5.0], ([20], [0])), shape=(kang.n_obs, 1))], format="csr")
    adata = anndata.AnnData(X=X, obs=kang.obs.copy(), var=pd.DataFrame(index=[*kang.var_names, "NOT_A_GENE_XYZ"]))
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig())
    _, cells = encode(tokenizer, adata)
    # Row 20 has counts, but only in a gene outside the vocabulary: it is empty too.
    assert sorted(set(range(kang.n_obs)) - set(cells.rows.tolist())) == [3, 10, 20]
    assert len(cells) == kang.n_obs - 3
    assert len(cells.offsets) == len(cells) + 1
    np.testing.assert_allclose(cells.n_counts, library_sizes(adata)[cells.rows])
    assert np.all(cells.n_expressed > 0)


# --- matching -----------------------------------------------------------------------------------------------------


def test_match_rate_below_minimum_lists_unmatched(kang, kang_vocab):
    names = np.asarray(gene_names(kang), dtype=object)
    detection = np.asarray((sp.csr_matrix(kang.X) > 0).sum(axis=0)).ravel()
    detected = np.flatnonzero(detection > 0)
    renamed = detected[np.random.default_rng(0).permutation(len(detected))[: int(0.7 * len(detected))]]
    names[renamed] = [f"RANDOMGENE{i}" for i in range(len(renamed))]
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig())
    with pytest.raises(GeneMatchError, match="min_match_rate") as error:
        tokenizer.match_genes(list(names), source="renamed.h5ad", cells_per_gene=detection)
    message = str(error.value)
    assert "renamed.h5ad" in message
    assert "RANDOMGENE" in message
    # The most detected unmatched gene (renamed or not resolvable in the first place) is named first.
    unmatched = kang_vocab.lookup(resolve_genes(list(names)).canonical) < 0
    top = names[np.argmax(np.where(unmatched, detection, -1))]
    assert message.split("Unmatched examples: ")[1].startswith(f"['{top}'")
    # Lowering the bar lets it through, with the rate counted over detected genes only.
    low = GeneTokenizer(kang_vocab, TokenizerConfig(min_match_rate=0.1))
    match = low.match_genes(list(names), cells_per_gene=detection)
    assert match.n_detected == len(detected)
    assert match.n_detected_matched <= len(detected) - len(renamed)
    assert match.match_rate < 0.31
    assert match.unmatched_examples[0] == top


def test_no_overlap_raises_even_without_a_minimum(kang_vocab, real_slice):
    merfish = real_slice("merfish_mouse_brain/mouse_val.h5ad", 20)
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig(min_match_rate=0.0))
    with pytest.raises(GeneMatchError, match="ENSMUSG"):
        tokenizer.match_genes(gene_names(merfish, "ensembl_id"))
    with pytest.raises(GeneMatchError, match="FAKE_GENE"):
        tokenizer.match_genes([f"FAKE_GENE_{i}" for i in range(50)])


def test_mouse_file_matches_a_human_vocabulary_through_orthologs(kang_vocab, real_slice):
    merfish = real_slice("merfish_mouse_brain/mouse_val.h5ad", 20)
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig(min_match_rate=0.3))
    match = tokenizer.match_genes(gene_names(merfish, "feature_name"))
    assert match.resolution.species == "mouse"
    assert match.resolution.counts["ortholog"] > 0.9 * merfish.n_vars
    # A brain panel overlaps the genes of a PBMC file only partly.
    assert match.n_matched > 300


# --- save / load --------------------------------------------------------------------------------------------------


def test_save_and_from_pretrained_round_trip(tmp_path, kang_vocab):
    medians = random_medians(kang_vocab)
    medians[kang_vocab[TP53]] = np.nan
    config = TokenizerConfig(encoding="rank", context_length=300, seed=5, min_match_rate=0.2, target_sum=5000.0)
    tokenizer = GeneTokenizer(kang_vocab, config, medians)
    tokenizer.save(tmp_path)
    loaded = GeneTokenizer.from_pretrained(tmp_path)
    assert loaded == tokenizer
    assert loaded.config == config
    assert np.array_equal(loaded.gene_medians, medians, equal_nan=True)
    assert np.isnan(loaded.gene_medians[kang_vocab[TP53]])
    assert loaded.vocab.tokens == kang_vocab.tokens
    # Equality is not vacuous.
    assert loaded != GeneTokenizer(kang_vocab, config, random_medians(kang_vocab, seed=1))
    assert loaded != GeneTokenizer(kang_vocab, TokenizerConfig(encoding="rank", context_length=300), medians)


def test_save_and_from_pretrained_without_medians(tmp_path, kang, kang_vocab):
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig(encoding="binned", n_bins=11, truncation="top"))
    tokenizer.save(tmp_path)
    loaded = GeneTokenizer.from_pretrained(tmp_path)
    assert loaded == tokenizer and loaded.gene_medians is None
    a, b = encode(tokenizer, kang)[1], encode(loaded, kang)[1]
    assert np.array_equal(a.gene_ids, b.gene_ids) and np.array_equal(a.values, b.values)
    with pytest.raises(FileNotFoundError, match="gene_tokenizer"):
        GeneTokenizer.from_pretrained(tmp_path / "nowhere")


# --- building blocks ----------------------------------------------------------------------------------------------


def test_aggregate_columns_selects_and_sums():
    codes = np.array([7, -1, 2, 7, 5, -1])
    unique, aggregate = aggregate_columns(codes)
    assert unique.tolist() == [2, 5, 7]
    assert aggregate.shape == (6, 3)
    counts = sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(2, 6))
    merged = (counts @ aggregate).toarray()
    np.testing.assert_array_equal(merged, [[2, 4, 0 + 3], [8, 10, 6 + 9]])


def test_normalise_counts_uses_the_whole_library():
    counts = sp.csr_matrix(np.array([[1, 3, 0, 6], [0, 0, 0, 0], [2, 0, 2, 0]], dtype=np.float32))
    _, aggregate = aggregate_columns(np.array([0, 1, -1, 2]))
    norm, totals = normalise_counts(counts, aggregate, 100.0)
    np.testing.assert_array_equal(totals, [10, 0, 4])
    np.testing.assert_allclose(norm.toarray(), [[10, 30, 60], [0, 0, 0], [50, 0, 0]], rtol=1e-6)
    assert norm.nnz == 4 and np.all(norm.data > 0)


def test_cell_keys_and_hash_uniform():
    ids = [f"cell{i}" for i in range(20_000)]
    keys = cell_keys(ids)
    assert keys.dtype == np.uint64
    assert len(np.unique(keys)) == len(ids)
    assert np.array_equal(keys, cell_keys(list(ids)))
    assert cell_keys(["AAAC-1"])[0] == cell_keys(np.array(["AAAC-1"]))[0]
    u = hash_uniform(np.uint64(0), keys, np.uint64(3))
    assert u.shape == (20_000,) and np.all((u >= 0) & (u < 1))
    assert abs(u.mean() - 0.5) < 0.01
    assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 1800
    assert np.array_equal(u, hash_uniform(np.uint64(0), keys, np.uint64(3)))
    assert not np.array_equal(u, hash_uniform(np.uint64(1), keys, np.uint64(3)))
    assert not np.array_equal(u, hash_uniform(np.uint64(0), keys, np.uint64(4)))


# --- gene statistics ----------------------------------------------------------------------------------------------


def lognormal_corpus(n_cells=4000, n_genes=40, seed=0):
    """(cells x genes) CSR of normalised values with lognormal non-zero entries, and the genes' names."""
    rng = np.random.default_rng(seed)
    log_medians = rng.uniform(np.log(0.05), np.log(2000.0), n_genes)
    sigma = rng.uniform(0.3, 1.2, n_genes)
    values = np.exp(rng.normal(log_medians, sigma, (n_cells, n_genes)))
    detected = rng.random((n_cells, n_genes)) < rng.uniform(0.1, 0.9, n_genes)
    matrix = sp.csr_matrix(np.where(detected, values, 0.0).astype(np.float32))
    return matrix, [f"G{j:03d}" for j in range(n_genes)]


def exact_medians(matrix: sp.csr_matrix) -> np.ndarray:
    csc = sp.csc_matrix(matrix)
    return np.array(
        [
            np.median(csc.data[csc.indptr[j] : csc.indptr[j + 1]]) if csc.indptr[j + 1] > csc.indptr[j] else np.nan
            for j in range(csc.shape[1])
        ]
    )


def stats_of(matrix, genes, chunk=500) -> GeneStatistics:
    stats = GeneStatistics.empty(genes)
    for lo in range(0, matrix.shape[0], chunk):
        stats.update(matrix[lo : lo + chunk])
    return stats


def test_medians_of_lognormal_data_within_5_percent():
    matrix, genes = lognormal_corpus()
    stats = stats_of(matrix, genes)
    assert stats.cells_seen == matrix.shape[0]
    np.testing.assert_array_equal(stats.n_cells, np.diff(sp.csc_matrix(matrix).indptr))
    assert np.array_equal(stats.histogram.sum(axis=1), stats.n_cells)
    np.testing.assert_allclose(stats.medians(), exact_medians(matrix), rtol=0.05)
    assert stats.cells_per_gene() == dict(zip(genes, stats.n_cells.tolist(), strict=True))


def test_medians_of_real_normalised_counts(real_slice):
    kang = real_slice(KANG, 1000)
    counts = sp.csr_matrix(kang.X, dtype=np.float32)
    _, aggregate = aggregate_columns(np.arange(kang.n_vars))
    norm, _ = normalise_counts(counts, aggregate, 1e4)
    stats = stats_of(norm, gene_names(kang), chunk=333)
    medians, exact = stats.medians(), exact_medians(norm)
    assert np.array_equal(np.isnan(medians), np.isnan(exact))
    # Discrete counts: the histogram median is close once a gene has enough cells.
    common = stats.n_cells >= 100
    assert common.sum() > 1000
    # Within one histogram bin (10 ** (8 / 256) - 1 = 7.5%) of the exact median.
    np.testing.assert_allclose(medians[common], exact[common], rtol=0.075)


def test_never_detected_gene_has_nan_median():
    stats = GeneStatistics.empty(["A", "B"])
    stats.update(sp.csr_matrix(np.array([[0.0, 2.0], [0.0, 4.0]], dtype=np.float32)))
    medians = stats.medians()
    assert np.isnan(medians[0])
    assert 2.0 * 0.95 < medians[1] < 4.0 * 1.05
    assert stats.n_cells.tolist() == [0, 2]


def test_merging_halves_equals_the_whole():
    matrix, genes = lognormal_corpus(n_cells=1000, n_genes=30, seed=3)
    # Halves over different, overlapping gene sets in different orders; a gene absent from a half has no counts
    # there.
    first_genes = list(range(0, 20))[::-1]
    second_genes = list(range(10, 30))
    top, bottom = matrix[:400].tocsc(), matrix[400:].tocsc()
    assert top[:, 20:].nnz > 0  # the first half has counts in genes it will not list: zero them in the whole
    whole_matrix = sp.vstack(
        [
            sp.csr_matrix(top.multiply(np.isin(np.arange(30), first_genes)[None, :])),
            sp.csr_matrix(bottom.multiply(np.isin(np.arange(30), second_genes)[None, :])),
        ],
        format="csr",
    )
    whole = stats_of(whole_matrix, genes)
    a = stats_of(sp.csr_matrix(top[:, first_genes]), [genes[j] for j in first_genes])
    b = stats_of(sp.csr_matrix(bottom[:, second_genes]), [genes[j] for j in second_genes])
    for merged in (a.merge(b), b.merge(a), GeneStatistics.empty([]).merge(a).merge(b)):
        assert merged.genes.tolist() == genes
        np.testing.assert_array_equal(merged.histogram, whole.histogram)
        np.testing.assert_array_equal(merged.n_cells, whole.n_cells)
        assert merged.cells_seen == 1000
        np.testing.assert_array_equal(merged.medians(), whole.medians())
    assert whole.histogram.shape == (30, N_HIST_BINS)


def test_statistics_save_and_load(tmp_path):
    matrix, genes = lognormal_corpus(n_cells=300, n_genes=12, seed=4)
    stats = stats_of(matrix, genes)
    path = tmp_path / "stats.npz"
    stats.save(path)
    loaded = GeneStatistics.load(path)
    assert loaded.genes.tolist() == genes
    np.testing.assert_array_equal(loaded.histogram, stats.histogram)
    np.testing.assert_array_equal(loaded.n_cells, stats.n_cells)
    assert loaded.cells_seen == 300
    np.testing.assert_array_equal(loaded.medians(), stats.medians())
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]


def test_medians_for_aligns_with_token_ids():
    matrix, genes = lognormal_corpus(n_cells=300, n_genes=6, seed=5)
    stats = stats_of(matrix, genes)
    vocab = GeneVocab.from_genes(["G005", "G001", "OTHER", "G003"])
    aligned = stats.medians_for(vocab)
    assert aligned.dtype == np.float32 and aligned.shape == (len(vocab),)
    medians = stats.medians()
    assert np.all(np.isnan(aligned[vocab.special_ids]))
    assert np.isnan(aligned[vocab["OTHER"]])
    for gene in ("G005", "G001", "G003"):
        assert aligned[vocab[gene]] == np.float32(medians[genes.index(gene)])


def test_include_zeros_splits_large_inputs_into_bounded_blocks(kang, monkeypatch):
    import sc_foundation.data.tokenization as tokenization

    panel = small_panel(kang)
    tokenizer = GeneTokenizer(panel, TokenizerConfig(include_zeros=True, context_length=64, min_match_rate=0.0))
    _, whole = encode(tokenizer, kang)
    # A tiny dense budget forces blocks of a few cells; the result must not change.
    monkeypatch.setattr(tokenization, "_MAX_DENSE_ENTRIES", 1000)
    _, blocked = encode(tokenizer, kang)
    assert cells_by_row(blocked) == cells_by_row(whole)
    np.testing.assert_array_equal(blocked.n_counts, whole.n_counts)
    np.testing.assert_array_equal(blocked.n_expressed, whole.n_expressed)


@pytest.mark.parametrize("encoding", ["binned", "rank", "continuous"])
def test_encode_no_cells(kang, kang_vocab, encoding):
    tokenizer = GeneTokenizer(kang_vocab, TokenizerConfig(encoding=encoding), random_medians(kang_vocab))
    match = tokenizer.match_genes(gene_names(kang))
    cells = tokenizer.encode(sp.csr_matrix((0, kang.n_vars), dtype=np.float32), match, cell_keys([]))
    assert len(cells) == 0
    assert cells.offsets.tolist() == [0]
    assert len(cells.gene_ids) == 0
