"""Fine-tuning entry point: ``python finetune.py task=<annotation|integration|imputation|multimodal> pretrained=DIR
'data.files=[...]'``.

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

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import anndata
import hydra
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping

from sc_foundation.console import announce, console_callbacks
from sc_foundation.convert import detect, export_converted
from sc_foundation.data import CorpusDataModule, split_cells, split_train_val_test
from sc_foundation.datasets import corpus_inputs
from sc_foundation.evaluation import (
    bio_metrics,
    classification_metrics,
    integration_baselines,
    integration_metrics,
    logistic_regression_baselines,
    multimodal_pca_baselines,
    read_counts,
    store_counts,
)
from sc_foundation.export import load_pretrained
from sc_foundation.genes import _atomic_write_text
from sc_foundation.hardware import resolve_precision
from sc_foundation.imputation import (
    choose_panel,
    expression_targets,
    gene_mean_shares,
    hide_entries,
    imputation_metrics,
    knn_smoothing_shares,
    panel_shares,
    vocabulary_counts,
)
from sc_foundation.inference import call_classes, impute
from sc_foundation.io import InvalidInputError, write_h5ad_atomic
from sc_foundation.modeling import (
    ScFoundationForBatchIntegration,
    ScFoundationForCellClassification,
    ScFoundationForImputation,
    ScFoundationForMultimodal,
)
from sc_foundation.multimodal import (
    check_kind,
    normalise_modality,
    prediction_metrics,
    read_modality,
    ridge_from_rna_pca,
    select_features,
)
from sc_foundation.scvi_baselines import scvi_available, scvi_latent, scvi_normalized_expression
from sc_foundation.store import RESERVED_COLUMNS, CorpusInput, CorpusStore, build_store
from sc_foundation.tokenization import GeneTokenizer
from sc_foundation.training import TrainingModule
from train import ExportBest, export, output_dir

MODES = ("full", "frozen", "lower_lr")


def check_categories(
    inputs: Sequence[CorpusInput], key: str, *, need: str, setting: str = "label_key", noun: str = "label"
) -> None:
    """Refuse an obs column that cannot serve as per-cell categories (labels, batches), before anything is tokenized.

    Args:
        key: the obs column every input must have.
        need: why two or more categories are needed, appended to the single-category message.
        setting, noun: the config key that named it and what it holds, for the messages.
    Raises:
        ValueError: ``key`` is not an obs column of a file (naming the file and its columns), values are missing
            (how many, in which file, which cells), or all cells share one value.
    """
    values = set()
    for spec in inputs:
        with spec.open() as source:
            obs = source.obs
            if key not in obs.columns:
                raise ValueError(
                    f"{spec.path}: {setting}={key!r} is not an obs column; obs columns: {list(obs.columns)}"
                )
            column = obs[key]
            missing = column.isna().to_numpy()
            if missing.any():
                examples = ", ".join(map(str, obs.index[missing][:5]))
                raise ValueError(
                    f"{spec.path}: {int(missing.sum())} of {len(obs)} cells have no {key!r} {noun} (NaN), "
                    f"e.g. cells {examples}. Drop or fill in those cells first."
                )
            values.update(column.astype(str).unique())
    if len(values) < 2:
        raise ValueError(f"{setting}={key!r} has a single value {sorted(values)}: {need}")


def with_batch_key(inputs: Sequence, batch_key: str) -> list[CorpusInput]:
    """The inputs with ``batch_key`` as each one's batch column (the store's ``batch``), refusing an input that names
    another one itself."""
    specs = []
    for spec in map(CorpusInput.coerce, inputs):
        if spec.batch_key not in (None, batch_key):
            raise ValueError(f"{spec.path}: its own batch_key={spec.batch_key!r} contradicts batch_key={batch_key!r}")
        specs.append(dataclasses.replace(spec, batch_key=batch_key))
    return specs


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> list[float]:
    """``n / (C * n_c)`` per class from (n,) training class ids, as scikit-learn's ``class_weight="balanced"``.

    A class absent from the training cells gets weight 1 (it never appears in the loss).
    """
    counts = np.bincount(labels, minlength=n_classes)
    return [len(labels) / (n_classes * c) if c else 1.0 for c in counts.tolist()]


@torch.no_grad()
def predict(model: torch.nn.Module, loader, field: str = "logits", **forward_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The output ``field`` (n, ...) (e.g. ``logits`` (n, C), ``cell_embedding`` (n, h)) and the store indices (n,)
    of every cell the loader yields, with the model in eval mode; ``forward_kwargs`` go to every forward call."""
    step = TrainingModule(model).eval()  # its forward drops batch keys the model does not take
    outputs, cells = [], []
    for batch in loader:
        batch = {key: value.to(model.device) for key, value in batch.items()}
        outputs.append(getattr(step(batch | forward_kwargs), field).float().cpu())
        cells.append(batch["cell_index"].cpu())
    return torch.cat(outputs).numpy(), torch.cat(cells).numpy()


