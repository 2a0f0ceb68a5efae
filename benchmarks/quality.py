"""Benchmark: fine-tuning quality of our model against the baselines ``finetune.py`` computes, on real data.

Every fine-tuning task runs once through ``finetune.run`` (the configs composed from ``conf/finetune.yaml`` with the
overrides of the :data:`TASKS` table below) on fixed, seeded splits, and the scores of our fine-tuned export and of
each baseline are read back from that run's ``metrics.json``. The baselines are the ones ``finetune.py`` fits on the
same split and cells (logistic regressions for annotation, PCA / Harmony / scVI for integration, kNN smoothing / gene
means / scVI for imputation, ridge from the RNA PCA and PCA embeddings for multimodal); this script never recomputes
them. The project's goal is to beat every baseline on every task: each table marks the best value per metric and says
plainly, per metric and overall, whether we beat every baseline (a tie does not count as beating it).

The pretrained model is ``--pretrained DIR`` (an export directory); without it, the README's main command is run first
in-process (``sc_foundation.training.pretrain.run`` with ``conf/pretrain.yaml`` as is: the tiny model, 150 steps on the
default corpus), its
output under ``OUT/pretrain`` and its corpus store under ``OUT/pretrain/corpus_store`` (reused by a later run with the
same plan), and its ``export/best`` is used.

Outputs in ``--out``, each written to a temporary file and renamed (``quality.json`` and ``quality.md`` are rewritten
after every task, so an interrupted run leaves the finished tasks readable):

* ``quality.json``: command, dates, machine, the pretrained export and its config, and per task its data, overrides,
  wall time, fine-tuning epochs and steps, the headline tables (values per method, best per metric, our verdict per
  metric) and the full ``metrics.json`` path; a task that raised has ``status: "error"`` with the message and traceback.
* ``quality.md``: the same as markdown tables, one section per task.
* PNGs: ``annotation_confusion.png`` (ours beside the HVG logistic regression), ``integration_umap.png`` (UMAPs of
  every embedding in the run's ``embeddings.npz``, coloured by batch and by cell type), ``atac_umap.png`` (the joint
  and RNA-only embeddings of the ATAC task by cell type).
* ``tasks/<name>/seed<k>/``: each fine-tuning run's own output directory (``metrics.json``, ``splits.json``, export,
  ...); ``data/``: the seeded cell subsets and relabelled files some tasks train on.

A task that raises is recorded and the others still run; the script then exits with status 1.

Shift rows (``within`` in :data:`TASKS`) test generalisation: trained on one study, protocol or set of libraries and
tested on another (``split.test_groups``), each reported beside the within-split row it comes from. Annotation rows
also report calibration (expected calibration error after a validation-fitted temperature) and, with a held-out type
(``holdout_label``), how many of its cells each classifier refuses, for ours and the HVG logistic regression's
probabilities on the same cells (``sc_foundation.tasks.calibration``).

Seeds: ``--seeds 0 1 2`` (or ``--full``: ``--seed`` and the next two) runs every task once per seed, each with its
own splits, subsets, initialisation and baselines (``tasks/<name>/seed<k>``); the tables then hold the mean and the
standard deviation over seeds, and a verdict counts a gap only when it exceeds the spread (:func:`aggregate`).

Runs at once: ``--jobs N`` fine-tunes N task-seed runs side by side, each in a spawned worker process with an even
share of the usable cores as its torch, OpenMP, BLAS and numba threads; the default is one per core on a CPU-only
machine (within :data:`JOB_MEMORY_GIB` each), one with CUDA. The fine-tuned models are too small to keep two threads
busy, so on 2 cores two one-thread runs at once finish the table sooner than one two-thread run after another
(:func:`default_jobs`). The thread count changes the order of floating-point sums and so, a little, a training's
path: over three seeds our figures came out as with two threads to the third decimal but for one seed of one row,
while scVI on the thinned CellBench row moved by up to 0.10 on a seed (BENCHMARKS.md). Each run records its threads.
``--jobs 1`` runs everything in this process, one after another.

    python benchmarks/quality.py --out DIR [--pretrained EXPORT_DIR] [--tasks annotation integration ...]
        [--max-epochs N] [--seed 0 | --seeds 0 1 2 | --full] [--set KEY=VALUE ...] [--data-dir ../shared/data]
        [--jobs N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from _corpus import DEFAULT_DATA, atomic_path, machine_info, write_json_atomic

from sc_foundation.conf import CONFIG_ROOT, compose
from sc_foundation.data.io import write_h5ad_atomic
from sc_foundation.data.lifetime import pool_initializer

SNARE_RNA, SNARE_ATAC = "snare_mop/snare_mop_rna.h5ad", "snare_mop/snare_mop_atac.h5ad"

# The default task table. ``task``: finetune.py's task; ``files`` / ``modality_files``: inputs under --data-dir (str,
# or a dict of CorpusInput fields); ``subset``: a seeded subset of that many cells (the same cells of every file of the
# task) written to OUT/data first, None for all cells; ``overrides``: Hydra overrides of conf/finetune.yaml (the
# steps, validation interval and task keys). --max-epochs replaces every trainer.max_epochs, --set adds overrides.
TASKS: dict[str, dict] = {
    "annotation": {
        "task": "annotation",
        "description": "PBMC 68k subset (10x), 10 FACS-sorted cell types; test split scored",
        "files": ["pbmc68k_reduced/pbmc68k_reduced_counts.h5ad"],
        "subset": None,
        "overrides": ["label_key=cell_type"],
    },
    "annotation_cellbench": {
        "task": "annotation",
        "description": "CellBench: 3 lung-cancer cell lines, two protocols; test split scored (an easy case)",
        "files": [{"path": "cellbench_3cl/cellbench_3cl.h5ad", "batch_key": "batch"}],
        "subset": None,
        "overrides": ["label_key=cell_type"],
    },
    "annotation_shift_facs": {
        "task": "annotation",
        "within": "annotation",
        "description": "Study shift: trained on a seeded 700 cells of the FACS-sorted PBMC reference (Zheng et al., "
        "mudan_pbmc; 8 sort gates mapped by hand onto pbmc68k_reduced's labels, FACS_TO_PBMC68K), tested on the "
        "pbmc68k_reduced cells of those 8 types",
        "prepare": "facs_to_pbmc68k",
        "subset": None,
        "overrides": ["label_key=cell_type", "split.split_by=source", "split.test_groups=[pbmc68k_mapped.h5ad]"],
    },
    "annotation_unseen_type": {
        "task": "annotation",
        "within": "annotation",
        "kind": "held-out type",
        "description": "pbmc68k_reduced with CD19+ B cells kept out of training and validation: the test split's B "
        "cells score the refusal (unknown), the other test cells the classification",
        "files": ["pbmc68k_reduced/pbmc68k_reduced_counts.h5ad"],
        "subset": None,
        "overrides": ["label_key=cell_type", "holdout_label='CD19+ B'"],
    },
    "annotation_cellbench_shift": {
        "task": "annotation",
        "within": "annotation_cellbench",
        "description": "Protocol shift: CellBench trained on CEL-seq2, tested on every Drop-seq cell",
        "files": [{"path": "cellbench_3cl/cellbench_3cl.h5ad", "batch_key": "batch"}],
        "subset": None,
        "overrides": ["label_key=cell_type", "split.split_by=batch", "split.test_groups=[sc_dropseq]"],
    },
    "annotation_snare": {
        "task": "annotation",
        "description": "SNARE-seq mouse cortex RNA, a seeded 2000 cells of 12 libraries, 15 cell types; a stratified "
        "test split",
        "files": [SNARE_RNA],
        "subset": 2000,
        "overrides": ["label_key=cell_type"],
    },
    "annotation_snare_shift": {
        "task": "annotation",
        "within": "annotation_snare",
        "description": "Library shift: the same 2000 SNARE-seq cells, trained on 9 libraries, tested on every cell of "
        "libraries 09J, 09K and 09L",
        "files": [SNARE_RNA],
        "subset": 2000,
        "overrides": ["label_key=cell_type", "split.split_by=Batch", "split.test_groups=[09J,09K,09L]"],
    },
    "annotation_snare_unseen_type": {
        "task": "annotation",
        "within": "annotation_snare",
        "kind": "held-out type",
        "description": "The same 2000 SNARE-seq cells with the astrocytes kept out of training and validation: the "
        "test split's astrocytes score the refusal (unknown), the other test cells the classification",
        "files": [SNARE_RNA],
        "subset": 2000,
        "overrides": ["label_key=cell_type", "holdout_label=Astro"],
    },
    "integration": {
        "task": "integration",
        "description": "CellBench: protocols (CEL-seq2 / Drop-seq) as batches, 3 cell lines; all cells scored",
        "files": ["cellbench_3cl/cellbench_3cl.h5ad"],
        "subset": None,
        "overrides": [
            "batch_key=batch",
            "label_key=cell_type",
        ],
    },
    "integration_thinned": {
        "task": "integration",
        "description": "CellBench with a composition shift: H2228 thinned to 15% in CEL-seq2 and H1975 to 15% in "
        "Drop-seq (seeded), protocols as batches; all cells scored",
        "prepare": "thinned_cellbench",
        "subset": None,
        "overrides": ["batch_key=batch", "label_key=cell_type"],
    },
    "integration_snare": {
        "task": "integration",
        "description": "SNARE-seq mouse cortex RNA, a seeded 2000 cells: 12 libraries as batches (mild, with uneven "
        "type composition), 15 cell types; all cells scored",
        "files": [SNARE_RNA],
        "subset": 2000,
        "overrides": ["batch_key=Batch", "label_key=cell_type"],
    },
    "imputation": {
        "task": "imputation",
        "description": "PBMC 3k (10x v1), a seeded 1000 cells (scVI's 400 epochs stay in minutes): 10% of the non-zero "
        "counts hidden, scored on those in the panel",
        "files": [{"path": "pbmc3k/pbmc3k.h5ad", "gene_key": "gene_ids"}],
        "subset": 1000,
        "overrides": [],
    },
    "protein": {
        "task": "multimodal",
        "description": "ECCITE-seq PBMC: 49 surface proteins (CLR) predicted from RNA; test split scored",
        "files": ["eccite_pbmc/eccite_rna.h5ad"],
        "modality_files": ["eccite_pbmc/eccite_adt.h5ad"],
        "subset": None,
        "overrides": ["modality.kind=protein"],
    },
    "atac": {
        "task": "multimodal",
        "description": "SNARE-seq mouse cortex: 2000 most open peaks predicted from RNA (test split); joint embedding "
        "scored on 15 cell types (all cells)",
        "files": [SNARE_RNA],
        "modality_files": [SNARE_ATAC],
        "subset": 2000,
        # 20 epochs: the largest task (1,400 training cells, peaks as tokens) takes about a minute a seed.
        "overrides": ["modality.kind=atac", "label_key=cell_type", "trainer.max_epochs=20"],
    },
}

# The hand-made map of the FACS reference's sort gates (mudan_pbmc/pbmc_facs_reference.h5ad) onto pbmc68k_reduced's
# labels, which Zheng et al. derived from the same sorted populations. ``thelper`` (CD4+ helper T) has no
# pbmc68k_reduced label and leaves training; pbmc68k_reduced's Dendritic and CD34+ cells have no gate and leave the
# test.
FACS_TO_PBMC68K = {
    "bcells": "CD19+ B",
    "monocytes": "CD14+ Monocyte",
    "nk": "CD56+ NK",
    "regulatoryt": "CD4+/CD25 T Reg",
    "memoryt": "CD4+/CD45RO+ Memory",
    "naivet": "CD4+/CD45RA+/CD25- Naive T",
    "cytotoxict": "CD8+ Cytotoxic T",
    "naivecytotoxic": "CD8+/CD45RA+ Naive Cytotoxic",
}

# Headline metrics per kind of comparison: (key in metrics.json, higher is better).
HEADLINES = {
    "annotation": [("accuracy", True), ("macro_f1", True)],
    "integration": [("bio", True), ("batch", True), ("total", True), ("avg_bio", True)],
    "imputation": [("median_l1", False), ("pearson", True), ("pearson_log1p", True)],
    "prediction": [("pearson_feature_mean", True), ("pearson_cell_mean", True)],
    "embedding": [("nmi", True), ("ari", True), ("asw_label", True), ("avg_bio", True), ("bio", True)],
    # annotation probabilities (sc_foundation.tasks.calibration): ECE of the test cells after and before temperature
    "calibration": [("ece", False), ("ece_uncalibrated", False)],
    # a held-out type: its test cells refused, known test cells wrongly refused, AUROC of the refusal's score
    "refusal": [("unseen_refused", True), ("known_refused", False), ("auroc_unseen", True)],
}
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
# What a task's record takes from its first seed's run (the other seeds' are under ``runs``).
FIRST_SEED_FIELDS = (
    "data",
    "overrides",
    "finetune_wall_s",
    "output_dir",
    "metrics_file",
    "steps",
    "epochs",
    "stopped_early",
    "n_cells",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for quality.json, quality.md, PNGs and runs")
    parser.add_argument("--pretrained", type=Path, default=None, help="an export directory (default: pretrain one)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), help="tasks to run")
    parser.add_argument("--max-epochs", type=int, default=None, help="trainer.max_epochs (the budget) of every task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, the subsets and the training")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run every task once per seed (its splits, subsets and initialisation) and report mean and spread",
    )
    parser.add_argument("--full", action="store_true", help="three seeds: --seed, --seed + 1 and --seed + 2")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take a task's seed from the quality.json already in --out when it finished there with the same "
        "overrides (its metrics.json still on disk), instead of fine-tuning it again: add seeds to an earlier run",
    )
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override of conf/finetune.yaml for every task (repeatable), e.g. baselines.scvi=false",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared real-data folder")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="fine-tuning runs at once, each in its own process with an even share of the usable cores as torch "
        "threads (default: one per core, within 3 GiB of memory each, without CUDA; 1 with it); 1 runs them one by "
        "one in this process",
    )
    args = parser.parse_args(argv)
    if args.max_epochs is not None and args.max_epochs < 1:
        parser.error("--max-epochs must be at least 1")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    args.tasks = list(dict.fromkeys(args.tasks))
    if args.full and args.seeds:
        parser.error("--full and --seeds exclude each other")
    args.seeds = list(dict.fromkeys(args.seeds or ([args.seed + k for k in range(3)] if args.full else [args.seed])))
    # more workers than runs would only thin each run's threads
    args.jobs = min(default_jobs() if args.jobs is None else args.jobs, len(args.tasks) * len(args.seeds))
    return args


# ----------------------------------------------------------------------------------------------- outputs
def write_text_atomic(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def save_figure_atomic(figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def finite_or_none(value):
    """A JSON-safe number: NaN and infinities (undefined scores) become None."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------- pretrained model
