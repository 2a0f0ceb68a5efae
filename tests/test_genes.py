"""Tests for sc_foundation.data.genes: gene-id resolution, species detection and the gene vocabulary."""

import gzip
import json

import anndata
import numpy as np
import pytest

from sc_foundation.data.genes import (
    CLS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    GeneVocab,
    _read_table,
    detect_species,
    resolve_genes,
    symbol_of,
)

TP53 = "ENSG00000141510"
CD3E = "ENSG00000198851"
GAPDH = "ENSG00000111640"
GENEFORMER_VOCAB = "genecorpus_tokenized/vocab.txt"


def read_pairs(shared_data, relative) -> list[tuple[str, str]]:
    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"{relative} is missing")
    with gzip.open(path, "rt") as handle:
        return [tuple(line.rstrip("\n").split(",")) for line in handle]


@pytest.fixture(scope="module")
def gencode(shared_data) -> dict[str, str]:
    """Human symbol -> Ensembl id from the shared GENCODE v44 reference (independent of the package's table), for
    symbols that name exactly one gene there."""
    ids: dict[str, list[str]] = {}
    for ensembl, symbol in read_pairs(shared_data, "reference/gencode_v44_human_gene_id2name.csv.gz"):
        ids.setdefault(symbol, []).append(ensembl)
    return {symbol: found[0] for symbol, found in ids.items() if len(found) == 1 and symbol}


@pytest.fixture(scope="module")
def mouse_to_human(shared_data) -> dict[str, set[str]]:
    """Mouse symbol -> human symbols from the shared Ensembl 105 ortholog reference."""
    partners: dict[str, set[str]] = {}
    for human, mouse in read_pairs(shared_data, "reference/ensembl105_human2mouse_symbols.csv.gz"):
        if mouse:
            partners.setdefault(mouse, set()).add(human)
    return partners


def var_names(shared_data, relative, gene_key=None) -> list[str]:
    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"{relative} is missing")
    adata = anndata.read_h5ad(path, backed="r")
    names = adata.var_names if gene_key is None else adata.var[gene_key]
    out = [str(n) for n in names]
    adata.file.close()
    return out


# --- resolution ---------------------------------------------------------------------------------------------------


def test_reference_ids_used_below_match_gencode(gencode):
    assert gencode["TP53"] == TP53
    assert gencode["CD3E"] == CD3E
    assert gencode["GAPDH"] == GAPDH


@pytest.mark.parametrize(
    "name",
    [
        "ENSG00000141510",
        "ENSG00000141510.17",
        "ENSG00000141510.3",
        "hg19_ENSG00000141510.5",
        "hg19_TP53",
        "GRCh38_TP53",
        "GRCh38-TP53",
        "TP53",
        " TP53 ",
        "tp53",
        "Tp53",
    ],
)
def test_human_names_resolve_to_tp53(name):
    resolution = resolve_genes([name], species="human")
    assert resolution.canonical.tolist() == [TP53]
    assert resolution.unresolved.tolist() == []


def test_resolution_counts_say_how_each_name_was_found():
    names = ["ENSG00000141510.17", "ENSG00000198851", "hg19_GAPDH", "CD3E", "no_such_gene", "ENSMUSG00000024798.3"]
    resolution = resolve_genes(names, species="human")
    assert resolution.canonical.tolist() == [TP53, CD3E, GAPDH, CD3E, None, "ENSMUSG00000024798"]
    assert resolution.counts == {
        "ensembl": 1,
        "versioned": 2,
        "prefixed": 1,
        "symbol": 2,
        "ortholog": 0,
        "same_symbol": 0,
        "unresolved": 1,
    }
    assert resolution.unresolved.tolist() == ["no_such_gene"]
    assert resolution.species == "human"


def test_gencode_symbols_resolve_to_their_ids(gencode):
    # Symbols naming a single gene in GENCODE v44 must map onto exactly that gene.
    rng = np.random.default_rng(0)
    symbols = sorted(gencode)
    picked = rng.choice(symbols, size=300, replace=False).tolist()
    resolution = resolve_genes(picked, species="human")
    expected = [gencode[s] for s in picked]
    assert resolution.canonical.tolist() == expected
    assert symbol_of(expected) == picked


@pytest.mark.parametrize(
    ("mouse", "human"),
    [("Cd3e", "CD3E"), ("Trp53", "TP53"), ("Gapdh", "GAPDH"), ("Ptprc", "PTPRC")],
)
def test_mouse_symbols_map_to_human_ortholog_ids(mouse, human, gencode):
    resolution = resolve_genes([mouse], species="mouse")
    assert resolution.canonical.tolist() == [gencode[human]]
    assert resolution.counts["ortholog"] == 1


