"""The gene panel's exclusions: gene families and named genes kept out before the HVGs are chosen."""

import json

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from sc_foundation.conf import compose
from sc_foundation.data.gene_panel import GENE_FAMILIES, cached_panel_vocab, excluded_gene_ids, select_gene_panel
from sc_foundation.data.genes import human_symbols, resolve_genes, symbol_of

MITOCHONDRIAL = ["MT-ND1", "MT-CO1", "MT-ATP6", "MT-CYB"]
RIBOSOMAL = ["RPL13", "RPS6", "RPLP0", "RPS4X"]


@pytest.fixture
def protocol_file(tmp_path):
    """200 cells of two 'protocols' whose mitochondrial and ribosomal genes differ a hundredfold (the most variable
    genes, each at its own level), beside 120 genes of Poisson counts at spread levels that carry no protocol."""
    rng = np.random.default_rng(0)
    others = [s for s in sorted(human_symbols()) if s.startswith("ZNF")][:120]
    genes = MITOCHONDRIAL + RIBOSOMAL + others
    protocol = np.repeat([0, 1], 100)
    # Each technical gene at its own level, so each is compared with protocol-free genes of its level (Seurat's bins).
    levels = np.geomspace(0.5, 100.0, len(others))
    technical = np.where(protocol[:, None] == 1, 1.0, 0.01) * levels[:: len(others) // 8][None, :8] * 2
    levels = np.broadcast_to(levels, (200, len(others)))
    adata = anndata.AnnData(sp.csr_matrix(rng.poisson(np.hstack([technical, levels])).astype(np.float32)))
    adata.var_names = genes
    path = tmp_path / "protocols.h5ad"
    adata.write_h5ad(path)
    return path


def symbols(panel):
    return set(symbol_of(panel))


def test_families_name_the_genes_and_nothing_else():
    ids = excluded_gene_ids(["mitochondrial"])
    named = set(symbol_of(sorted(ids)))
    assert len(ids) == 37 and all(s.startswith("MT-") for s in named)  # the mitochondrial genome's 37 genes
    ribosomal = set(symbol_of(sorted(excluded_gene_ids(["Ribosomal"]))))
    assert {"RPL13", "RPS6", "RPLP0", "RPS4X", "RPL36AL"} <= ribosomal
    assert not {"RPS6KA1", "RPS17P5", "MRPL1"} & ribosomal  # kinases, pseudogenes, mitochondrial ribosome
    pseudogenes = set(symbol_of(sorted(excluded_gene_ids(["mitochondrial_pseudogenes", "ribosomal_pseudogenes"]))))
    assert {"MTND1P23", "MTATP6P1", "MTCO1P40", "RPL5P24", "RPS27P3", "RPS4XP16"} <= pseudogenes
    assert not pseudogenes & (ribosomal | named | {"RPS19BP1"})
    assert set(GENE_FAMILIES) == {"mitochondrial", "mitochondrial_pseudogenes", "ribosomal", "ribosomal_pseudogenes"}


def test_named_genes_resolve_like_inputs_and_unknown_names_are_refused():
    ids = excluded_gene_ids(["XIST", "ENSG00000111640", "Malat1"])  # a symbol, an Ensembl id, a mouse symbol
    assert ids == set(resolve_genes(["XIST", "GAPDH", "MALAT1"]).canonical)
    with pytest.raises(ValueError, match=r"\['NOT_A_GENE'\].*gene family"):
        excluded_gene_ids(["mitochondrial", "NOT_A_GENE"])


def test_excluded_genes_leave_the_panel_and_others_take_their_places(protocol_file):
    full = symbols(select_gene_panel([protocol_file], n_top_genes=10))
    assert set(MITOCHONDRIAL) <= full  # the most variable genes when allowed in
    panel = symbols(select_gene_panel([protocol_file], n_top_genes=10, exclude=["mitochondrial", "ribosomal"]))
    assert not panel & set(MITOCHONDRIAL + RIBOSOMAL)
    assert len(panel) == 10  # the input still gives n_top_genes


def test_exclusions_get_their_own_cached_panel(protocol_file, tmp_path):
    plain = cached_panel_vocab([protocol_file], tmp_path / "panels", n_top_genes=10)
    no_mt = cached_panel_vocab([protocol_file], tmp_path / "panels", n_top_genes=10, exclude=["mitochondrial"])
    assert plain.parent != no_mt.parent
    assert json.loads((no_mt.parent / "panel_plan.json").read_text())["exclude"] == ["mitochondrial"]
    assert "exclude" not in json.loads((plain.parent / "panel_plan.json").read_text())


@pytest.mark.parametrize("experiment", ["cpu_pretrain", "quickstart", "gpu_pretrain"])
def test_the_recipes_keep_the_protocol_genes_out_of_their_panel(experiment):
    exclude = list(compose("pretrain", [f"experiment={experiment}"]).data.panel.exclude)
    named = set(symbol_of(sorted(excluded_gene_ids(exclude))))
    assert {"MT-ND3", "MTND1P23", "RPL5P24"} <= named  # CellBench's protocols differ most on such genes
    assert "RPL13" not in named  # the ribosomal protein genes themselves stay


def test_a_targeted_panel_gives_all_its_genes_but_the_excluded_ones(protocol_file, tmp_path):
    plain = {"path": str(protocol_file)}
    targeted = {"path": str(protocol_file), "targeted_panel": True}
    assert len(select_gene_panel([plain], n_top_genes=10)) == 10
    every = symbols(select_gene_panel([targeted], n_top_genes=10, exclude=["mitochondrial"]))
    assert len(every) == 128 - len(MITOCHONDRIAL) and set(RIBOSOMAL) <= every and not every & set(MITOCHONDRIAL)
    # The setting is part of the input's fingerprint, so a cached panel without it is never reused.
    assert (
        cached_panel_vocab([plain], tmp_path / "panels", n_top_genes=10).parent
        != cached_panel_vocab([targeted], tmp_path / "panels", n_top_genes=10).parent
    )


def test_merfish_is_registered_as_a_targeted_panel(shared_data):
    from sc_foundation.data.datasets import dataset_inputs

    (merfish,) = dataset_inputs("merfish_mouse_brain")
    panel = select_gene_panel([merfish], n_top_genes=1000)
    assert merfish["targeted_panel"] and len(panel) > 1050  # every resolvable gene of its 1,122, not 1,000 of them