def pretrain(out: Path, seed: int) -> dict:
    """Run the README's main command (``sc_foundation.training.pretrain.run`` on ``conf/pretrain.yaml``) into ``out``;
    its export/best."""
    from sc_foundation.training import pretrain as pretraining

    overrides = [f"output_dir={out}", f"data.store_dir={out / 'corpus_store'}", f"seed={seed}", *QUIET]
    cfg = compose("pretrain", overrides)
    started = time.perf_counter()
    result = pretraining.run(cfg)
    return {
        "path": str(result["best_export"]),
        "trained_here": True,
        "output_dir": str(out),
        "overrides": overrides,
        "steps": int(result["trainer"].global_step),
        "max_steps": int(cfg.trainer.max_steps),
        "model_group": shape_group(dict(cfg.model)),
        "corpus": {"datasets": list(cfg.data.datasets), "cells": int(result["report"].n_cells)},
        "wall_s": time.perf_counter() - started,
    }


def describe_export(path: Path) -> dict:
    """The architecture and tokenizer of an export (its config.json and gene_tokenizer.json)."""
    config = json.loads((path / "config.json").read_text())
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "vocab_size",
        "value_encoding",
        "n_bins",
        "pooling",
        "max_position_embeddings",
    )
    tokenizer_file = path / "gene_tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text()).get("config", {}) if tokenizer_file.exists() else {}
    return {"model": {key: config.get(key) for key in keys}, "tokenizer": tokenizer}