@pytest.fixture(scope="module")
def orthologs():
    """The shipped mouse-human ortholog table, as the resolver reads it."""
    return _read_table("human_mouse_orthologs.tsv.gz")


@pytest.mark.parametrize(("mouse", "human"), [("Pitx2", "PITX2"), ("Casz1", "CASZ1"), ("Anxa2", "ANXA2")])
def test_mouse_symbols_the_ortholog_table_lacks_take_the_same_human_symbol(mouse, human, gencode):
    # Real MERFISH panel genes that the Ensembl 105 ortholog table does not list at all.
    resolution = resolve_genes([mouse], species="mouse")
    assert resolution.canonical.tolist() == [gencode[human]]
    assert resolution.counts["same_symbol"] == 1


def test_same_symbol_fallback_never_takes_a_human_gene_another_mouse_gene_maps_to(orthologs):
    listed = set(orthologs["mouse_symbol"])
    # Mouse-style names that are not in the table but whose upper case is a human gene the table pairs elsewhere.
    taken = [s.capitalize() for s in orthologs["human_symbol"] if s.capitalize() not in listed][:50]
    assert taken, "the ortholog table should pair some human genes with differently named mouse genes"
    resolution = resolve_genes(taken, species="mouse")
    assert resolution.counts["same_symbol"] == 0
    assert resolution.unresolved.tolist() == taken


def test_same_symbol_ids_are_never_ids_of_listed_mouse_genes(orthologs):
    listed = resolve_genes(sorted(set(orthologs["mouse_symbol"])), species="mouse")
    assert listed.counts["same_symbol"] == 0
    fallback = resolve_genes(["Pitx2", "Casz1", "Anxa2", "Rmst", "Apela", "Gsta4", "Sln"], species="mouse")
    assert fallback.counts["same_symbol"] == 7
    assert not set(fallback.canonical) & set(listed.canonical)


def test_mouse_ensembl_ids_are_kept_and_unknown_mouse_symbols_unresolved():
    resolution = resolve_genes(["ENSMUSG00000024798.2", "mm10_Cd3e", "NotAMouseGene1"], species="mouse")
    assert resolution.canonical.tolist() == ["ENSMUSG00000024798", CD3E, None]
    assert resolution.counts["prefixed"] == 1


def test_bad_species_is_refused():
    with pytest.raises(ValueError, match="species"):
        resolve_genes(["TP53"], species="zebrafish")


# --- species detection --------------------------------------------------------------------------------------------


def test_detect_species_on_synthetic_lists():
    assert detect_species(["CD3E", "TP53", "GAPDH", "MT-CO1"]) == "human"
    assert detect_species(["Cd3e", "Trp53", "Gapdh", "mt-Co1"]) == "mouse"
    assert detect_species(["ENSMUSG00000024798", "ENSMUSG00000042385", "ENSG00000141510"]) == "mouse"
    assert detect_species(["ENSG00000141510.2", "ENSG00000198851", "Cd3e"]) == "human"
    assert detect_species(["hg19_CD3E", "hg19_TP53"]) == "human"
    assert detect_species(["mm10_ENSMUSG00000024798"]) == "mouse"


@pytest.mark.parametrize(
    ("relative", "gene_key", "species", "min_resolved"),
    [
        ("kang_ifnb/kang_ifnb.h5ad", None, "human", 0.8),
        ("snare_mop/snare_mop_rna.h5ad", None, "mouse", 0.85),
        ("merfish_mouse_brain/mouse_val.h5ad", "feature_name", "mouse", 0.9),
        ("cellbench_3cl/cellbench_3cl.h5ad", None, "human", 0.99),
        ("eccite_pbmc/eccite_rna.h5ad", None, "human", 0.75),
        ("pbmc3k/pbmc3k.h5ad", "gene_ids", "human", 0.99),
    ],
)
def test_species_detection_and_resolution_on_real_files(shared_data, relative, gene_key, species, min_resolved):
    names = var_names(shared_data, relative, gene_key)
    assert detect_species(names) == species
    resolution = resolve_genes(names)
    assert resolution.species == species
    resolved = ~np.asarray([c is None for c in resolution.canonical])
    assert resolved.mean() >= min_resolved
    assert all(str(c).startswith("ENSG") for c in resolution.canonical[resolved])


def test_merfish_symbols_map_to_reference_orthologs(shared_data, gencode, mouse_to_human):
    symbols = var_names(shared_data, "merfish_mouse_brain/mouse_val.h5ad", "feature_name")
    resolution = resolve_genes(symbols)
    assert resolution.species == "mouse"
    checked = 0
    for symbol, canonical in zip(symbols, resolution.canonical, strict=True):
        partners = mouse_to_human.get(symbol, set())
        if len(partners) == 1 and next(iter(partners)) in gencode:
            assert canonical == gencode[next(iter(partners))], symbol
            checked += 1
    assert checked > 900


