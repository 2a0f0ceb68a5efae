"""Benchmark: which genes interferon-stimulated cells lose from a top-N context (the shift hypothesis of issue 22).

The ``experiment=cpu_pretrain`` recipe reads each cell through its ``--context`` (128) most expressed genes of a gene
panel (log1p counts per 10k). Under interferon stimulation the response genes rise; if they take those slots they
push cell-type markers out, and a classifier trained on control cells sees different genes in stimulated ones. This
script measures that on the Kang et al. PBMCs (control and IFN-beta stimulated cells of the same donors, no cell-type
labels needed), for the panel the recipe and the fine-tuning tasks build: the ``--panel`` (1000) most variable genes
(scanpy, Seurat flavour, over all cells).

Per gene and condition: ``in_context`` (share of cells whose context holds it) and ``pushed_out`` (share of the cells
expressing it whose context does not hold it). Interferon-response genes are found in the data: panel genes whose
mean normalised expression rises more than 4-fold (log2 fold change > 2) in stimulated cells and that at least 10% of
stimulated cells express. Markers are a fixed list of canonical PBMC type markers (:data:`MARKERS`). For comparison,
the fine-tuning default (``data.panel_genes=1000``, a context holding the whole panel) pushes nothing out: its
``pushed_out`` is 0 by construction, and the script reports how many expressed panel genes a cell has. ``--panel 0``
reads every gene (a top-N context over the whole transcriptome, as scGPT and Geneformer do).

    python benchmarks/context_shift.py --out DIR [--context 128] [--panel 1000] [--data-dir ../shared/data]

Writes ``context_shift.json`` and ``context_shift.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _corpus import DEFAULT_DATA, machine_info, write_report

# Canonical PBMC type markers (T, CD8 T, NK, B, monocytes, DCs, platelets), the genes a classifier of these types
# leans on; those outside the panel are reported as such.
MARKERS = [
    "CD3D", "CD3E", "IL7R", "CCR7", "CD8A", "CD8B", "NKG7", "GNLY", "GZMB", "MS4A1", "CD79A", "CD79B",
    "CD14", "LYZ", "FCGR3A", "MS4A7", "FCER1A", "CST3", "HLA-DRA", "PPBP",
]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=128, help="genes per cell (the recipe's context)")
    parser.add_argument("--panel", type=int, default=1000, help="most variable genes in the panel; 0: every gene")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    return parser.parse_args(argv)


def top_context(x: np.ndarray, context: int) -> np.ndarray:
    """(n, G) bool: each cell's ``context`` highest values among its expressed genes (all of them when fewer).

    Args:
        x: (n, G) dense log-normalised expression over the panel.
    """
    order = np.argsort(-x, axis=1, kind="stable")[:, :context]  # (n, context) the top genes, ties by panel order
    chosen = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(chosen, order, True, axis=1)
    return chosen & (x > 0)


def gene_shares(x: np.ndarray, chosen: np.ndarray) -> dict[str, np.ndarray]:
    """Per gene (G,): share of cells in context, expressing it, and expressing it but not in context."""
    expressed = x > 0
    n_expressing = np.maximum(expressed.sum(0), 1)
    return {
        "in_context": chosen.mean(0),
        "expressed": expressed.mean(0),
        "pushed_out": (expressed & ~chosen).sum(0) / n_expressing,
    }


def measure(adata, context: int, n_panel: int) -> dict:
    """The shares per condition, the response genes and the markers (see the module docstring)."""
    import scanpy as sc

    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    if n_panel:
        sc.pp.highly_variable_genes(adata, n_top_genes=n_panel, flavor="seurat")
        panel = adata[:, adata.var["highly_variable"].to_numpy()]
    else:  # the whole transcriptome, as scGPT's and Geneformer's top-N contexts read it
        panel = adata
    genes = panel.var_names.to_numpy(dtype=str)
    conditions = panel.obs["condition"].astype(str).to_numpy()
    result = {"panel_genes": len(genes), "context": context, "conditions": {}}
    shares, expression = {}, {}
    for condition in ("ctrl", "stim"):
        x = panel.X[conditions == condition].toarray()  # (n_condition, G)
        chosen = top_context(x, context)
        shares[condition] = gene_shares(x, chosen)
        expression[condition] = np.expm1(x).mean(0)
        n_expressed = (x > 0).sum(1)
        result["conditions"][condition] = {
            "cells": len(x),
            "median_expressed_panel_genes": float(np.median(n_expressed)),
            "share_of_cells_over_context": float((n_expressed > context).mean()),
        }
    log2fc = np.log2((expression["stim"] + 1e-3) / (expression["ctrl"] + 1e-3))
    response = (log2fc > 2) & (shares["stim"]["expressed"] >= 0.1)
    for condition in ("ctrl", "stim"):
        slots = shares[condition]["in_context"]
        result["conditions"][condition]["response_share_of_context_slots"] = float(
            slots[response].sum() / max(slots.sum(), 1e-9)
        )
    result["response_genes"] = sorted(genes[response].tolist(), key=lambda g: -log2fc[genes == g][0])
    markers = {}
    for gene in MARKERS:
        if gene not in set(genes):
            markers[gene] = None
            continue
        i = int(np.flatnonzero(genes == gene)[0])
        markers[gene] = {
            f"{key}_{condition}": float(shares[condition][key][i])
            for condition in ("ctrl", "stim")
            for key in ("expressed", "in_context", "pushed_out")
        }
    result["markers"] = markers
    in_panel = [m for m in markers.values() if m]
    result["markers_pushed_out_mean"] = {
        condition: float(np.mean([m[f"pushed_out_{condition}"] for m in in_panel])) for condition in ("ctrl", "stim")
    }
    lost = shares["ctrl"]["in_context"] - shares["stim"]["in_context"]
    displaced = shares["stim"]["pushed_out"] - shares["ctrl"]["pushed_out"]
    result["most_lost_from_context"] = [
        {
            "gene": str(genes[i]),
            "ctrl": float(shares["ctrl"]["in_context"][i]),
            "stim": float(shares["stim"]["in_context"][i]),
        }
        for i in np.argsort(-lost)[:15]
    ]
    result["most_pushed_out"] = [
        {
            "gene": str(genes[i]),
            "pushed_out_ctrl": float(shares["ctrl"]["pushed_out"][i]),
            "pushed_out_stim": float(shares["stim"]["pushed_out"][i]),
            "expressed_stim": float(shares["stim"]["expressed"][i]),
        }
        for i in np.argsort(-displaced)[:15]
    ]
    return result


def markdown(payload: dict) -> str:
    r = payload["result"]
    ctrl, stim = r["conditions"]["ctrl"], r["conditions"]["stim"]
    lines = [
        "# Which genes stimulated cells lose from a top-N context",
        "",
        f"- command: `{payload['command']}`; wall time {payload['wall_s']:.0f} s",
        f"- Kang IFN-beta PBMCs: {ctrl['cells']} control, {stim['cells']} stimulated cells; panel of "
        f"{r['panel_genes']} most variable genes; context {r['context']} genes",
        f"- expressed panel genes per cell (median): control {ctrl['median_expressed_panel_genes']:.0f}, stimulated "
        f"{stim['median_expressed_panel_genes']:.0f}; cells with more than the context: control "
        f"{ctrl['share_of_cells_over_context']:.1%}, stimulated {stim['share_of_cells_over_context']:.1%}",
        f"- {len(r['response_genes'])} interferon-response genes (log2 FC > 2, expressed in >= 10% of stimulated "
        f"cells) hold {ctrl['response_share_of_context_slots']:.1%} of control and "
        f"{stim['response_share_of_context_slots']:.1%} of stimulated context slots: "
        f"{', '.join(r['response_genes'][:20])}",
        f"- markers pushed out (expressed but outside the context), mean over the markers in the panel: control "
        f"{r['markers_pushed_out_mean']['ctrl']:.1%}, stimulated {r['markers_pushed_out_mean']['stim']:.1%}",
        "",
        "| marker | expressed ctrl | expressed stim | in context ctrl | in context stim | pushed out ctrl | "
        "pushed out stim |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for gene, m in r["markers"].items():
        if m is None:
            lines.append(f"| {gene} | not in the panel | | | | | |")
            continue
        lines.append(
            f"| {gene} | {m['expressed_ctrl']:.2f} | {m['expressed_stim']:.2f} | {m['in_context_ctrl']:.2f} | "
            f"{m['in_context_stim']:.2f} | {m['pushed_out_ctrl']:.2f} | {m['pushed_out_stim']:.2f} |"
        )
    lines += ["", "Genes most pushed out in stimulated cells (share of expressing cells):", ""]
    lines += ["| gene | pushed out ctrl | pushed out stim | expressed stim |", "| --- | ---: | ---: | ---: |"]
    for g in r["most_pushed_out"]:
        lines.append(
            f"| {g['gene']} | {g['pushed_out_ctrl']:.2f} | {g['pushed_out_stim']:.2f} | {g['expressed_stim']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import sys

    import anndata

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    adata = anndata.read_h5ad(args.data_dir / "kang_ifnb/kang_ifnb.h5ad")
    adata.var_names_make_unique()
    if "condition" not in adata.obs.columns:
        raise ValueError(f"kang_ifnb.h5ad: no obs column 'condition'; obs columns: {list(adata.obs.columns)}")
    result = measure(adata, args.context, args.panel)
    shown = sys.argv[1:] if argv is None else argv
    payload = {
        "command": " ".join(["python benchmarks/context_shift.py", *shown]),
        "machine": machine_info(),
        "result": result,
        "wall_s": time.perf_counter() - started,
    }
    write_report(args.out, "context_shift", payload, markdown(payload))
    return payload


if __name__ == "__main__":
    main()
