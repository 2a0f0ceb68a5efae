"""The fine-tuning tasks, importable from the package: ``run(cfg)`` with a config composed from ``conf/finetune.yaml``
(:func:`compose_config`), or one task's ``run_<task>(cfg)``. ``finetune.py`` is the command line over :func:`run`.

Every task tokenizes the inputs with the pretrained model's own tokenizer into a corpus store, splits the cells into
seeded sets (``splits.json``), fine-tunes a head with early stopping on ``val/loss``, exports the best model to
``<output_dir>/export/best`` and scores that export next to baselines on the same cells in
``<output_dir>/metrics.json``.
No resume checkpoints are written: a fine-tuning run is short, and the export is what later steps load.

- ``task=annotation``: :class:`~sc_foundation.modeling.ScFoundationForCellClassification` on ``label_key``;
  train/val/test split, scored on the test cells against logistic-regression baselines.
- ``task=integration``: :class:`~sc_foundation.modeling.ScFoundationForBatchIntegration` with the batch from
  ``batch_key`` (stored as the store's ``batch`` column); train/val split, and the scIB metrics of the embedding of
  all cells (the scIB convention) against the unintegrated PCA, Harmony and scVI; the embeddings go to
  ``embeddings.npz``.
- ``task=imputation``: :class:`~sc_foundation.modeling.ScFoundationForImputation` on counts of which a seeded 10% of
  the non-zero entries were hidden first (the scVI protocol); train/val split, scored on the hidden entries of all
  cells against kNN smoothing, the gene means and scVI.
- ``task=multimodal``: :class:`~sc_foundation.modeling.ScFoundationForMultimodal` with a second modality (protein or
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

from ..convert import detect, export_converted
from ..runs import output_dir
from .annotation import balanced_class_weights, run_annotation
from .common import MODES, check_categories, check_cells, predict
from .imputation import run_imputation
from .integration import run_integration
from .multimodal import run_multimodal

__all__ = [
    "CONFIG_DIR",
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

# The Hydra configs (conf/ beside the package in a source checkout, which the README's editable install keeps).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

TASKS = {
    "annotation": run_annotation,
    "integration": run_integration,
    "imputation": run_imputation,
    "multimodal": run_multimodal,
}


def compose_config(overrides: Sequence[str] = (), config_dir: str | Path = CONFIG_DIR) -> DictConfig:
    """``conf/finetune.yaml`` composed with Hydra ``overrides`` (``["task=annotation", "pretrained=DIR", ...]``), as
    ``finetune.py`` would see it on the command line; for notebooks, benchmarks and tests.

    Raises:
        FileNotFoundError: ``config_dir`` has no ``finetune.yaml`` (an install without the source checkout: pass the
            checkout's ``conf`` folder).
    """
    from hydra import compose, initialize_config_dir

    config_dir = Path(config_dir).resolve()
    if not (config_dir / "finetune.yaml").is_file():
        raise FileNotFoundError(
            f"{config_dir} has no finetune.yaml: pass config_dir=<the sc_foundation checkout>/conf "
            "(the README installs the checkout in editable mode, which keeps conf/ beside the package)"
        )
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="finetune", overrides=list(overrides))


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Everything ``finetune.py`` does, callable from tests with a composed config (and extra Trainer callbacks)."""
    if cfg.task_name not in TASKS:
        raise ValueError(f"task_name must be one of {sorted(TASKS)}, got {cfg.task_name!r}")
    if cfg.finetune.mode not in MODES:
        raise ValueError(f"finetune.mode must be one of {MODES}, got {cfg.finetune.mode!r}")
    # A published scGPT or Geneformer folder is converted once into our export, which every task then reads.
    if detect(cfg.pretrained) is not None:
        cfg.pretrained = str(export_converted(cfg.pretrained, output_dir(cfg) / "converted"))
    return TASKS[cfg.task_name](cfg, callbacks)