def steps_from_logs(export: Path) -> int | None:
    """The last logged training step of the run an export came from (``<run>/csv/version_*/metrics.csv``), if any."""
    import csv

    steps = []
    for metrics in export.parent.parent.glob("csv/version_*/metrics.csv"):
        with open(metrics) as handle:
            steps += [int(row["step"]) for row in csv.DictReader(handle) if row.get("step")]
    return max(steps) + 1 if steps else None


# ------------------------------------------------------------------------------------------------- tasks
def subset_files(relative: list, data_dir: Path, out: Path, n_cells: int, seed: int) -> list:
    """The same seeded ``n_cells`` cells of every file (rows sorted), written to ``out``; the new file specs."""
    import anndata

    specs = [dict(item) if isinstance(item, dict) else {"path": item} for item in relative]
    sizes = set()
    for spec in specs:
        backed = anndata.read_h5ad(data_dir / spec["path"], backed="r")
        sizes.add(backed.n_obs)
        backed.file.close()
    if len(sizes) != 1:
        raise ValueError(f"the files of a subset must have the same cells; they have {sorted(sizes)} rows")
    total = sizes.pop()
    rows = np.sort(np.random.default_rng(seed).choice(total, size=min(n_cells, total), replace=False))
    written = []
    for spec in specs:
        source = data_dir / spec["path"]
        path = out / f"{Path(spec['path']).stem}_{len(rows)}cells_seed{seed}.h5ad"
        backed = anndata.read_h5ad(source, backed="r")
        try:
            adata = backed[rows].to_memory()
        finally:
            backed.file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_h5ad_atomic(adata, path)
        written.append({**spec, "path": str(path)})
    return written


def hydra_value(spec) -> str:
    """A file spec (path string or dict of CorpusInput fields) as a Hydra override value, every string quoted."""

    def quote(text) -> str:
        return "'" + str(text).replace("\\", "\\\\").replace("'", "\\'") + "'"

    if isinstance(spec, dict):
        return "{" + ", ".join(f"{key}: {quote(value)}" for key, value in spec.items()) + "}"
    return quote(spec)


def facs_to_pbmc68k(data_dir: Path, out: Path, seed: int = 0, reference_cells: int | None = 700) -> list[dict]:
    """The FACS reference and pbmc68k_reduced with one label set (:data:`FACS_TO_PBMC68K`), written to ``out``:
    reference cells of an unmapped gate and pbmc68k cells of a type no gate sorted are left out, and a seeded
    ``reference_cells`` of the reference kept (None: all 1,949), which keeps the row's fine-tuning within minutes on
    2 cores. The file names (``facs_reference_mapped.h5ad``, ``pbmc68k_mapped.h5ad``) are the store's ``source``
    values the split names."""
    import anndata

    reference = anndata.read_h5ad(data_dir / "mudan_pbmc/pbmc_facs_reference.h5ad")
    query = anndata.read_h5ad(data_dir / "pbmc68k_reduced/pbmc68k_reduced_counts.h5ad")
    mapped = reference.obs["cell_type"].astype(str).map(FACS_TO_PBMC68K)
    reference = reference[mapped.notna().to_numpy()].copy()
    reference.obs = reference.obs.assign(cell_type=mapped.dropna().to_numpy())
    if reference_cells is not None and reference_cells < reference.n_obs:
        rows = np.sort(np.random.default_rng(seed).choice(reference.n_obs, size=reference_cells, replace=False))
        reference = reference[rows].copy()
    query = query[query.obs["cell_type"].astype(str).isin(set(FACS_TO_PBMC68K.values())).to_numpy()].copy()
    query.obs["cell_type"] = query.obs["cell_type"].astype(str)
    written = []
    for name, adata in (("facs_reference_mapped", reference), ("pbmc68k_mapped", query)):
        path = out / f"{name}.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_h5ad_atomic(adata, path)
        written.append({"path": str(path)})
    return written


# The composition shift of ``integration_thinned``: in each protocol one cell line (a different one) is thinned.
THINNED_LINES = {"sc_celseq2": "H2228", "sc_dropseq": "H1975"}


def thinned_cellbench(data_dir: Path, out: Path, seed: int = 0, share: float = 0.15) -> list[dict]:
    """CellBench with :data:`THINNED_LINES`: a seeded ``share`` (rounded up) of that line's cells kept in that
    protocol, every other cell kept; written to ``out/cellbench_thinned.h5ad``. The protocols then differ in
    composition (one line abundant in one, rare in the other), as batches of real samples do."""
    import anndata

    adata = anndata.read_h5ad(data_dir / "cellbench_3cl/cellbench_3cl.h5ad")
    rng = np.random.default_rng(seed)
    keep = np.ones(adata.n_obs, dtype=bool)
    for batch, line in THINNED_LINES.items():
        rows = np.flatnonzero((adata.obs["batch"] == batch).to_numpy() & (adata.obs["cell_type"] == line).to_numpy())
        keep[rows] = False
        keep[rng.choice(rows, size=math.ceil(share * len(rows)), replace=False)] = True
    path = out / "cellbench_thinned.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    return [{"path": str(write_h5ad_atomic(adata[keep].copy(), path))}]


PREPARE = {"facs_to_pbmc68k": facs_to_pbmc68k, "thinned_cellbench": thinned_cellbench}