def _inputs(cfg: DictConfig) -> list[CorpusInput]:
    """The task's input files, ``cfg.data.files``, as corpus inputs, checked by :func:`check_cells`."""
    inputs = list(map(CorpusInput.coerce, corpus_inputs([], OmegaConf.to_container(cfg.data.files, resolve=True))))
    check_cells(inputs)
    return inputs


def check_cells(inputs: Sequence[CorpusInput]) -> None:
    """Refuse, before anything is tokenized or trained, inputs whose cells the task cannot tell apart: an empty file,
    duplicated cell ids within a file (splits, metrics and baselines find cells by file name and id), or two inputs
    with the same file name.

    Raises:
        InvalidInputError: naming the file and the fix.
    """
    names = [spec.name for spec in inputs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInputError(
            f"data.files holds several inputs named {repeated}: cells are known by file name and cell id, so give "
            "each file its own name."
        )
    for spec in inputs:
        with spec.open() as source:
            ids = source.obs.index
        if len(ids) == 0:
            raise InvalidInputError(f"{spec.path}: the file holds no cells (0 rows). Point data.files at cell files.")
        duplicated = ids[ids.duplicated()].unique()
        if len(duplicated):
            raise InvalidInputError(
                f"{spec.path}: {len(duplicated)} cell ids occur more than once (e.g. {list(duplicated[:3])}), but "
                "every cell needs its own id. Make them unique and save the file again: "
                "adata.obs_names_make_unique(); adata.write_h5ad(path)."
            )


def _tokenize(cfg: DictConfig, out: Path, inputs: Sequence[CorpusInput], obs_keys: Sequence[str]):
    """The pretrained tokenizer and the store of the inputs tokenized with it (obs columns ``obs_keys`` kept)."""
    tokenizer = GeneTokenizer.from_pretrained(cfg.pretrained)
    report = build_store(
        inputs,
        cfg.data.store_dir or out / "store",
        tokenizer=tokenizer,
        obs_keys=[key for key in dict.fromkeys(obs_keys) if key and key not in RESERVED_COLUMNS],
        chunk_size=cfg.data.chunk_size,
        num_workers=cfg.data.build_workers,
    )
    announce(report.format())
    return tokenizer, report.path


def _categories(store: CorpusStore, column: str) -> tuple[list[str], np.ndarray]:
    """The sorted category names of an obs column and each store cell's id into them, (n_cells,) int64."""
    names = sorted(store.obs[column].astype(str).unique())
    return names, pd.Categorical(store.obs[column].astype(str), categories=names).codes.astype(np.int64)


def _datamodule(cfg: DictConfig, store_path, per_cell: dict[str, np.ndarray], splits: dict) -> CorpusDataModule:
    """Unmasked loaders over the task's store and splits, each batch carrying ``per_cell`` targets (B,)."""
    return CorpusDataModule(
        store_path,
        cfg.data.batch_size,
        mask_ratio=None,
        group_by_length=cfg.data.group_by_length,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        per_cell=per_cell,
        splits=splits,
    )


def _three_way_split(cfg: DictConfig, out: Path, store: CorpusStore, labels: np.ndarray | None) -> dict:
    """Seeded train/val/test store rows by ``cfg.split`` (stratified by the (n_cells,) class ids ``labels`` when
    given, unless split by group), written to ``splits.json``."""
    split = cfg.split
    splits = split_train_val_test(
        store,
        split.val_fraction,
        split.test_fraction,
        split.seed,
        labels=labels if split.stratify and split.split_by is None else None,
        group_by=split.split_by,
    )
    _write_splits(cfg, out, store, splits)
    return splits


def _write_splits(cfg: DictConfig, out: Path, store: CorpusStore, splits: dict[str, np.ndarray]) -> None:
    record = {
        name: {"store_index": rows.tolist(), "cell_id": store.obs["cell_id"].iloc[rows].tolist()}
        for name, rows in splits.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "splits.json", json.dumps({"seed": cfg.split.seed, **record}))


def _architecture_overrides(cfg: DictConfig) -> dict:
    """Backbone settings a task may change without new weights: ``pooling`` (null keeps the pretrained one)."""
    return {"pooling": cfg.pooling} if cfg.get("pooling") else {}


@torch.no_grad()
def init_decoder_bias(decoder: torch.nn.Module, bias: np.ndarray) -> None:
    """Start a fresh feature decoder at the training cells' average (its bias (F,)): a short fine-tuning run then
    spends its steps on what differs between cells, not on learning the mean."""
    decoder.bias.copy_(torch.as_tensor(bias, dtype=decoder.bias.dtype))


def _fit(cfg: DictConfig, out: Path, model, tokenizer, datamodule, callbacks: Sequence[pl.Callback]):
    """Fine-tune ``model`` (a head fresh from ``from_pretrained``) by ``cfg.finetune.mode``, exporting the best
    weights by ``val/loss`` to ``out/export/best``; returns the trainer, the module and that directory."""
    model.train()  # from_pretrained returns it in eval mode, which Lightning would keep (no dropout)
    if cfg.finetune.mode == "frozen":
        model.base_model.requires_grad_(False)
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs["precision"], trainer_kwargs["accelerator"])
    module = TrainingModule(
        model,
        max_steps=trainer_kwargs["max_steps"],
        backbone_lr_ratio=cfg.finetune.backbone_lr_ratio if cfg.finetune.mode == "lower_lr" else 1.0,
        **OmegaConf.to_container(cfg.optim),
    )
    logger = hydra.utils.instantiate(cfg.logger, save_dir=str(out)) if cfg.get("logger") else False
    best = ExportBest(tokenizer, out / "export" / "best")
    stopping = EarlyStopping(monitor="val/loss", mode="min", patience=cfg.early_stopping.patience)
    callbacks = [best, stopping, *console_callbacks(trainer_kwargs), *callbacks]
    trainer = pl.Trainer(
        **trainer_kwargs,
        default_root_dir=str(out),
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    if not (best.directory / "config.json").exists():  # no validation ran: the final weights are the best known
        export(trainer, module, tokenizer, best.directory)
    return trainer, module, best.directory


def run_annotation(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """``task=annotation``: see the module docstring."""
    if cfg.class_weights not in ("balanced", "none"):
        raise ValueError(f"class_weights must be 'balanced' or 'none', got {cfg.class_weights!r}")
    out = output_dir(cfg)
    label_key, split = cfg.label_key, cfg.split
    inputs = _inputs(cfg)
    check_categories(inputs, label_key, need="a classifier needs two or more classes")
    tokenizer, store_path = _tokenize(cfg, out, inputs, [label_key, split.split_by])

    store = CorpusStore(store_path)
    names, labels = _categories(store, label_key)
    splits = _three_way_split(cfg, out, store, labels)
    datamodule = _datamodule(cfg, store_path, {"labels": labels}, splits)

    pl.seed_everything(cfg.seed, workers=True)
    weights = balanced_class_weights(labels[splits["train"]], len(names)) if cfg.class_weights == "balanced" else None
    model = ScFoundationForCellClassification.from_pretrained(
        cfg.pretrained,
        new_heads=["classifier"],
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        class_weights=weights,
        classifier_dropout=cfg.classifier_dropout,
        **_architecture_overrides(cfg),
    )
    trainer, module, best = _fit(cfg, out, model, tokenizer, datamodule, callbacks)

    # Score the export itself: what users load is what the numbers describe.
    logits, cells = predict(load_pretrained(best), datamodule.test_dataloader())
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


def run_integration(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """``task=integration``: see the module docstring.

    The metrics are of all cells, the scIB convention: the labels never reach the model (only the batches do, as
    for Harmony), and the baselines see the same cells. The validation cells serve early stopping only.
    """
    out = output_dir(cfg)
    batch_key, label_key, split = cfg.batch_key, cfg.label_key, cfg.split
    inputs = with_batch_key(_inputs(cfg), batch_key)
    check_categories(inputs, batch_key, setting="batch_key", noun="batch", need="integration needs two or more batches")
    if label_key is not None:
        check_categories(inputs, label_key, need="bio-conservation scores need two or more cell types")
    tokenizer, store_path = _tokenize(cfg, out, inputs, [label_key, split.split_by])

    store = CorpusStore(store_path)
    batch_names, batch_ids = _categories(store, "batch")
    labels = None if label_key is None else store.obs[label_key].to_numpy(dtype=str)
    counts = store_counts(store, inputs)  # (n_cells, n_genes), store order: the decoder's targets and the baselines'
    counts.obs["batch"] = np.asarray(batch_names)[batch_ids]
    targets, gene_ids = expression_targets(counts, tokenizer, cfg.decoder_genes, inputs[0].species, "batch")
    train, val = split_cells(store, split.val_fraction, split.seed, split.split_by)
    splits = {"train": train, "val": val}
    _write_splits(cfg, out, store, splits)
    datamodule = _datamodule(cfg, store_path, {"batch_ids": batch_ids, "counts": targets}, splits)

    pl.seed_everything(cfg.seed, workers=True)
    model = ScFoundationForBatchIntegration.from_pretrained(
        cfg.pretrained,
        new_heads=["batch_embeddings", "decoder", *(["discriminator"] if cfg.dab_weight > 0 else [])],
        batch_names=batch_names,
        batch_embedding_size=cfg.batch_embedding_size,
        dab_weight=cfg.dab_weight,
        decoder_gene_ids=gene_ids,
        **_architecture_overrides(cfg),
    )
    init_decoder_bias(model.decoder, np.log(panel_shares(targets[train]).mean(0) + 1e-8))
    trainer, module, best = _fit(cfg, out, model, tokenizer, datamodule, callbacks)

    # Embed with the export itself: what users load is what the numbers describe.
    embedding, cells = predict(load_pretrained(best), datamodule.predict_dataloader(), "cell_embedding")
    embedding = embedding[np.argsort(cells)]  # (n_cells, h) in store order
    baselines, baseline_embeddings = integration_baselines(
        counts,
        batch_ids,
        labels,
        n_top_genes=cfg.baselines.n_top_genes,
        n_pcs=cfg.baselines.n_pcs,
        seed=cfg.seed,
    )
    if _run_scvi(cfg):
        baseline_embeddings["scvi"] = scvi_latent(
            counts, batch_ids, n_top_genes=cfg.baselines.n_top_genes, seed=cfg.seed
        )
        baselines["scvi"] = integration_metrics(baseline_embeddings["scvi"], batch_ids, labels)
    metrics = {
        "task": "integration",
        "batch_key": batch_key,
        "label_key": label_key,
        "batches": batch_names,
        "dab_weight": cfg.dab_weight,
        "finetune_mode": cfg.finetune.mode,
        "scored_cells": "all",
        "n_cells": {"all": len(store), **{name: len(rows) for name, rows in splits.items()}},
        "steps": trainer.global_step,
        "model": integration_metrics(embedding, batch_ids, labels),
        "baselines": baselines,
        "skipped_baselines": _skipped_baselines(cfg),
    }
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    np.savez(
        out / "embeddings.npz",
        model=embedding,
        **baseline_embeddings,
        cell_id=store.obs["cell_id"].to_numpy(dtype=str),  # fixed-width strings: loads without pickle
        batch=np.asarray(batch_names)[batch_ids],
        **({} if labels is None else {"label": labels}),
    )
    score = "total" if label_key is not None else "batch"
    summary = ", ".join(f"{name} {result[score]:.3f}" for name, result in baselines.items())
    announce(f"scIB {score} {metrics['model'][score]:.3f} ({summary}); {out / 'metrics.json'}")
    return {
        "output_dir": out,
        "store": store_path,
        "splits": splits,
        "batch_ids": batch_ids,
        "embedding": embedding,
        "metrics": metrics,
        "export": best,
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
    }


def run_imputation(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """``task=imputation``: see the module docstring.

    The scVI protocol: a seeded ``hidden_fraction`` of the non-zero counts (over the vocabulary genes) is hidden
    before anything else happens; the store, the model, the baselines and the panel all see only the corrupted
    matrix, and every method is scored on the hidden entries that fall in the panel, in all cells. The validation
    cells serve early stopping only.
    """
    out = output_dir(cfg)
    split = cfg.split
    inputs = _inputs(cfg)
    tokenizer = GeneTokenizer.from_pretrained(cfg.pretrained)
    vocab = vocabulary_counts(read_counts(inputs), tokenizer, inputs[0].species)
    corrupted, hidden = hide_entries(vocab.X, cfg.hidden_fraction, cfg.hidden_seed)
    corrupted = anndata.AnnData(corrupted, obs=vocab.obs[["source", "cell_id"]], var=vocab.var)
    corrupted_path = write_h5ad_atomic(corrupted, out / "corrupted.h5ad")
    _, store_path = _tokenize(cfg, out, [CorpusInput(path=str(corrupted_path))], [split.split_by])

    store = CorpusStore(store_path)
    rows = corrupted.obs_names.get_indexer(store.obs["cell_id"])  # store cell -> corrupted row
    panel = choose_panel(corrupted, cfg.decoder_genes)
    targets = corrupted.X[rows][:, panel].toarray()  # (n_store_cells, G) in store order
    train, val = split_cells(store, split.val_fraction, split.seed, split.split_by)
    splits = {"train": train, "val": val}
    _write_splits(cfg, out, store, splits)
    datamodule = _datamodule(cfg, store_path, {"counts": targets}, splits)

    pl.seed_everything(cfg.seed, workers=True)
    model = ScFoundationForImputation.from_pretrained(
        cfg.pretrained,
        new_heads=["decoder"],
        decoder_gene_ids=corrupted.var["token_id"].iloc[panel].tolist(),
        **_architecture_overrides(cfg),
    )
    init_decoder_bias(model.decoder, np.log(panel_shares(targets[train]).mean(0) + 1e-8))
    trainer, module, best = _fit(cfg, out, model, tokenizer, datamodule, callbacks)

    # Impute through the public API, with the export: what users run is what the numbers describe.
    imputed = corrupted[:, panel].copy()
    impute(imputed, load_pretrained(best), layer_added="sc_foundation_imputed")
    in_panel = np.isin(hidden["col"], panel)
    entries = {"row": hidden["row"][in_panel], "col": np.searchsorted(panel, hidden["col"][in_panel])}
    true = hidden["value"][in_panel]
    library = np.asarray(imputed.X.sum(axis=1)).ravel()  # (n_cells,) corrupted panel totals, one for all methods
    tokenized = np.zeros(imputed.n_obs, dtype=bool)
    tokenized[rows] = True  # cells without tokens have no model prediction: score every method without them
    scored = tokenized[entries["row"]]

    def score(predicted_counts: np.ndarray) -> dict:
        values = np.asarray(predicted_counts[entries["row"], entries["col"]]).ravel()
        return imputation_metrics(true[scored], values[scored])

    baseline_shares = {
        "knn_smoothing": knn_smoothing_shares(imputed.X, n_pcs=cfg.baselines.n_pcs, seed=cfg.seed),
        "gene_mean": gene_mean_shares(imputed.X),
    }
    if _run_scvi(cfg):
        baseline_shares["scvi"] = scvi_normalized_expression(imputed.X, seed=cfg.seed)
    baselines = {name: score(shares * library[:, None]) for name, shares in baseline_shares.items()}
    metrics = {
        "task": "imputation",
        "hidden_fraction": cfg.hidden_fraction,
        "panel_genes": len(panel),
        "finetune_mode": cfg.finetune.mode,
        "scored_cells": "all",
        "n_cells": {"all": imputed.n_obs, **{name: len(rows) for name, rows in splits.items()}},
        "n_hidden_entries": {
            "all_genes": len(hidden["value"]),
            "panel": int(in_panel.sum()),
            "scored": int(scored.sum()),
        },
        "steps": trainer.global_step,
        "model": score(imputed.layers["sc_foundation_imputed"].toarray()),
        "baselines": baselines,
        "skipped_baselines": _skipped_baselines(cfg),
    }
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    write_h5ad_atomic(imputed, out / "imputed.h5ad")
    summary = ", ".join(f"{name} {result['median_l1']:.3f}" for name, result in baselines.items())
    announce(f"median L1 {metrics['model']['median_l1']:.3f} ({summary}); {out / 'metrics.json'}")
    return {
        "output_dir": out,
        "store": store_path,
        "splits": splits,
        "metrics": metrics,
        "export": best,
        "imputed": imputed,
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
    }


def _run_scvi(cfg: DictConfig) -> bool:
    """Whether to fit the scVI baseline: asked for (``baselines.scvi``) and installed (the ``baselines`` extra)."""
    return bool(cfg.baselines.scvi) and scvi_available()


def _skipped_baselines(cfg: DictConfig) -> dict[str, str]:
    """Baselines left out of a run, and why, for metrics.json."""
    if not cfg.baselines.scvi:
        return {"scvi": "baselines.scvi=false"}
    if not scvi_available():
        return {"scvi": 'scvi-tools is not installed: pip install -e ".[baselines]"'}
    return {}


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
    inputs = _inputs(cfg)
    modality_files = list(modality.files or [])
    if len(modality_files) != len(inputs):
        raise ValueError(
            f"modality.files needs one {modality.kind} file per RNA file in data.files ({len(inputs)}), in the same "
            f"order; got {len(modality_files)}: {modality_files}"
        )
    if label_key is not None:
        check_categories(inputs, label_key, need="bio-conservation scores need two or more cell types")
    tokenizer, store_path = _tokenize(cfg, out, inputs, [label_key, split.split_by])

    store = CorpusStore(store_path)
    measured = _read_second_modality(store, inputs, modality_files, modality.layer)  # (n_store_cells, n_all)
    features = select_features(measured, modality.kind, modality.n_features)
    names = measured.var_names[features].tolist()
    values = normalise_modality(measured.X[:, features], modality.kind)  # (n_store_cells, F)
    labels = None if label_key is None else store.obs[label_key].to_numpy(dtype=str)
    splits = _three_way_split(cfg, out, store, None if labels is None else np.unique(labels, return_inverse=True)[1])
    datamodule = _datamodule(cfg, store_path, {"modality_values": values}, splits)

    pl.seed_everything(cfg.seed, workers=True)
    model = ScFoundationForMultimodal.from_pretrained(
        cfg.pretrained,
        new_heads=["modality_embeddings", "modality_decoder"],
        modality=modality.kind,
        modality_features=names,
        modality_dropout=modality.dropout,
        **_architecture_overrides(cfg),
    )
    mean = values[splits["train"]].mean(0)
    init_decoder_bias(
        model.modality_decoder, np.log(mean + 1e-4) - np.log1p(-mean + 1e-4) if modality.kind == "atac" else mean
    )
    trainer, module, best = _fit(cfg, out, model, tokenizer, datamodule, callbacks)

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
        "steps": trainer.global_step,
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


TASKS = {
    "annotation": run_annotation,
    "integration": run_integration,
    "imputation": run_imputation,
    "multimodal": run_multimodal,
}


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


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
