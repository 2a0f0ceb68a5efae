"""The fine-tuning tasks, importable from the package: ``run(cfg)`` with a config composed from ``conf/finetune.yaml``
(:func:`compose_config`), or one task's ``run_<task>(cfg)``. ``finetune.py`` is the command line over :func:`run`.

Every task tokenizes the inputs with the pretrained model's own tokenizer into a corpus store, splits the cells into
seeded sets (``splits.json``), fine-tunes a head with early stopping on ``val/loss``, exports the best model to
``<output_dir>/export/best`` and scores that export next to baselines on the same cells in
``<output_dir>/metrics.json``.
No resume checkpoints are written: a fine-tuning run is short, and the export is what later steps load.

- ``task=annotation``: :class:`~sc_foundation.models.modeling.ScFoundationForCellClassification` on ``label_key``;
  train/val/test split, scored on the test cells against logistic-regression baselines.
- ``task=integration``: :class:`~sc_foundation.models.modeling.ScFoundationForBatchIntegration` with the batch from
  ``batch_key`` (stored as the store's ``batch`` column); train/val split, and the scIB metrics of the embedding of
  all cells (the scIB convention) against the unintegrated PCA, Harmony and scVI; the embeddings go to
  ``embeddings.npz``.
- ``task=imputation``: :class:`~sc_foundation.models.modeling.ScFoundationForImputation` on counts of which a seeded
10% of
  the non-zero entries were hidden first (the scVI protocol); train/val split, scored on the hidden entries of all
  cells against kNN smoothing, the gene means and scVI.
- ``task=multimodal``: :class:`~sc_foundation.models.modeling.ScFoundationForMultimodal` with a second modality
(protein or
  ATAC) from ``modality.files``; train/val/test split, the prediction from RNA scored on the test cells against ridge
  regression from the RNA PCA, and the joint embedding of all cells by scIB bio conservation.

The scVI baselines run when scvi-tools is installed (the ``baselines`` extra) and ``baselines.scvi`` is true;
``metrics.json`` says under ``skipped_baselines`` which did not run and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from sc_foundation.conf import compose
from sc_foundation.conf.checks import check_config
from sc_foundation.models.convert import detect, export_converted
from sc_foundation.training.runs import output_dir

from .annotation import balanced_class_weights, run_annotation
from .common import LIBRARY_SIZES, MODES, check_categories, check_cells, predict
from .imputation import run_imputation
from .integration import run_integration
from .multimodal import run_multimodal
from .weight_ensemble import check_frozen_stage

__all__ = [
    "LIBRARY_SIZES",
    "MODES",
    "TASKS",
    "balanced_class_weights",
    "check_categories",
    "check_cells",
    "compose_config",
    "predict",
    "run",
    "run_annotation",
    "run_imputation",
    "run_integration",
    "run_multimodal",
]

TASKS = {
    "annotation": run_annotation,
    "integration": run_integration,
    "imputation": run_imputation,
    "multimodal": run_multimodal,
}


def compose_config(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """``conf/finetune.yaml`` composed with Hydra ``overrides`` (``["task=annotation", "pretrained=DIR", ...]``), as
    ``sc-foundation finetune`` would see it on the command line; for notebooks, benchmarks and tests. ``config_dir``:
    a folder of one's own configs, searched before the package's (:func:`sc_foundation.conf.compose`)."""
    return compose("finetune", overrides, config_dir)


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Everything ``finetune.py`` does, callable from tests with a composed config (and extra Trainer callbacks)."""
    check_config(cfg, "finetune")  # a bad override fails here, before any conversion, store or training
    if cfg.task_name not in TASKS:
        raise ValueError(f"task_name must be one of {sorted(TASKS)}, got {cfg.task_name!r}")
    if cfg.finetune.mode not in MODES:
        raise ValueError(f"finetune.mode must be one of {MODES}, got {cfg.finetune.mode!r}")
    check_frozen_stage(cfg)
    if cfg.data.get("library_size", "input") not in LIBRARY_SIZES:
        raise ValueError(f"data.library_size must be one of {LIBRARY_SIZES}, got {cfg.data.library_size!r}")
    # A published scGPT or Geneformer folder is converted once into our export, which every task then reads.
    if detect(cfg.pretrained) is not None:
        cfg.pretrained = str(export_converted(cfg.pretrained, output_dir(cfg) / "converted"))
    return TASKS[cfg.task_name](cfg, callbacks)