def task_overrides(
    name: str, spec: dict, files: list, modality_files: list, args, pretrained: Path, seed: int
) -> list[str]:
    overrides = [
        f"task={spec['task']}",
        f"pretrained={hydra_value(pretrained)}",
        f"data.files=[{', '.join(map(hydra_value, files))}]",
        f"output_dir={hydra_value(args.out / 'tasks' / name / f'seed{seed}')}",
        f"seed={seed}",
        *QUIET,
        *spec["overrides"],
    ]
    if modality_files:
        overrides.append(f"modality.files=[{', '.join(hydra_value(f['path']) for f in modality_files)}]")
    if args.max_epochs is not None:
        overrides = [o for o in overrides if not o.startswith("trainer.max_epochs=")]
        overrides.append(f"trainer.max_epochs={args.max_epochs}")
    return [*overrides, *args.extra]


def prepare_run(name: str, args, pretrained: Path, record: dict, seed: int) -> list[str]:
    """Write the inputs of one task at one seed (its subset or relabelled files) and return its overrides of
    ``conf/finetune.yaml``; fills ``record`` with the data and the overrides. Runs in the main process, before any
    fine-tuning starts, so that two runs sharing a subset never write it at once."""
    spec = TASKS[name]
    if spec.get("prepare"):
        files = PREPARE[spec["prepare"]](args.data_dir, args.out / "data" / f"seed{seed}", seed)
        record["data"] = {"files": [f["path"] for f in files], "modality_files": [], "prepared": spec["prepare"]}
    else:
        files = [dict(f) if isinstance(f, dict) else {"path": f} for f in spec["files"]]
        record["data"] = {"files": [f["path"] for f in files]}
    modality_files = [{"path": f} for f in spec.get("modality_files", [])]
    record["data"]["modality_files"] = [f["path"] for f in modality_files]
    if spec.get("subset"):
        written = subset_files(files + modality_files, args.data_dir, args.out / "data", spec["subset"], seed)
        files, modality_files = written[: len(files)], written[len(files) :]
        record["data"]["subset"] = {
            "cells": spec["subset"],
            "seed": seed,
            "written": [f["path"] for f in written],
            "note": "a seeded random subset of the cells (the same cells in every file of the task)",
        }
    else:
        if not spec.get("prepare"):
            files = [{**f, "path": str(args.data_dir / f["path"])} for f in files]
        modality_files = [{"path": str(args.data_dir / f["path"])} for f in modality_files]
        record["data"]["subset"] = None
    files = [f["path"] if len(f) == 1 else f for f in files]
    record["overrides"] = task_overrides(name, spec, files, modality_files, args, pretrained, seed)
    return record["overrides"]


def reusable(earlier: dict | None, overrides: list[str]) -> dict | None:
    """The outcome of ``earlier`` (this task and seed's record in the ``quality.json`` already in ``--out``) when it
    finished with the same overrides and its ``metrics.json`` is still there (``--reuse``); else None."""
    if not earlier or earlier.get("status") != "ok" or earlier.get("overrides") != overrides:
        return None
    metrics_file = Path(earlier["metrics_file"])
    if not metrics_file.exists():
        return None
    return {"metrics": json.loads(metrics_file.read_text()), "output_dir": str(metrics_file.parent)}


