"""Benchmark: how much of each probe set's cell-type signal survives the tokens a model reads (issue 18).

The pretraining recipe reads each cell through a subset of its panel genes: the ``context`` genes chosen by the
tokenizer's ``truncation`` (``top``: highest log-normalised values; ``relative``: highest against each gene's corpus
non-zero median). What the tokens leave out, no encoder can use. This script tokenizes each probe set exactly as an
export's tokenizer would with each setting, lays the kept values out as a dense (cells, panel genes) matrix (a gene
the cell's tokens do not hold is 0), scales it and takes 50 principal components, and scores them with the probes'
:func:`~sc_foundation.training.probes.score_embedding` (kNN accuracy, AvgBIO, the batch score on sets with a batch).
``all`` keeps every expressed panel gene. The scores are those of PCA on what the model sees, a reference for the
token choice (not a bound: an encoder is not linear), beside PCA-50 of the set's HVGs (the probes' baseline).

    python benchmarks/context_ceiling.py --out DIR --pretrained EXPORT [--contexts 128 256] \
        [--truncations top relative] [--probe-cells 2000]

``relative`` needs the export's tokenizer to carry gene medians (one trained with ``truncation=relative``).
Writes ``context_ceiling.json`` and ``context_ceiling.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from _corpus import machine_info, write_report
from pretrain_quality import probe_sets
from sklearn.decomposition import PCA

from sc_foundation.data.tokenization import GeneTokenizer, cell_keys
from sc_foundation.training.probes import load_probe_set, pca_embedding, score_embedding

ALL_GENES = 1_000_000
"""A context longer than any panel: every expressed panel gene is kept."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrained", type=Path, required=True, help="an export: its tokenizer and gene panel")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 256], help="genes per cell")
    parser.add_argument("--truncations", nargs="+", default=["top", "relative"], choices=["top", "relative"])
    parser.add_argument("--probe-cells", type=int, default=2000, help="cells per probe set at most")
    parser.add_argument(
        "--recipe-overrides", nargs="*", default=["experiment=cpu_pretrain"], help="the config of the probe sets"
    )
    return parser.parse_args(argv)


def kept_values(tokenizer: GeneTokenizer, adata, species: str) -> tuple[np.ndarray, np.ndarray]:
    """(cells, genes) dense token values of ``adata``'s cells as ``tokenizer`` reads them (0 where a cell's tokens
    hold no such gene), over the genes any cell's tokens hold; and the (cells,) rows of ``adata`` they belong to."""
    from sc_foundation.data.io import counts_from_anndata

    match, _ = tokenizer.match_source(counts_from_anndata(adata), chunk_size=adata.n_obs, species=species)
    cells = tokenizer.encode(sp.csr_matrix(adata.X, dtype=np.float32), match, cell_keys(adata.obs_names))
    special = np.isin(cells.gene_ids, tokenizer.vocab.special_ids)
    rows = np.repeat(np.arange(len(cells)), cells.lengths)[~special]
    genes, columns = np.unique(cells.gene_ids[~special], return_inverse=True)
    dense = sp.csr_matrix((cells.values[~special], (rows, columns)), shape=(len(cells), len(genes))).toarray()
    return dense, cells.rows


def scaled_pca(x: np.ndarray, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """(cells, n_comps) PCA of ``x`` with each gene centred, scaled to unit variance and clipped at 10 (as
    ``sc.pp.scale(max_value=10)``, the probes' PCA baseline)."""
    z = np.clip((x - x.mean(0)) / np.maximum(x.std(0), 1e-8), -10, 10)
    n_comps = min(n_comps, z.shape[0] - 1, z.shape[1] - 1)
    return PCA(n_components=n_comps, random_state=seed).fit_transform(z).astype(np.float32)


def selections(contexts: list[int], truncations: list[str]) -> list[tuple[str, int, str]]:
    """(name, context, truncation) of each setting scored, ``all`` first."""
    return [("all", ALL_GENES, "top")] + [(f"{t} {c}", c, t) for c in contexts for t in truncations]


def run(args: argparse.Namespace) -> dict:
    base = GeneTokenizer.from_pretrained(args.pretrained)
    if "relative" in args.truncations and base.gene_medians is None:
        raise SystemExit(
            f"{args.pretrained}: its tokenizer has no gene medians, which truncation 'relative' needs; pass an export "
            "trained with data.tokenizer.truncation=relative, or --truncations top."
        )
    record: dict = {"machine": machine_info(), "pretrained": str(args.pretrained), "sets": {}}
    for probe in probe_sets(args.probe_cells, args.recipe_overrides):
        adata = load_probe_set(probe)
        species = adata.uns["probe"]["species"]
        labels = adata.obs["label"].to_numpy()
        batches = adata.obs["batch"].to_numpy() if "batch" in adata.obs else None
        scores = {"hvg_pca": score_embedding(pca_embedding(adata), labels, batches=batches)}
        for name, context, truncation in selections(args.contexts, args.truncations):
            config = dataclasses.replace(base.config, context_length=context, truncation=truncation)
            x, rows = kept_values(GeneTokenizer(base.vocab, config, base.gene_medians), adata, species)
            scores[name] = score_embedding(
                scaled_pca(x), labels[rows], batches=None if batches is None else batches[rows]
            )
            scores[name]["genes_per_cell"] = float(np.median((x > 0).sum(1)))
        record["sets"][probe.name] = {"n_cells": adata.n_obs, "scores": scores}
        print(probe.name, {k: round(v["knn_accuracy"], 3) for k, v in scores.items()}, flush=True)
    return record


def markdown(record: dict) -> str:
    lines = [
        "| probe set | tokens kept | genes per cell (median) | kNN | AvgBIO | batch score |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, result in record["sets"].items():
        for kept, s in result["scores"].items():
            label = "PCA-50 of HVGs (the probes' baseline)" if kept == "hvg_pca" else kept
            genes = f"{s['genes_per_cell']:.0f}" if "genes_per_cell" in s else ""
            batch = f"{s['batch_score']:.3f}" if "batch_score" in s else "-"
            lines.append(
                f"| {name} ({result['n_cells']}) | {label} | {genes} | {s['knn_accuracy']:.3f} | "
                f"{s['avg_bio']:.3f} | {batch} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record = run(args)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    write_report(args.out, "context_ceiling", record, markdown(record))
    return record


if __name__ == "__main__":
    main()
