"""Fine-tuning entry point: ``python finetune.py task=annotation pretrained=DIR 'data.files=[...]' [overrides]``.

Cell-type annotation: checks the label column of every input, tokenizes the inputs with the pretrained model's own
tokenizer into a corpus store, splits the cells into seeded train/val/test sets (``splits.json``), fine-tunes
:class:`~sc_foundation.modeling.ScFoundationForCellClassification` (early stopping on ``val/loss``) and exports the
best model to ``<output_dir>/export/best``. That export is then scored on the test cells, next to logistic-regression
baselines on the same cells, in ``<output_dir>/metrics.json``. No resume checkpoints are written: a fine-tuning run
is short, and the export is what later steps load.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import hydra
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping

from sc_foundation.data import CorpusDataModule, split_train_val_test
from sc_foundation.datasets import corpus_inputs
from sc_foundation.evaluation import UNKNOWN, classification_metrics, logistic_regression_baselines, store_counts
from sc_foundation.export import load_pretrained
from sc_foundation.genes import _atomic_write_text
from sc_foundation.modeling import ScFoundationForCellClassification
from sc_foundation.store import RESERVED_COLUMNS, CorpusInput, CorpusStore, build_store
from sc_foundation.tokenization import GeneTokenizer
from sc_foundation.training import TrainingModule
from train import ExportBest, export, output_dir

MODES = ("full", "frozen", "lower_lr")


def check_labels(inputs: Sequence, label_key: str) -> None:
    """Refuse inputs whose labels cannot train a classifier, before anything is tokenized.

    Raises:
        ValueError: ``label_key`` is not an obs column of a file (naming the file and its columns), labels are
            missing (how many, in which file, which cells), or all cells share one class.
    """
    classes = set()
    for spec in map(CorpusInput.coerce, inputs):
        with spec.open() as source:
            obs = source.obs
            if label_key not in obs.columns:
                raise ValueError(
                    f"{spec.path}: label_key={label_key!r} is not an obs column; obs columns: {list(obs.columns)}"
                )
            labels = obs[label_key]
            missing = labels.isna().to_numpy()
            if missing.any():
                examples = ", ".join(map(str, obs.index[missing][:5]))
                raise ValueError(
                    f"{spec.path}: {int(missing.sum())} of {len(obs)} cells have no {label_key!r} label (NaN), "
                    f"e.g. cells {examples}. Drop or label those cells first."
                )
            classes.update(labels.astype(str).unique())
    if len(classes) < 2:
        raise ValueError(
            f"label_key={label_key!r} has a single class {sorted(classes)}: a classifier needs two or more"
        )


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """``n / (C * n_c)`` per class from (n,) training class ids, as scikit-learn's ``class_weight="balanced"``.

    A class absent from the training cells gets weight 1 (it never appears in the loss).
    """
    counts = np.bincount(labels, minlength=n_classes)
    return [len(labels) / (n_classes * c) if c else 1.0 for c in counts.tolist()]


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader) -> tuple[np.ndarray, np.ndarray]:
    """Logits (n, C) and store indices (n,) of every cell the loader yields, with the model in eval mode."""
    step = TrainingModule(model).eval()  # its forward drops batch keys the model does not take
    logits, cells = [], []
    for batch in loader:
        batch = {key: value.to(model.device) for key, value in batch.items()}
        logits.append(step(batch).logits.float().cpu())
        cells.append(batch["cell_index"].cpu())
    return torch.cat(logits).numpy(), torch.cat(cells).numpy()


def call_classes(logits: np.ndarray, threshold: float | None) -> np.ndarray:
    """(n,) predicted class ids from logits (n, C); :data:`UNKNOWN` where the top probability is below
    ``threshold`` (None calls every cell)."""
    probabilities = torch.from_numpy(logits).softmax(-1).numpy()
    predicted = probabilities.argmax(-1)
    if threshold is not None:
        predicted = np.where(probabilities.max(-1) < threshold, UNKNOWN, predicted)
    return predicted


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Everything ``finetune.py`` does, callable from tests with a composed config (and extra Trainer callbacks)."""
    if cfg.finetune.mode not in MODES:
        raise ValueError(f"finetune.mode must be one of {MODES}, got {cfg.finetune.mode!r}")
    if cfg.class_weights not in ("balanced", "none"):
        raise ValueError(f"class_weights must be 'balanced' or 'none', got {cfg.class_weights!r}")
    out = output_dir(cfg)
    label_key, split = cfg.label_key, cfg.split
    inputs = corpus_inputs([], OmegaConf.to_container(cfg.data.files, resolve=True))
    check_labels(inputs, label_key)
    tokenizer = GeneTokenizer.from_pretrained(cfg.pretrained)
    obs_keys = [key for key in dict.fromkeys([label_key, split.split_by]) if key and key not in RESERVED_COLUMNS]
    report = build_store(
        inputs,
        cfg.data.store_dir or out / "store",
        tokenizer=tokenizer,
        obs_keys=obs_keys,
        chunk_size=cfg.data.chunk_size,
        num_workers=cfg.data.build_workers,
    )
    print(report.format())

    store = CorpusStore(report.path)
    names = sorted(store.obs[label_key].astype(str).unique())
    labels = pd.Categorical(store.obs[label_key].astype(str), categories=names).codes.astype(np.int64)
    splits = split_train_val_test(
        store,
        split.val_fraction,
        split.test_fraction,
        split.seed,
        labels=labels if split.stratify and split.split_by is None else None,
        group_by=split.split_by,
    )
    splits_record = {
        name: {"store_index": rows.tolist(), "cell_id": store.obs["cell_id"].iloc[rows].tolist()}
        for name, rows in splits.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "splits.json", json.dumps({"seed": split.seed, **splits_record}))
    datamodule = CorpusDataModule(
        report.path,
        cfg.data.batch_size,
        mask_ratio=None,
        group_by_length=cfg.data.group_by_length,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        labels=labels,
        splits=splits,
    )

    pl.seed_everything(cfg.seed, workers=True)
    weights = balanced_class_weights(labels[splits["train"]], len(names)) if cfg.class_weights == "balanced" else None
    model = ScFoundationForCellClassification.from_pretrained(
        cfg.pretrained,
        new_heads=["classifier"],
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        class_weights=weights,
        classifier_dropout=cfg.classifier_dropout,
    )
    model.train()  # from_pretrained returns it in eval mode, which Lightning would keep (no dropout)
    if cfg.finetune.mode == "frozen":
        model.base_model.requires_grad_(False)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    module = TrainingModule(
        model,
        max_steps=trainer_kwargs["max_steps"],
        backbone_lr_ratio=cfg.finetune.backbone_lr_ratio if cfg.finetune.mode == "lower_lr" else 1.0,
        **OmegaConf.to_container(cfg.optim),
    )
    logger = hydra.utils.instantiate(cfg.logger, save_dir=str(out)) if cfg.get("logger") else False
    best = ExportBest(tokenizer, out / "export" / "best")
    stopping = EarlyStopping(monitor="val/loss", mode="min", patience=cfg.early_stopping.patience)
    trainer = pl.Trainer(
        **trainer_kwargs,
        default_root_dir=str(out),
        logger=logger,
        callbacks=[best, stopping, *callbacks],
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    if not (best.directory / "config.json").exists():  # no validation ran: the final weights are the best known
        export(trainer, module, tokenizer, best.directory)

    # Score the export itself: what users load is what the numbers describe.
    finetuned = load_pretrained(best.directory)
    logits, cells = predict_logits(finetuned, datamodule.test_dataloader())
    predicted = call_classes(logits, cfg.unknown_threshold)
    baselines = logistic_regression_baselines(
        store_counts(store, inputs),
        labels,
        splits,
        names,
        n_top_genes=cfg.baselines.n_top_genes,
        n_pcs=cfg.baselines.n_pcs,
        seed=cfg.seed,
    )
    metrics = {
        "task": "annotation",
        "label_key": label_key,
        "finetune_mode": cfg.finetune.mode,
        "unknown_threshold": cfg.unknown_threshold,
        "n_cells": {name: len(rows) for name, rows in splits.items()},
        "steps": trainer.global_step,
        "model": classification_metrics(labels[cells], predicted, names),
        "baselines": baselines,
    }
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    model_f1, baseline_f1 = metrics["model"]["macro_f1"], baselines["hvg_logreg"]["macro_f1"]
    print(f"test macro-F1 {model_f1:.3f} (HVG logistic regression {baseline_f1:.3f}); {out / 'metrics.json'}")
    return {
        "output_dir": out,
        "store": report.path,
        "splits": splits,
        "labels": labels,
        "metrics": metrics,
        "export": best.directory,
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
    }


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