# ------------------------------------------------------------------------------------------- concurrent runs
def cpu_cores() -> int:
    """CPU cores this process may use (its affinity mask, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


JOB_MEMORY_GIB = 3.0
"""Memory to plan per worker: the largest worker peak of the default table was 2.2 GiB (the ATAC row, stop 43)."""


def threads_per_job(jobs: int) -> int:
    """Each of ``jobs`` workers' share of the usable cores, at least one thread."""
    return max(1, cpu_cores() // jobs)


def default_jobs() -> int:
    """Runs at once by default: one per usable core on a CPU-only machine, as many as the memory holds at
    :data:`JOB_MEMORY_GIB` each, and one where CUDA is available (the runs would queue on its one device).

    The fine-tuned models are small (batches of 32 cells, 64 wide) and do not keep two threads busy: on the 2-core
    Xeon, a one-thread run beside another takes 1.5-1.6x as long as a two-thread run alone, so two at once get about
    1.3x as much done; the default table took 1,518 s against about 1,990 s one after another (BENCHMARKS.md, "The
    quality table's runs side by side").
    """
    import torch

    if torch.cuda.is_available():
        return 1
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cpu_cores(), int(memory_gib // JOB_MEMORY_GIB)))


def fine_tune(overrides: list[str]) -> dict:
    """Compose ``conf/finetune.yaml`` with ``overrides`` and run the task (in a pool worker, or in this process with
    ``--jobs 1``). Returns the run's ``metrics`` and ``output_dir`` with its cost (``finetune_wall_s``, the torch
    threads it had, the process's peak resident memory), or its ``error`` and ``traceback``: a failing run must
    reach the table as a failure, not break the pool."""
    import resource

    import torch

    from sc_foundation import tasks

    started = time.perf_counter()
    try:
        result = tasks.run(compose("finetune", overrides))
        outcome = {"metrics": result["metrics"], "output_dir": str(result["output_dir"])}
    except Exception as error:
        outcome = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    outcome["finetune_wall_s"] = time.perf_counter() - started
    outcome["torch_threads"] = torch.get_num_threads()
    outcome["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux
    return outcome


class InlineExecutor:
    """The pool's ``submit`` for ``--jobs 1``: each run in this process, at submission, with every thread."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        future.set_result(fn(*args))
        return future


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
"""What a worker's thread pools read when its libraries load: torch's and numba's shared OpenMP pool, BLAS."""


@contextlib.contextmanager
def executor(jobs: int) -> Iterator:
    """``jobs`` spawned worker processes sharing the usable cores evenly, or :class:`InlineExecutor` for one job.

    The workers' thread counts are set in the environment they start with, before they import anything: numba's
    OpenMP layer (scanpy's neighbours) resizes the OpenMP pool it shares with torch to NUMBA_NUM_THREADS, one per
    core by default, so a ``torch.set_num_threads`` in a running worker does not hold. The variables are restored
    when the pool closes. Spawned, not forked: a fork would copy the parent's torch and JAX thread pools mid-state.
    The workers die with this process (``sc_foundation.data.lifetime``): a killed table used to leave its two
    workers fine-tuning on, orphaned, for up to 15 minutes (a plain ``kill`` of a worker did not stop it either).
    """
    if jobs == 1:
        yield InlineExecutor()
        return
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(threads_per_job(jobs)) for name in THREAD_VARIABLES})
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"), **pool_initializer())
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def submission_order(units: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """``(task, seed index, seed)`` units, the long ones first: the integration and imputation rows train 60-100
    epochs beside an scVI baseline (4-8 minutes each on 2 cores, stop 41), the others a few dozen epochs (under 2
    minutes). Started first, the long runs leave the short ones to fill the other workers, so the table does not end
    waiting on one long run."""
    return sorted(units, key=lambda unit: TASKS[unit[0]]["task"] not in ("integration", "imputation"))


def comparisons(task: str, metrics: dict) -> dict[str, dict]:
    """The headline tables of one run's metrics.json."""
    if task == "annotation" and "calibration" in metrics:
        # a frozen stage (finetune.weight_ensemble, finetune.head_from_frozen): the frozen head, and with an ensemble
        # the fine-tuned model before averaging, scored on the same test cells, as rows of their own
        stages = metrics.get("stages") or {}
        ours = {"model": metrics["model"]} | {
            f"{name} (stage)": stages[name] for name in ("frozen", "tuned") if name in stages
        }
        tables = {task: compare(task, ours, metrics["baselines"], "model")}
        calibration = metrics["calibration"]
        ours, baseline = calibration["model"], {"hvg_logreg": calibration["hvg_logreg"]}
        tables["calibration"] = compare("calibration", {"model": ours}, baseline, "model")
        if "unseen_refused" in ours:
            # two refusals each: by the top probability, and by novelty (the distance to the training cells) in
            # our embedding and in the PCA logistic regression's input; novelty is the one annotate() offers
            refusals, peers = {"model": ours}, dict(baseline)
            if "novelty" in ours:
                # the stored space first (what annotate uses), then the other one, scored in the same run
                others = {
                    f"model_novelty_{space}": report
                    for space, report in ours.get("novelty_by_space", {}).items()
                    if space != ours["novelty"].get("space")
                }
                refusals = {"model_novelty": ours["novelty"], **others, **refusals}
                peers["pca_novelty"] = calibration["pca_novelty"]
            tables["refusal"] = compare("refusal", refusals, peers, next(iter(refusals)))
        return tables
    if task in ("annotation", "integration", "imputation"):
        return {task: compare(task, {"model": metrics["model"]}, metrics["baselines"], "model")}
    tables = {
        "prediction": compare(
            "prediction", {"model": metrics["prediction"]["model"]}, metrics["prediction"]["baselines"], "model"
        )
    }
    if "embedding" in metrics:
        embedding = metrics["embedding"]
        tables["embedding"] = compare("embedding", embedding["model"], embedding["baselines"], "joint")
    return tables


def compare(kind: str, ours: dict[str, dict], baselines: dict[str, dict], primary: str) -> dict:
    """One table: values per method, the best method per metric, and per metric whether each of our rows beats
    every (non-skipped) baseline: ``win`` (strictly better than all), ``tie`` (equal to the best baseline) or
    ``loss``; ``beats_all_baselines`` is whether the ``primary`` row wins every metric."""
    headline = HEADLINES[kind]
    skipped = {name: scores["skipped"] for name, scores in baselines.items() if "skipped" in scores}
    scored = {name: scores for name, scores in baselines.items() if "skipped" not in scores}
    rows = {
        name: {key: finite_or_none(scores.get(key)) for key, _ in headline}
        for name, scores in {**ours, **scored}.items()
    }
    best, verdicts = {}, {name: {} for name in ours}
    for key, higher in headline:
        sign = 1 if higher else -1
        values = {name: row[key] for name, row in rows.items() if row[key] is not None}
        best[key] = max(values, key=lambda name: sign * values[name]) if values else None
        baseline_values = [sign * rows[name][key] for name in scored if rows[name][key] is not None]
        target = max(baseline_values) if baseline_values else None
        for name in ours:
            value = rows[name][key]
            if value is None:
                verdicts[name][key] = "loss"
            elif target is None:
                verdicts[name][key] = "win"
            else:
                mine = sign * value
                verdicts[name][key] = "win" if mine > target else "tie" if mine == target else "loss"
    return {
        "metrics": [{"name": key, "higher_is_better": higher} for key, higher in headline],
        "ours": list(ours),
        "primary": primary,
        "baselines": list(scored),
        "skipped_baselines": skipped,
        "values": rows,
        "best": best,
        "verdict": verdicts,
        "beats_all_baselines": all(v == "win" for v in verdicts[primary].values()),
    }


def aggregate(tables: list[dict]) -> dict:
    """One table over seeds from the :func:`compare` tables of the same comparison at each seed: ``values`` are the
    means, ``std`` the standard deviations over seeds (ddof 1; 0 for one seed), ``per_seed`` the values in seed order.

    A row's verdict per metric weighs the gap to the best baseline's mean against the spread (the larger standard
    deviation of the two): ``win`` when ours is ahead by more than the spread, ``loss`` when behind by more, ``tie``
    within it; ``at_least_best`` is whether our mean is at least the best baseline's. With one seed the spread is 0,
    so the verdicts are :func:`compare`'s. A baseline skipped at any seed is left out; a value missing (None) at any
    seed leaves that mean None.
    """
    first = tables[0]
    headline = [(m["name"], m["higher_is_better"]) for m in first["metrics"]]
    skipped = {name: reason for table in tables for name, reason in table["skipped_baselines"].items()}
    baselines = [name for name in first["baselines"] if name not in skipped]
    names = [*first["ours"], *baselines]
    per_seed = {name: {key: [t["values"][name][key] for t in tables] for key, _ in headline} for name in names}

    def mean_std(values: list) -> tuple[float | None, float | None]:
        if any(v is None for v in values):
            return None, None
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    stats = {name: {key: mean_std(values) for key, values in row.items()} for name, row in per_seed.items()}
    values = {name: {key: m for key, (m, _) in row.items()} for name, row in stats.items()}
    std = {name: {key: d for key, (_, d) in row.items()} for name, row in stats.items()}
    best, verdicts, at_least, spreads = {}, {n: {} for n in first["ours"]}, {n: {} for n in first["ours"]}, {}
    for key, higher in headline:
        sign = 1 if higher else -1
        known = {name: values[name][key] for name in names if values[name][key] is not None}
        best[key] = max(known, key=lambda name: sign * known[name]) if known else None
        scored = [name for name in baselines if values[name][key] is not None]
        leader = max(scored, key=lambda name: sign * values[name][key]) if scored else None
        for name in first["ours"]:
            mine = values[name][key]
            if mine is None:
                verdicts[name][key], at_least[name][key] = "loss", False
                continue
            if leader is None:
                verdicts[name][key], at_least[name][key] = "win", True
                continue
            gap = sign * (mine - values[leader][key])
            spread = max(std[name][key], std[leader][key])
            spreads[key] = spread
            verdicts[name][key] = "win" if gap > spread else "loss" if gap < -spread else "tie"
            at_least[name][key] = gap >= 0
    return {
        "metrics": first["metrics"],
        "ours": first["ours"],
        "primary": first["primary"],
        "baselines": baselines,
        "skipped_baselines": skipped,
        "n_seeds": len(tables),
        "values": values,
        "std": std,
        "per_seed": per_seed,
        "best": best,
        "spread": spreads,
        "verdict": verdicts,
        "at_least_best": at_least,
        "beats_all_baselines": all(v == "win" for v in verdicts[first["primary"]].values()),
    }


# ----------------------------------------------------------------------------------------------- figures
def _scatter(ax, xy: np.ndarray, categories: np.ndarray, title: str, legend: bool) -> None:
    import matplotlib.pyplot as plt

    names = sorted(set(categories.tolist()))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for i, name in enumerate(names):
        chosen = categories == name
        ax.scatter(xy[chosen, 0], xy[chosen, 1], s=4, color=colours(i % colours.N), label=name, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3, frameon=False)


def umap_of(embedding: np.ndarray, seed: int) -> np.ndarray:
    """The 2-d UMAP (scanpy: 15-neighbour graph on the embedding itself) of an (n, d) embedding."""
    import anndata
    import scanpy as sc

    adata = anndata.AnnData(obs={"i": np.arange(len(embedding))})
    adata.obsm["X_emb"] = np.asarray(embedding, dtype=np.float32)
    sc.pp.neighbors(adata, use_rep="X_emb", n_neighbors=15, random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    return adata.obsm["X_umap"]


def umap_grid(embeddings: dict[str, np.ndarray], colourings: dict[str, np.ndarray], path: Path, seed: int) -> Path:
    """One row per embedding, one column per colouring (e.g. batch, cell type)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(
        len(embeddings), len(colourings), figsize=(4.2 * len(colourings) + 1.5, 3.6 * len(embeddings)), squeeze=False
    )
    for row, (name, embedding) in enumerate(embeddings.items()):
        xy = umap_of(embedding, seed)
        for col, (colour_name, categories) in enumerate(colourings.items()):
            _scatter(axes[row, col], xy, categories, f"{name}: by {colour_name}", legend=row == 0)
    figure.tight_layout()
    try:
        return save_figure_atomic(figure, path)
    finally:
        plt.close(figure)


def integration_figure(out: Path, run_dir: Path, seed: int) -> Path:
    with np.load(run_dir / "embeddings.npz") as saved:
        data = {key: saved[key] for key in saved.files}
    meta = ("cell_id", "batch", "label")
    embeddings = {("ours" if key == "model" else key): data[key] for key in data if key not in meta}
    colourings = {"batch": data["batch"].astype(str)}
    if "label" in data:
        colourings["cell type"] = data["label"].astype(str)
    return umap_grid(embeddings, colourings, out / "integration_umap.png", seed)


def atac_figure(out: Path, run_dir: Path, label_key: str, seed: int) -> Path:
    from sc_foundation.data.store import CorpusStore

    with np.load(run_dir / "embeddings.npz") as saved:
        embeddings = {f"ours: {key}": saved[key] for key in ("joint", "rna_only") if key in saved.files}
        cell_ids = saved["cell_id"].astype(str)
    obs = CorpusStore(run_dir / "store").obs
    if not np.array_equal(obs["cell_id"].to_numpy(dtype=str), cell_ids):
        raise ValueError("embeddings.npz and the task's store list different cells")
    return umap_grid(embeddings, {"cell type": obs[label_key].to_numpy(dtype=str)}, out / "atac_umap.png", seed)


def confusion_figure(out: Path, metrics: dict, name: str) -> Path:
    """Row-normalised confusion matrices (rows true, columns predicted) of ours and the HVG logistic regression."""
    import matplotlib.pyplot as plt

    panels = {"ours": metrics["model"]}
    if "hvg_logreg" in metrics.get("baselines", {}):
        panels["hvg_logreg (baseline)"] = metrics["baselines"]["hvg_logreg"]
    labels = metrics["model"]["labels"]
    size = 1.6 + 0.45 * len(labels)
    figure, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) + 1.0, size + 1.0), squeeze=False)
    for ax, (title, scores) in zip(axes[0], panels.items(), strict=True):
        matrix = np.asarray(scores["confusion_matrix"], dtype=float)
        matrix = matrix[: len(labels), : len(labels)]  # an "unknown" column, if any, is left out of the picture
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if matrix[i, j]:
                    colour = "white" if shares[i, j] > 0.5 else "black"
                    ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f}", fontsize=9)
    figure.tight_layout()
    try:
        return save_figure_atomic(figure, out / f"{name}_confusion.png")
    finally:
        plt.close(figure)


def figures_for(name: str, run: dict, args) -> list[Path]:
    task = TASKS[name]["task"]
    metrics, run_dir = run["metrics"], Path(run["output_dir"])
    if task == "annotation":
        return [confusion_figure(args.out, metrics, name)]
    if task == "integration":
        return [integration_figure(args.out, run_dir, args.seed)]
    if task == "multimodal" and "embedding" in metrics:
        return [atac_figure(args.out, run_dir, metrics["label_key"], args.seed)]
    return []


# ---------------------------------------------------------------------------------------------- markdown
VERDICT_MARK = {"win": "✓", "tie": "= (tie)", "loss": "✗"}


def _format(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _display(name: str, table: dict) -> str:
    if name not in table["ours"]:
        return name
    return "**ours**" if name == "model" else f"**ours: {name}**"


def _mean_std(table: dict, name: str, key: str) -> str:
    """A value, as ``mean ± sd`` when the table aggregates several seeds."""
    value = table["values"][name][key]
    if table.get("n_seeds", 1) > 1 and value is not None:
        return f"{value:.3f} ± {table['std'][name][key]:.3f}"
    return _format(value)


def table_markdown(title: str, table: dict) -> list[str]:
    keys = [m["name"] for m in table["metrics"]]
    heads = [f"{key} {'↑' if m['higher_is_better'] else '↓'}" for key, m in zip(keys, table["metrics"], strict=True)]
    seeds = table.get("n_seeds", 1)
    caption = f"**{title}**" + (f" (mean ± sd over {seeds} seeds)" if seeds > 1 else "")
    lines = [caption, "", "| method | " + " | ".join(heads) + " |", "| --- |" + " ---: |" * len(keys)]
    for name in table["values"]:
        cells = []
        for key in keys:
            text = _mean_std(table, name, key)
            cells.append(f"**{text}** (best)" if table["best"][key] == name else text)
        lines.append(f"| {_display(name, table)} | " + " | ".join(cells) + " |")
    for name in table["ours"]:
        marks = [VERDICT_MARK[table["verdict"][name][key]] for key in keys]
        label = "ours" if name == "model" else f"ours: {name}"
        lines.append(f"| {label} beats all baselines? | " + " | ".join(marks) + " |")
    for name, reason in table["skipped_baselines"].items():
        lines.append(f"\n_{name} baseline skipped: {reason}_")
    primary = table["primary"]
    lost = [key for key in keys if table["verdict"][primary][key] != "win"]
    who = "ours" if primary == "model" else f"ours ({primary})"
    if not lost:
        verdict = f"{who} beats every baseline on every metric: **yes**."
    else:
        details = []
        for key in lost:
            best = table["best"][key]
            tied = table["verdict"][primary][key] == "tie"
            details.append(f"{key} (tie, best: {best})" if tied else f"{key} (best: {best})")
        verdict = f"{who} beats every baseline on every metric: **no** — not on {', '.join(details)}."
    if seeds > 1:
        verdict += (
            " Over seeds, ✓ means ahead of the best baseline's mean by more than the spread (the larger sd), = within "
            "it, ✗ behind by more."
        )
    return [*lines, "", verdict, ""]


def shift_markdown(payload: dict) -> list[str]:
    """Each shift row beside the within-split row it comes from: our headline score against the best baseline's."""
    rows = []
    for name, record in payload["tasks"].items():
        within = record.get("within")
        if not within or "comparisons" not in record:
            continue
        for row in (within, name):
            table = payload["tasks"].get(row, {}).get("comparisons", {}).get("annotation")
            if table is None:
                rows.append(f"| {row} | not run | | | |")
                continue
            best = max(table["baselines"], key=lambda b: table["values"][b]["macro_f1"] or -1)
            gap = table["values"]["model"]["macro_f1"] - table["values"][best]["macro_f1"]
            mark = VERDICT_MARK[table["verdict"]["model"]["macro_f1"]]
            kind = "within" if row == within else TASKS.get(row, {}).get("kind", "shift")
            rows.append(
                f"| {row} ({kind}) | {_mean_std(table, 'model', 'macro_f1')} | {_mean_std(table, best, 'macro_f1')} "
                f"({best}) | {gap:+.3f} | {mark} |"
            )
    if not rows:
        return []
    header = [
        "**Shift rows beside their within-split rows** (macro-F1; mean ± sd when over several seeds)",
        "",
        "| row | ours | best baseline | ours - best | verdict |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    return [*header, *rows, ""]


def markdown(payload: dict) -> str:
    pretrained = payload["pretrained"]
    machine = payload["machine"]
    lines = [
        "# Fine-tuning quality: ours against the baselines",
        "",
        f"- command: `{payload['command']}`",
        f"- started: {payload['started']}; finished: {payload.get('finished') or 'running'}; "
        f"total wall time {payload['wall_s']:.0f} s",
        f"- machine: {machine['cpu_model']}, {machine['cpus_usable']} usable CPUs, {machine['memory_gb']} GB; "
        f"torch {machine['torch']}; load average before {machine['load_average_1_5_15']}, "
        f"after {machine.get('load_average_after_1_5_15', 'n/a')}",
        "- runs: "
        + (
            "one at a time in this process"
            if payload.get("jobs", 1) == 1
            else f"{payload['jobs']} at once, {payload['threads_per_job']} torch thread(s) each (a task's wall time "
            "is the sum of its runs' own times)"
        ),
    ]
    if pretrained.get("path"):
        model = pretrained.get("config", {}).get("model", {})
        steps = pretrained.get("steps")
        origin = "pretrained by this run" if pretrained.get("trained_here") else "given with --pretrained"
        lines.append(
            f"- pretrained model: `{pretrained['path']}` ({origin}; {pretrained.get('model_group', 'model')} "
            f"{model.get('hidden_size')} wide, {model.get('num_hidden_layers')} layers, "
            f"{model.get('value_encoding')} values, {steps if steps is not None else 'unknown'} pretraining steps"
            + (f", {pretrained['wall_s']:.0f} s" if pretrained.get("wall_s") else "")
            + ")"
        )
    if pretrained.get("error"):
        lines.append(f"- pretraining **failed**: {pretrained['error']}")
    lines += [
        "- ✓ ours strictly better than every baseline, = tie with the best baseline, ✗ a baseline is better; "
        "↑ higher is better, ↓ lower is better; best value per column in bold.",
        "",
    ]
    summary = payload["summary"]
    overall = [f"{name}: {'yes' if ok else 'no'}" for name, ok in summary["beats_all_baselines"].items()]
    lines += [f"**Beats every baseline** — {'; '.join(overall) or 'no task finished'}."]
    if summary["failed"]:
        lines.append(f"**Failed tasks**: {', '.join(summary['failed'])}.")
    lines += [
        "",
        "| task | status | beats all baselines | fine-tuning epochs (steps) | wall time (s) |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for name, record in payload["tasks"].items():
        beats = summary["beats_all_baselines"].get(name)
        mark = "n/a" if beats is None else "✓ yes" if beats else "✗ no"
        wall = "" if record.get("wall_s") is None else f"{record['wall_s']:.0f}"
        trained = "" if record.get("steps") is None else f"{record.get('epochs')} ({record['steps']})"
        if record.get("stopped_early"):
            trained += ", stopped early"
        lines.append(f"| {name} | {record['status']} | {mark} | {trained} | {wall} |")
    lines.append("")
    lines += shift_markdown(payload)
    for name, record in payload["tasks"].items():
        lines += [f"## {name}", "", f"{record['description']}", ""]
        runs = record.get("runs", {})
        if len(runs) > 1:
            walls = ", ".join(
                f"seed {seed}: {run.get('wall_s', 0):.0f} s ({run['status']})" for seed, run in runs.items()
            )
            lines.append(f"- seeds: {walls}")
        data = record.get("data", {})
        if data:
            subset = data.get("subset")
            note = f"; seeded subset of {subset['cells']} cells (seed {subset['seed']})" if subset else ""
            lines.append(f"- data: {', '.join(f'`{f}`' for f in data['files'] + data['modality_files'])}{note}")
        if record.get("n_cells"):
            cells = ", ".join(f"{split} {n}" for split, n in record["n_cells"].items())
            lines.append(f"- cells: {cells}; fine-tuning: {record.get('epochs')} epochs, {record.get('steps')} steps")
        if record.get("wall_s") is not None:
            lines.append(
                f"- wall time: {record['wall_s']:.0f} s (fine-tuning and scoring "
                f"{record.get('finetune_wall_s') or 0:.0f} s, figures {record.get('figures_wall_s') or 0:.0f} s)"
            )
        if record.get("metrics_file"):
            lines.append(f"- metrics: `{record['metrics_file']}`")
        for figure in record.get("figures", []):
            lines.append(f"- figure: `{figure}`")
        lines.append("")
        if record["status"] == "error":
            lines += [f"**FAILED**: `{record['error']}`", ""]
        elif record["status"] != "ok":
            lines += [f"_{record['status']}_", ""]
        for kind, table in record.get("comparisons", {}).items():
            lines += table_markdown(kind, table)
        if record.get("figure_error"):
            lines += [f"**Figure failed**: `{record['figure_error']}`", ""]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the run
def summarise(payload: dict) -> None:
    tasks = payload["tasks"]
    payload["summary"] = {
        "ok": [name for name, r in tasks.items() if r["status"] == "ok"],
        "failed": [name for name, r in tasks.items() if r["status"] == "error" or r.get("figure_error")],
        "beats_all_baselines": {
            name: all(t["beats_all_baselines"] for t in r["comparisons"].values())
            for name, r in tasks.items()
            if r.get("comparisons")
        },
    }


def write_outputs(payload: dict, out: Path) -> None:
    summarise(payload)
    write_json_atomic(out / "quality.json", payload)
    write_text_atomic(out / "quality.md", markdown(payload))


def record_run(name: str, record: dict, outcome: dict) -> None:
    """Fill a seed's ``record`` from its fine-tuning ``outcome`` (:func:`fine_tune`'s, or a reused one)."""
    metrics = outcome["metrics"]
    record["output_dir"] = outcome["output_dir"]
    record["metrics_file"] = str(Path(outcome["output_dir"]) / "metrics.json")
    for key in ("steps", "epochs", "stopped_early", "n_cells"):
        record[key] = metrics.get(key)
    record["comparisons"] = comparisons(TASKS[name]["task"], metrics)


def finish_task(record: dict) -> None:
    """A task's status, its tables over seeds (:func:`aggregate`) and its wall time once every seed has run."""
    runs = list(record["runs"].values())
    failed = [run for run in runs if run["status"] == "error"]
    record["status"] = "error" if failed else "ok"
    if failed:
        record["error"] = f"seed {failed[0]['seed']}: {failed[0]['error']}"
        record["traceback"] = failed[0]["traceback"]
    tables = [run["comparisons"] for run in runs if run["status"] == "ok"]
    if tables:
        kinds = [kind for kind in tables[0] if all(kind in table for table in tables)]
        record["comparisons"] = {kind: aggregate([table[kind] for table in tables]) for kind in kinds}
    # the runs' own times (each on its worker), not the span from first to last: with --jobs > 1 runs overlap
    record["wall_s"] = sum(run.get("wall_s", 0.0) for run in runs) + record.get("figures_wall_s", 0.0)


def run_tasks(payload: dict, args, previous: dict, checkpoint) -> None:
    """Every task at every seed: inputs prepared here, fine-tuning by ``args.jobs`` concurrent workers (or in this
    process), each finished run recorded and ``checkpoint()`` called as it arrives, the figures of each task's first
    seed drawn here, a task's tables aggregated once its last seed is in."""
    pretrained = Path(payload["pretrained"]["path"])
    pending: dict[Future, tuple[str, int, int, float]] = {}

    def arrive(name: str, i: int, seed: int, outcome: dict, prepare_s: float) -> None:
        record = payload["tasks"][name]
        run_record = record["runs"][str(seed)]
        if "error" in outcome:
            run_record.update(status="error", error=outcome["error"], traceback=outcome.get("traceback", ""))
            print(f"quality: task {name}, seed {seed} failed\n{run_record['traceback']}", file=sys.stderr, flush=True)
        else:
            record_run(name, run_record, outcome)
            run_record["status"] = "ok"
        for key in ("finetune_wall_s", "torch_threads", "peak_rss_gib"):
            if key in outcome:
                run_record[key] = outcome[key]
        if not run_record.get("reused"):  # a reused run keeps its own wall time
            run_record["wall_s"] = prepare_s + outcome.get("finetune_wall_s", 0.0)
        if i == 0:  # the first seed's run describes the task (data, cells, epochs, files) and draws its figures
            record.update({key: value for key, value in run_record.items() if key in FIRST_SEED_FIELDS})
            if run_record["status"] == "ok":
                figures_started = time.perf_counter()
                try:
                    record["figures"] = [str(p) for p in figures_for(name, outcome, args)]
                    payload["figures"] += record["figures"]
                except Exception as error:
                    record["figure_error"] = f"{type(error).__name__}: {error}"
                    record["figure_traceback"] = traceback.format_exc()
                    traceback.print_exc()
                record["figures_wall_s"] = time.perf_counter() - figures_started
        if all(run["status"] in ("ok", "error") for run in record["runs"].values()):
            finish_task(record)
        checkpoint()

    def collect(future: Future) -> None:
        name, i, seed, prepare_s = pending.pop(future)
        try:
            outcome = future.result()
        except Exception as error:  # the worker itself died (killed for memory, for instance)
            outcome = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        arrive(name, i, seed, outcome, prepare_s)

    with executor(args.jobs) as pool:
        units = [(name, i, seed) for name in args.tasks for i, seed in enumerate(args.seeds)]
        for name in args.tasks:
            payload["tasks"][name].update(status="running", seeds=args.seeds, runs={})
            for seed in args.seeds:
                payload["tasks"][name]["runs"][str(seed)] = {"seed": seed, "status": "queued"}
        checkpoint()
        for name, i, seed in submission_order(units):
            run_record = payload["tasks"][name]["runs"][str(seed)]
            prepared = time.perf_counter()
            try:
                overrides = prepare_run(name, args, pretrained, run_record, seed)
            except Exception as error:
                outcome = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
                arrive(name, i, seed, outcome, time.perf_counter() - prepared)
                continue
            source = previous.get("tasks", {}).get(name, {}).get("runs", {}).get(str(seed))
            earlier = reusable(source, overrides)
            if earlier is not None:
                run_record.update({k: v for k, v in source.items() if k not in ("status", "comparisons")})
                run_record["reused"] = True
                arrive(name, i, seed, earlier, 0.0)
                continue
            print(f"quality: task {name}, seed {seed}", flush=True)
            pending[pool.submit(fine_tune, overrides)] = (name, i, seed, time.perf_counter() - prepared)
            for future in [f for f in pending if f.done()]:  # with --jobs 1 the run has finished already
                collect(future)
        for future in as_completed(list(pending)):
            collect(future)


def main(argv: list[str] | None = None) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    earlier_file = args.out / "quality.json"
    previous = json.loads(earlier_file.read_text()) if args.reuse and earlier_file.exists() else {}
    started = time.perf_counter()
    shown = sys.argv[1:] if argv is None else argv
    payload = {
        "command": " ".join(["python benchmarks/quality.py", *shown]),
        "argv": list(shown),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "finished": None,
        "complete": False,
        "wall_s": 0.0,
        "machine": machine_info(),
        "seed": args.seed,
        "seeds": args.seeds,
        "max_epochs_override": args.max_epochs,
        "jobs": args.jobs,
        "threads_per_job": None if args.jobs == 1 else threads_per_job(args.jobs),
        "extra_overrides": args.extra,
        "data_dir": str(args.data_dir),
        "pretrained": {},
        "tasks": {
            name: {
                "status": "pending",
                "task": TASKS[name]["task"],
                "description": TASKS[name]["description"],
                "within": TASKS[name].get("within"),
            }
            for name in args.tasks
        },
        "figures": [],
    }
    with contextlib.suppress(ImportError):
        import torch

        payload["machine"]["torch_threads"] = torch.get_num_threads()

    def checkpoint() -> None:
        payload["wall_s"] = time.perf_counter() - started
        write_outputs(payload, args.out)

    try:
        if args.pretrained is not None:
            path = args.pretrained.resolve()
            payload["pretrained"] = {"path": str(path), "trained_here": False, "steps": steps_from_logs(path)}
        else:
            print("quality: pretraining the default model (train.py, conf/pretrain.yaml)", flush=True)
            payload["pretrained"] = pretrain(args.out / "pretrain", args.seed)
        payload["pretrained"]["config"] = describe_export(Path(payload["pretrained"]["path"]))
        payload["pretrained"].setdefault("model_group", shape_group(payload["pretrained"]["config"]["model"]))
    except Exception as error:
        payload["pretrained"]["error"] = f"{type(error).__name__}: {error}"
        payload["pretrained"]["traceback"] = traceback.format_exc()
        for record in payload["tasks"].values():
            record.update(status="error", error=f"no pretrained model: {payload['pretrained']['error']}")
        traceback.print_exc()
    checkpoint()

    if not payload["pretrained"].get("error"):
        run_tasks(payload, args, previous, checkpoint)

    payload["machine"]["load_average_after_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    payload["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    payload["complete"] = True
    checkpoint()
    print(markdown(payload))
    print(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.md'}")
    return payload


def shape_group(model: dict) -> str:
    """The conf/model group whose shape an export's config matches, else ``custom``."""
    from omegaconf import OmegaConf

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    for path in sorted((CONFIG_ROOT / "model").glob("*.yaml")):
        group = OmegaConf.load(path)
        if all(group.get(key) == model.get(key) for key in keys):
            return path.stem
    return "custom"


def exit_status(payload: dict) -> int:
    """1 when pretraining, a task or one of its figures failed, else 0."""
    return 1 if payload["summary"]["failed"] or payload["pretrained"].get("error") else 0


if __name__ == "__main__":
    raise SystemExit(exit_status(main()))
