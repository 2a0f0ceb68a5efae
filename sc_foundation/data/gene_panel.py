"""A gene panel for the model's input: the union of each input's highly variable genes.

A cell expresses thousands of genes, most of them housekeeping genes that say little about its type, and a
Transformer's cost grows with the square of the tokens it reads. PCA's strength on single-cell data comes from the
same choice made here: reading only highly variable genes (HVGs). A panel vocabulary makes the tokenizer keep a
cell's expressed panel genes (or, with ``include_zeros``, every panel gene) and drop the rest.

HVGs are chosen per input, not on the pooled corpus: pooled, the genes that separate one dataset from another (its
tissue, its protocol) would crowd out those that separate cell types within each. The panel is the union.
scanpy selects them (Seurat flavour on log-normalised counts) from at most ``max_cells`` seeded random cells per
input, read chunk by chunk, so memory is bounded whatever the file size.

Some variable genes vary with the protocol more than with the cell: a cell's mitochondrial share follows its
lysis and capture (CellBench's CEL-seq2 plates carry twice Drop-seq's), ribosomal protein genes follow depth and
chemistry, and the pseudogenes of both collect the reads an aligner misplaces. ``exclude`` keeps such families (or
any named genes) out of the panel before the HVGs are chosen, so each input still contributes its ``n_top_genes``.
Spike-ins (ERCC-) never resolve to a gene id and never enter.

An input that measures a designed panel (``targeted_panel``: MERFISH's 1,122 genes) gives all its genes: each was
chosen for the cells it separates, and its most variable 1,000 would drop markers such as Htr7, Bcl11b or Oxtr.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from sc_foundation.data.genes import GENE_ID_RULES, GeneVocab, _atomic_write_text, human_symbols, resolve_genes
from sc_foundation.data.store import CorpusInput
from sc_foundation.data.tokenization import aggregate_columns, hash_uniform

# The cytosolic ribosome's protein genes (RPL*, RPS*, RPLP0-2 and paralogs such as RPL3L, RPS4Y1), by human symbol;
# not the ribosomal S6 kinases (RPS6KA1) or binding proteins (RPS19BP1), which share the prefix.
_RIBOSOMAL = r"RP[SL]\d+[AXY]?\d?|RP[SL]\d+L\d?|RPL36AL|RPLP[0-2]"
# Gene families by human symbol (mouse genes resolve to their human orthologs first). The pseudogene families are
# processed pseudogenes of mitochondrial (MTND1P23: a nuclear copy of MT-ND1) and ribosomal genes (RPL5P24): reads of
# the parent gene that an aligner places on them, so they follow the protocol and pipeline, not the cell
# (CellBench's protocols differ most, within each cell line, on MT-TH, RPL5P24, MTND1P23, RPL5P17, RPS27P3).
GENE_FAMILIES = {
    "mitochondrial": re.compile(r"^MT-"),
    "mitochondrial_pseudogenes": re.compile(r"^MT(ND\d|ND4L|CO\d|ATP\d|CYB|RNR\d)[A-Z]?P\d+$"),
    "ribosomal": re.compile(rf"^({_RIBOSOMAL})$"),
    "ribosomal_pseudogenes": re.compile(rf"^({_RIBOSOMAL})P\d+$"),
}


def excluded_gene_ids(exclude: Sequence[str]) -> frozenset[str]:
    """Canonical (human Ensembl) ids named by ``exclude``: family names of :data:`GENE_FAMILIES` and gene names
    (symbols or Ensembl ids, human or mouse).

    Raises ValueError naming the entries that are neither a family nor a known gene.
    """
    symbol_to_id = human_symbols()
    ids: set[str] = set()
    names = []
    for entry in exclude:
        family = GENE_FAMILIES.get(str(entry).lower())
        if family is None:
            names.append(str(entry))
        else:
            ids.update(gene for symbol, gene in symbol_to_id.items() if family.match(symbol))
    if names:
        resolved = resolve_genes(names).canonical
        unknown = [name for name, gene in zip(names, resolved, strict=True) if gene is None]
        if unknown:
            raise ValueError(
                f"data.panel.exclude: {unknown} are neither a gene family ({sorted(GENE_FAMILIES)}) nor a gene "
                "symbol or Ensembl id this project knows (sc_foundation/resources/human_genes.tsv.gz): fix or drop them"
            )
        ids.update(resolved)
    return frozenset(ids)


def input_hvgs(
    spec: CorpusInput,
    n_top_genes: int,
    max_cells: int = 20_000,
    seed: int = 0,
    exclude: frozenset[str] = frozenset(),
) -> list[str]:
    """The ``n_top_genes`` most variable canonical genes of one input (scanpy, Seurat flavour), none of them in
    ``exclude`` (canonical ids, :func:`excluded_gene_ids`); every such gene of a ``targeted_panel`` input.

    Cells are drawn by a seeded hash of their row number with probability ``max_cells / n_cells``, chunk by chunk;
    genes are resolved to canonical ids and duplicates summed before normalisation.
    """
    with spec.open() as source:
        resolution = resolve_genes(source.gene_names, species=spec.species)
        codes, genes = pd.factorize(pd.Series(resolution.canonical, dtype=object), use_na_sentinel=True)
        _, aggregate = aggregate_columns(codes.astype(np.int64))  # (n_input, n_canonical): sums duplicates
        share = min(1.0, max_cells / max(source.n_cells, 1))
        kept = []
        for start, counts in source.iter_chunks():
            rows = np.arange(start, start + counts.shape[0], dtype=np.uint64)
            chosen = hash_uniform(np.uint64(seed), rows) < share
            kept.append(sp.csr_matrix(counts[chosen], dtype=np.float32) @ aggregate)
    adata = anndata.AnnData(sp.vstack(kept).tocsr())
    adata.var_names = [str(g) for g in genes]
    seen = np.asarray((adata.X > 0).sum(axis=0)).ravel() >= 3  # in at least 3 cells
    adata = adata[:, seen & ~adata.var_names.isin(list(exclude))].copy()
    if spec.targeted_panel:
        return sorted(adata.var_names)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    n_top = min(n_top_genes, adata.n_vars)
    hvg = sc.pp.highly_variable_genes(adata, n_top_genes=n_top, flavor="seurat", inplace=False)
    return sorted(adata.var_names[hvg["highly_variable"].to_numpy()])


def select_gene_panel(
    inputs: Iterable[str | os.PathLike | Mapping | CorpusInput],
    n_top_genes: int = 1000,
    max_cells: int = 20_000,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> list[str]:
    """The sorted union of every input's ``n_top_genes`` HVGs (:func:`input_hvgs`), as canonical gene ids, with the
    families and genes of ``exclude`` (:func:`excluded_gene_ids`) left out before the HVGs are chosen."""
    excluded = excluded_gene_ids(exclude)
    panel: set[str] = set()
    for item in inputs:
        panel.update(input_hvgs(CorpusInput.coerce(item), n_top_genes, max_cells, seed, excluded))
    return sorted(panel)


def cached_panel_vocab(
    inputs: Iterable[str | os.PathLike | Mapping | CorpusInput],
    cache_dir: str | os.PathLike,
    n_top_genes: int = 1000,
    max_cells: int = 20_000,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> Path:
    """A ``gene_vocab.json`` of the panel (:func:`select_gene_panel`), computed once per plan and cached.

    The file sits in ``cache_dir/<hash>/`` where the hash covers the inputs (path, size, modification time and read
    settings) and the settings, so a changed input or setting selects a new panel. Returns the file's path.
    """
    specs = [CorpusInput.coerce(item) for item in inputs]
    plan = {
        "inputs": [s.fingerprint() for s in specs],
        "n_top_genes": n_top_genes,
        "max_cells": max_cells,
        "seed": seed,
        "gene_id_rules": GENE_ID_RULES,
    }
    if exclude:  # only when set, so the panels cached before this setting existed keep their folder
        plan["exclude"] = sorted(str(entry) for entry in exclude)
    key = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / key
    path = folder / "gene_vocab.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        GeneVocab.from_genes(select_gene_panel(specs, n_top_genes, max_cells, seed, exclude)).save(folder)
        _atomic_write_text(folder / "panel_plan.json", json.dumps(plan, indent=1, default=str))
    return path