def test_merfish_ensembl_column_is_mouse_and_kept(shared_data):
    ensembl = var_names(shared_data, "merfish_mouse_brain/mouse_val.h5ad", "ensembl_id")
    assert detect_species(ensembl) == "mouse"
    assert resolve_genes(ensembl).canonical.tolist() == ensembl


def test_eccite_prefix_is_stripped_to_the_same_ids_as_plain_symbols(shared_data):
    names = var_names(shared_data, "eccite_pbmc/eccite_rna.h5ad")[:2000]
    assert all(n.startswith("hg19_") for n in names)
    prefixed = resolve_genes(names)
    plain = resolve_genes([n.removeprefix("hg19_") for n in names], species="human")
    assert prefixed.counts["prefixed"] == len(names)
    assert prefixed.canonical.tolist() == plain.canonical.tolist()


# --- vocabulary ---------------------------------------------------------------------------------------------------


def test_geneformer_vocab_keeps_ids_and_appends_cls(shared_data):
    path = shared_data / GENEFORMER_VOCAB
    if not path.exists():
        pytest.skip("Geneformer vocab missing")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    vocab = GeneVocab.from_file(path)
    assert vocab.pad_id == 0
    assert vocab.mask_id == 1
    assert vocab[PAD_TOKEN] == 0
    assert vocab[MASK_TOKEN] == 1
    assert vocab.cls_id == len(lines) == len(vocab) - 1
    assert vocab.tokens[-1] == CLS_TOKEN
    # Every original token keeps its line number as its id.
    assert vocab.tokens[: len(lines)] == lines
    for i in (2, 100, 12345, len(lines) - 1):
        assert vocab[lines[i]] == i
    assert vocab.n_genes == len(lines) - 2
    assert sorted(vocab.special_ids.tolist()) == [0, 1, len(lines)]


def test_vocab_save_and_from_file_round_trip(tmp_path):
    vocab = GeneVocab.from_genes([TP53, CD3E, GAPDH])
    rna = vocab.add_special("<rna>")
    path = vocab.save(tmp_path)
    assert path == tmp_path / "gene_vocab.json"
    assert json.loads(path.read_text())["tokens"] == vocab.tokens
    for source in (tmp_path, path):
        loaded = GeneVocab.from_file(source)
        assert loaded == vocab
        assert loaded.tokens == vocab.tokens
        assert loaded["<rna>"] == rna
    assert not list(tmp_path.glob("*.tmp"))
    assert GeneVocab.from_genes([TP53, CD3E]) != vocab


def test_vocab_from_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gene_vocab\.json"):
        GeneVocab.from_file(tmp_path)


def test_vocab_layout_and_lookup():
    vocab = GeneVocab.from_genes([TP53, CD3E])
    assert vocab.tokens == [PAD_TOKEN, CLS_TOKEN, MASK_TOKEN, TP53, CD3E]
    assert (vocab.pad_id, vocab.cls_id, vocab.mask_id) == (0, 1, 2)
    assert vocab.n_genes == 2
    assert TP53 in vocab and GAPDH not in vocab
    ids = vocab.lookup([CD3E, None, GAPDH, TP53])
    assert ids.dtype == np.int64
    assert ids.tolist() == [4, -1, -1, 3]


def test_vocab_build_applies_min_cells_and_sorts():
    detected = {CD3E: 5, TP53: 12, GAPDH: 4, "ENSG00000000003": 100}
    vocab = GeneVocab.build(detected, min_cells=5)
    assert vocab.tokens[3:] == sorted(["ENSG00000000003", CD3E, TP53])
    assert GAPDH not in vocab
    assert GeneVocab.build(detected, min_cells=1).n_genes == 4
    with pytest.raises(ValueError, match="min_cells"):
        GeneVocab.build(detected, min_cells=1000)


def test_add_special_appends_once_and_checks_form():
    vocab = GeneVocab.from_genes([TP53])
    n = len(vocab)
    assert vocab.add_special("<assay:10xv3>") == n
    assert vocab.add_special("<assay:10xv3>") == n
    assert len(vocab) == n + 1
    assert vocab.n_genes == 1
    assert vocab[TP53] == 3
    for bad in ("rna", "<a b>", "<>", TP53):
        with pytest.raises(ValueError, match="<name>"):
            vocab.add_special(bad)


def test_duplicate_tokens_are_refused():
    with pytest.raises(ValueError, match=TP53):
        GeneVocab([PAD_TOKEN, TP53, CD3E, TP53])
    with pytest.raises(ValueError, match="twice"):
        GeneVocab.from_genes([CD3E, CD3E])
