"""``task=annotation``: cell-type annotation, a classifier on the cell embedding, scored on the test split against
logistic regressions on the same cells."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig

from sc_foundation.data.genes import _atomic_write_text
from sc_foundation.data.store import CorpusStore
from sc_foundation.inference import call_classes
from sc_foundation.models.export import add_export_file, load_pretrained
from sc_foundation.models.modeling import (
    ScFoundationForCellClassification,
)
from sc_foundation.models.novelty import (
    NOVELTY_FILE,
    PRETRAINED_WEIGHTS,
    NoveltyReference,
    backbone_state,
    backbone_with_weights,
    reference_choice,
)
from sc_foundation.tasks.calibration import (
    IGNORE,
    baseline_calibration,
    calibration_report,
    hold_out_label,
    novelty_report,
)
from sc_foundation.tasks.evaluation import classification_metrics, fit_logistic_regressions, store_counts
from sc_foundation.training.console import announce
from sc_foundation.training.runs import output_dir

from .common import (
    architecture_overrides,
    category_ids,
    check_categories,
    fit,
    other_rank_result,
    predict,
    predict_fields,
    read_inputs,
    task_datamodule,
    three_way_split,
    tokenize_inputs,
    training_record,
    write_splits,
)
from .convergence import ValidationMacroF1
from .weight_ensemble import check_frozen_stage, export_weight_ensemble, fit_frozen_stage, start_from_frozen_head


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """``n / (C * n_c)`` per class from (n,) training class ids, as scikit-learn's ``class_weight="balanced"``.

    A class absent from the training cells gets weight 1 (it never appears in the loss).
    """
    counts = np.bincount(labels, minlength=n_classes)
    return [len(labels) / (n_classes * c) if c else 1.0 for c in counts.tolist()]


NOVELTY_SPACES = ("pretrained", "classifier")
"""Where ``calibration.novelty_space`` measures a cell's distance to the training cells (the task's config)."""


def pretrained_backbone_state(cfg: DictConfig, model) -> dict[str, np.ndarray] | None:
    """The pretrained backbone's weights, for a novelty reference in its embedding: a CPU copy of ``model``'s
    backbone state (name -> array, floats as float32), taken before fine-tuning changes it; None where the reference
    lives in the classifier's own embedding (``calibration.novelty_space=classifier``, or a frozen backbone, whose
    embedding is the pretrained one already)."""
    if cfg.calibration.novelty_space == "classifier" or cfg.finetune.mode == "frozen":
        return None
    return backbone_state(model)


def novelty_references(
    cfg: DictConfig,
    exported,
    pretrained_state: dict[str, np.ndarray] | None,
    datamodule,
    splits: dict,
    classifier_embeddings: tuple[np.ndarray, np.ndarray],
    pca_space: np.ndarray,
) -> tuple[dict[str, tuple[NoveltyReference, np.ndarray]], NoveltyReference]:
    """Novelty references over the same training cells (a seeded choice of at most
    ``calibration.novelty_reference_cells``), thresholds from the validation cells, all read in evaluation mode: in
    the classifier's embedding and, with ``pretrained_state``, in the pretrained backbone's.

    Args:
        exported: the fine-tuned classifier as exported.
        pretrained_state: :func:`pretrained_backbone_state`, or None.
        classifier_embeddings: the classifier's (n_val, h) validation and (n_test, h) test embeddings, in the order
            of the datamodule's (deterministic) validation and test loaders.
        pca_space: (n_cells, n_pcs), the PCA logistic regression's input, for the baseline's reference.
    Returns:
        space name -> (its reference, the (n_test, h) test cells' embedding in it, in the test loader's order); and
        the PCA baseline's reference.
    """
    calibration = cfg.calibration
    train = splits["train"]
    rows = train[reference_choice(len(train), calibration.novelty_reference_cells, cfg.seed)]
    settings = {"neighbors": calibration.novelty_neighbors, "coverage": calibration.coverage}
    spaces = {"classifier": (exported, None, *classifier_embeddings)}
    if pretrained_state is not None:
        encoder = backbone_with_weights(exported, pretrained_state, PRETRAINED_WEIGHTS)
        val_embedding, _ = predict(encoder, datamodule.val_dataloader(), "cell_embedding")
        test_embedding, _ = predict(encoder, datamodule.test_dataloader(), "cell_embedding")
        spaces["pretrained"] = (encoder, pretrained_state, val_embedding, test_embedding)
    references = {}
    for space, (model, state, val_embedding, test_embedding) in spaces.items():
        train_embedding, _ = predict(model, datamodule.cells_dataloader(rows), "cell_embedding")
        reference = NoveltyReference.fit(train_embedding, val_embedding, encoder_state=state, **settings)
        references[space] = (reference, test_embedding)
    return references, NoveltyReference.fit(pca_space[rows], pca_space[splits["val"]], **settings)


def headline_scores(directory: Path, datamodule, labels: np.ndarray, names: list[str], threshold) -> dict:
    """Test accuracy and macro-F1 of the export ``directory`` over the known test cells (``labels`` (n_cells,))."""
    logits, cells = predict(load_pretrained(directory), datamodule.test_dataloader())
    known = labels[cells] != IGNORE
    scores = classification_metrics(labels[cells][known], call_classes(logits, threshold)[known], names)
    return {key: scores[key] for key in ("accuracy", "macro_f1")}


def run_annotation(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """``task=annotation``: see the module docstring."""
    if cfg.class_weights not in ("balanced", "none"):
        raise ValueError(f"class_weights must be 'balanced' or 'none', got {cfg.class_weights!r}")
    if cfg.calibration.novelty_space not in NOVELTY_SPACES:
        raise ValueError(
            f"calibration.novelty_space must be one of {NOVELTY_SPACES}, got {cfg.calibration.novelty_space!r}"
        )
    out = output_dir(cfg)
    label_key, split = cfg.label_key, cfg.split
    inputs = read_inputs(cfg)
    check_categories(inputs, label_key, need="a classifier needs two or more classes")
    tokenizer, store_path = tokenize_inputs(cfg, out, inputs, [label_key, split.split_by])

    store = CorpusStore(store_path)
    names, labels = category_ids(store, label_key)
    splits = three_way_split(cfg, out, store, labels)
    if cfg.holdout_label is not None:  # one type kept out of training: its test cells score the refusal
        names, labels, splits = hold_out_label(names, labels, splits, cfg.holdout_label)
        write_splits(cfg, out, store, splits)
    datamodule = task_datamodule(cfg, store_path, {"labels": labels}, splits)

    weights = balanced_class_weights(labels[splits["train"]], len(names)) if cfg.class_weights == "balanced" else None

    def build_model() -> ScFoundationForCellClassification:
        return ScFoundationForCellClassification.from_pretrained(
            cfg.pretrained,
            new_heads=["classifier"],
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            class_weights=weights,
            classifier_dropout=cfg.classifier_dropout,
            label_smoothing=cfg.label_smoothing,
            **architecture_overrides(cfg),
        )

    def fit_model(stage_cfg: DictConfig, stage_out: Path, model) -> tuple:
        return fit(stage_cfg, stage_out, model, tokenizer, datamodule, [ValidationMacroF1(), *callbacks])

    alpha, head_first = check_frozen_stage(cfg)
    frozen_best = fit_frozen_stage(cfg, out, build_model, fit_model) if alpha is not None or head_first else None
    pl.seed_everything(cfg.seed, workers=True)
    model = build_model()
    pretrained_state = pretrained_backbone_state(cfg, model)  # before fine-tuning changes the backbone
    if head_first:
        start_from_frozen_head(model, frozen_best)
    trainer, module, best = fit_model(cfg, out, model)
    if not trainer.is_global_zero:
        return other_rank_result(out, trainer, module, best)
    stages = None
    if frozen_best is not None:  # the frozen head, and the fine-tuned model before it is averaged, on the test cells
        scored = {"frozen": frozen_best} | ({"tuned": best} if alpha is not None else {})
        stages = {"weight_ensemble": alpha, "head_from_frozen": head_first} | {
            name: headline_scores(directory, datamodule, labels, names, cfg.unknown_threshold)
            for name, directory in scored.items()
        }
    if alpha is not None:
        export_weight_ensemble(frozen_best, best, alpha, tokenizer)

    # Score the export itself: what users load is what the numbers describe. Test cells of a held-out type
    # (label IGNORE) count only in the refusal scores.
    exported = load_pretrained(best)
    fields = ("logits", "cell_embedding")
    test_out, cells = predict_fields(exported, datamodule.test_dataloader(), fields)
    val_out, val_cells = predict_fields(exported, datamodule.val_dataloader(), fields)
    logits, val_logits = test_out["logits"], val_out["logits"]
    known = labels[cells] != IGNORE
    predicted = call_classes(logits, cfg.unknown_threshold)
    models, features = fit_logistic_regressions(
        store_counts(store, inputs),
        labels,
        splits["train"],
        n_top_genes=cfg.baselines.n_top_genes,
        n_pcs=cfg.baselines.n_pcs,
        seed=cfg.seed,
    )
    test = splits["test"][labels[splits["test"]] != IGNORE]
    baselines = {
        name: classification_metrics(labels[test], baseline.predict(features[test]), names)
        for name, baseline in models.items()
    }
    coverage = cfg.calibration.coverage
    pca_space = models["pca_logreg"][:-1].transform(features)  # (n_cells, n_pcs): the PCA logistic regression's input
    references, pca_reference = novelty_references(
        cfg,
        exported,
        pretrained_state,
        datamodule,
        splits,
        (val_out["cell_embedding"], test_out["cell_embedding"]),
        pca_space,
    )
    reports = {
        space: novelty_report(reference, embedding, labels[cells])
        for space, (reference, embedding) in references.items()
    }
    stored = "pretrained" if "pretrained" in references else "classifier"
    add_export_file(best, NOVELTY_FILE, references[stored][0].save)  # annotate() refuses novel cells with it
    calibration = {
        "model": calibration_report(val_logits, labels[val_cells], logits, labels[cells], coverage)
        | {"novelty": reports[stored] | {"space": stored}, "novelty_by_space": reports},
        "hvg_logreg": baseline_calibration(models["hvg_logreg"], features, labels, splits, len(names), coverage),
        "pca_novelty": novelty_report(pca_reference, pca_space[splits["test"]], labels[splits["test"]]),
    }
    metrics = {
        "task": "annotation",
        "label_key": label_key,
        "finetune_mode": cfg.finetune.mode,
        "unknown_threshold": cfg.unknown_threshold,
        "holdout_label": cfg.holdout_label,
        "n_cells": {name: len(rows) for name, rows in splits.items()},
        **training_record(trainer),
        "model": classification_metrics(labels[cells][known], predicted[known], names),
        "baselines": baselines,
        "calibration": calibration,
        "stages": stages,
    }
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    model_f1, baseline_f1 = metrics["model"]["macro_f1"], baselines["hvg_logreg"]["macro_f1"]
    announce(f"test macro-F1 {model_f1:.3f} (HVG logistic regression {baseline_f1:.3f}); {out / 'metrics.json'}")
    return {
        "output_dir": out,
        "store": store_path,
        "splits": splits,
        "labels": labels,
        "metrics": metrics,
        "export": best,
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
    }
