"""``task=multimodal``: RNA plus protein or ATAC measured in the same cells; the second modality predicted from RNA
and a joint embedding."""

from __future__ import annotations

import json
from collections.abc import Sequence

import anndata
import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig

from sc_foundation.data.genes import _atomic_write_text
from sc_foundation.data.store import CorpusInput, CorpusStore
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.modeling import (
    ScFoundationForMultimodal,
)
from sc_foundation.tasks.evaluation import (
    bio_metrics,
    multimodal_pca_baselines,
    store_counts,
)
from sc_foundation.tasks.modalities import (
    check_kind,
    normalise_modality,
    prediction_metrics,
    read_modality,
    ridge_from_rna_pca,
    select_features,
)
from sc_foundation.training.console import announce
from sc_foundation.training.runs import output_dir

from .common import (
    architecture_overrides,
    check_categories,
    fit,
    init_decoder_bias,
    other_rank_result,
    predict,
    read_inputs,
    task_datamodule,
    three_way_split,
    tokenize_inputs,
    training_record,
)


def run_multimodal(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """``task=multimodal``: see the module docstring.

    Prediction of the second modality from RNA is scored on the test cells against ridge regression from the RNA
    PCA (fitted on the training cells). The joint embedding (both modalities in) and the RNA-only embedding of all
    cells are scored with scIB bio-conservation metrics on ``label_key``, against the RNA PCA and a PCA of RNA and
    the second modality together.
    """
    out = output_dir(cfg)
    label_key, split, modality = cfg.label_key, cfg.split, cfg.modality
    check_kind(modality.kind)
    inputs = read_inputs(cfg)
    modality_files = list(modality.files or [])
    if len(modality_files) != len(inputs):
        raise ValueError(
            f"modality.files needs one {modality.kind} file per RNA file in data.files ({len(inputs)}), in the same "
            f"order; got {len(modality_files)}: {modality_files}"
        )
    if label_key is not None:
        check_categories(inputs, label_key, need="bio-conservation scores need two or more cell types")
    tokenizer, store_path = tokenize_inputs(cfg, out, inputs, [label_key, split.split_by])

    store = CorpusStore(store_path)
    measured = _read_second_modality(store, inputs, modality_files, modality.layer)  # (n_store_cells, n_all)
    features = select_features(measured, modality.kind, modality.n_features)
    names = measured.var_names[features].tolist()
    values = normalise_modality(measured.X[:, features], modality.kind)  # (n_store_cells, F)
    labels = None if label_key is None else store.obs[label_key].to_numpy(dtype=str)
    splits = three_way_split(cfg, out, store, None if labels is None else np.unique(labels, return_inverse=True)[1])
    datamodule = task_datamodule(cfg, store_path, {"modality_values": values}, splits)

    pl.seed_everything(cfg.seed, workers=True)
    model = ScFoundationForMultimodal.from_pretrained(
        cfg.pretrained,
        new_heads=["modality_embeddings", "modality_decoder"],
        modality=modality.kind,
        modality_features=names,
        modality_dropout=modality.dropout,
        modality_feature_scale=_feature_scale(values[splits["train"]])
        if modality.kind == "protein" and modality.scale_features
        else None,
        **architecture_overrides(cfg),
    )
    mean = values[splits["train"]].mean(0)
    init_decoder_bias(
        model.modality_decoder, np.log(mean + 1e-4) - np.log1p(-mean + 1e-4) if modality.kind == "atac" else mean
    )
    trainer, module, best = fit(cfg, out, model, tokenizer, datamodule, callbacks)
    if not trainer.is_global_zero:
        return other_rank_result(out, trainer, module, best)

    exported = load_pretrained(best)
    predicted, cells = predict(exported, datamodule.test_dataloader(), "predictions")  # from RNA alone
    order = np.argsort(cells)
    test = cells[order]  # sorted store rows
    counts = store_counts(store, inputs)
    ridge = ridge_from_rna_pca(counts, values, splits["train"], test, n_top_genes=cfg.baselines.n_top_genes)
    prediction = {
        "model": prediction_metrics(values[test], predicted[order], names),
        "baselines": {"ridge_rna_pca": prediction_metrics(values[test], ridge, names)},
    }
    embeddings = {}
    for name, encode in (("joint", True), ("rna_only", False)):
        embedding, cells = predict(exported, datamodule.predict_dataloader(), "cell_embedding", encode_modality=encode)
        embeddings[name] = embedding[np.argsort(cells)]
    metrics = {
        "task": "multimodal",
        "modality": modality.kind,
        "features": len(names),
        "label_key": label_key,
        "finetune_mode": cfg.finetune.mode,
        "n_cells": {name: len(rows) for name, rows in splits.items()},
        **training_record(trainer),
        "prediction": prediction,
    }
    if labels is not None:
        baseline_embeddings = multimodal_pca_baselines(counts, values, n_top_genes=cfg.baselines.n_top_genes)
        metrics["embedding"] = {
            "scored_cells": "all",
            "model": {name: bio_metrics(x, labels) for name, x in embeddings.items()},
            "baselines": {name: bio_metrics(x, labels) for name, x in baseline_embeddings.items()},
        }
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    np.savez(out / "embeddings.npz", **embeddings, cell_id=store.obs["cell_id"].to_numpy(dtype=str))
    announce(
        f"{modality.kind} Pearson per feature {prediction['model']['pearson_feature_mean']:.3f} (ridge from RNA PCA "
        f"{prediction['baselines']['ridge_rna_pca']['pearson_feature_mean']:.3f}); {out / 'metrics.json'}"
    )
    return {
        "output_dir": out,
        "store": store_path,
        "splits": splits,
        "values": values,
        "metrics": metrics,
        "export": best,
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
    }


def _feature_scale(values: np.ndarray) -> list[float]:
    """Each protein's scale for the loss: the (n_train, F) training values' standard deviation per feature, floored
    at a tenth of the median one (a near-constant antibody would otherwise dominate)."""
    spread = values.std(axis=0)
    return np.maximum(spread, 0.1 * np.median(spread) + 1e-6).astype(float).tolist()


def _read_second_modality(
    store: CorpusStore, inputs: Sequence[CorpusInput], files: Sequence[str], layer: str | None
) -> anndata.AnnData:
    """The second modality's counts of every store cell, in store order, from the file paired with each input."""
    parts, order = [], []
    for spec, path in zip(inputs, files, strict=True):
        rows = np.flatnonzero(store.obs["source"].to_numpy() == spec.name)
        parts.append(read_modality(path, store.obs["cell_id"].iloc[rows].astype(str).tolist(), layer=layer))
        order.append(rows)
    features = parts[0].var_names
    for path, part in zip(files, parts, strict=True):
        if not part.var_names.equals(features):
            raise ValueError(f"{path}: its features differ from {files[0]}'s; every modality file needs the same ones")
    combined = anndata.concat(parts) if len(parts) > 1 else parts[0]
    return combined[np.argsort(np.concatenate(order))].copy()
