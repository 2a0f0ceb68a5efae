"""``task=integration``: a batch-corrected cell embedding, scored by scIB on all cells against PCA, Harmony, scVI and
the pretrained backbone's own embedding of the same tokens (``baselines.pretrained``)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig

from sc_foundation.data.genes import _atomic_write_text
from sc_foundation.data.store import CorpusStore
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.modeling import (
    ScFoundationForBatchIntegration,
)
from sc_foundation.models.novelty import PRETRAINED_WEIGHTS, backbone_state, backbone_with_weights
from sc_foundation.tasks.cross_batch import CrossBatchTargets, shared_targets
from sc_foundation.tasks.evaluation import (
    integration_baselines,
    integration_metrics,
    store_counts,
)
from sc_foundation.tasks.imputation_protocol import (
    expression_targets,
)
from sc_foundation.tasks.scvi_baselines import scvi_latent
from sc_foundation.training.console import announce
from sc_foundation.training.runs import output_dir

from .common import (
    architecture_overrides,
    category_ids,
    check_categories,
    fit,
    init_panel_decoder,
    other_rank_result,
    predict,
    read_inputs,
    run_scvi,
    skipped_baselines,
    task_datamodule,
    tokenize_inputs,
    training_record,
    two_way_split,
    with_batch_key,
)


def cross_batch_runs(cfg: DictConfig) -> bool:
    """Whether the run gets the cross-batch attraction: a positive ``cross_batch_weight`` and a start within the
    epoch budget. A start after the last epoch (a short run, e.g. ``trainer.max_epochs=3``) is announced: the run
    goes on without it."""
    if cfg.cross_batch_weight <= 0:
        return False
    epochs, start = cfg.trainer.get("max_epochs"), cfg.cross_batch_start_epoch
    if isinstance(epochs, int) and 0 <= epochs <= start:
        announce(
            f"no cross-batch attraction in this run: it starts at epoch {start} (cross_batch_start_epoch), after the "
            f"run's {epochs} epochs (trainer.max_epochs)"
        )
        return False
    return True


class KLWarmup(pl.Callback):
    """scVI's KL warm-up: training's share of ``kl_weight`` (the model's ``kl_share``) rises linearly from 0 at the
    first epoch to 1 at epoch ``epochs`` and stays there.

    Why: from the first step, the KL term prices every latent dimension before the decoder has learnt what it buys;
    on sparse cells (SNARE-seq) the latent then keeps 2 of its 16 dimensions (BENCHMARKS.md, "What moves the
    SNARE-seq integration row"). Rising from 0, the dimensions are in use before the full price applies.
    """

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.kl_share = min(1.0, trainer.current_epoch / self.epochs)


def kl_warmup(cfg: DictConfig) -> KLWarmup | None:
    """The run's KL warm-up, or None: ``kl_warmup_epochs`` 0 or no variational latent (``latent_size: null``).
    Checked before any store is written; a warm-up longer than the run is announced (training then ends with the KL
    term below its weight)."""
    epochs = cfg.kl_warmup_epochs
    if epochs < 0:
        raise ValueError(f"kl_warmup_epochs={epochs} must be 0 (no warm-up) or a number of epochs: fix the override")
    if not epochs or not cfg.latent_size:
        return None
    max_epochs = cfg.trainer.get("max_epochs")
    if isinstance(max_epochs, int) and 0 <= max_epochs < epochs:
        announce(
            f"the KL warm-up (kl_warmup_epochs={epochs}) outlasts the run's {max_epochs} epochs (trainer.max_epochs): "
            f"training ends with the KL term at {(max_epochs - 1) / epochs:.2f} of kl_weight"
        )
    return KLWarmup(epochs)


def run_integration(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """``task=integration``: see the module docstring.

    The metrics are of all cells, the scIB convention: the labels never reach the model (only the batches do, as
    for Harmony), and the baselines see the same cells. The validation cells serve early stopping only.
    """
    out = output_dir(cfg)
    batch_key, label_key, split = cfg.batch_key, cfg.label_key, cfg.split
    inputs = with_batch_key(read_inputs(cfg), batch_key)
    check_categories(inputs, batch_key, setting="batch_key", noun="batch", need="integration needs two or more batches")
    warmup = kl_warmup(cfg)
    if label_key is not None:
        check_categories(inputs, label_key, need="bio-conservation scores need two or more cell types")
    tokenizer, store_path = tokenize_inputs(cfg, out, inputs, [label_key, split.split_by])

    store = CorpusStore(store_path)
    batch_names, batch_ids = category_ids(store, "batch")
    labels = None if label_key is None else store.obs[label_key].to_numpy(dtype=str)
    counts = store_counts(store, inputs)  # (n_cells, n_genes), store order: the decoder's targets and the baselines'
    counts.obs["batch"] = np.asarray(batch_names)[batch_ids]
    targets, gene_ids = expression_targets(counts, tokenizer, cfg.decoder_genes, inputs[0].species, "batch")
    splits = two_way_split(cfg, out, store)

    pl.seed_everything(cfg.seed, workers=True)
    model = ScFoundationForBatchIntegration.from_pretrained(
        cfg.pretrained,
        new_heads=[
            "batch_embeddings",
            "decoder",
            *(["discriminator"] if cfg.dab_weight > 0 else []),
            *(["latent"] if cfg.latent_size else []),
        ],
        batch_names=batch_names,
        batch_embedding_size=cfg.batch_embedding_size,
        dab_weight=cfg.dab_weight,
        cross_batch_weight=cfg.cross_batch_weight,
        latent_size=cfg.latent_size,
        kl_weight=cfg.kl_weight,
        decoder_gene_ids=gene_ids,
        **architecture_overrides(cfg),
    )
    init_panel_decoder(model.decoder, targets[splits["train"]])
    per_cell = {"batch_ids": batch_ids, "counts": targets}
    task_callbacks = list(callbacks)
    attracted = cross_batch_runs(cfg)
    if attracted:
        # Refreshed each epoch by the callback and read by the loaders: the pull towards mutual neighbours.
        width = model.config.latent_size or model.config.hidden_size
        per_cell["cross_batch_targets"] = shared_targets(len(store), width)
        pull = CrossBatchTargets(
            per_cell["cross_batch_targets"],
            batch_ids,
            splits["train"],
            cfg.cross_batch_neighbors,
            cfg.cross_batch_start_epoch,
        )
        task_callbacks.append(pull)
    if warmup is not None:
        task_callbacks.append(warmup)
    datamodule = task_datamodule(cfg, store_path, per_cell, splits)
    # The backbone as pretrained: the row that says whether fine-tuning removed more than it cost (on a mild batch
    # effect it can cost more: BENCHMARKS.md, "Integration without the discriminator"). A CPU copy of its weights now;
    # rank 0 embeds the cells with it after training, so no rank spends a pass on it before and training's random
    # stream is the one it would be without the row.
    pretrained_state = backbone_state(model)
    trainer, module, best = fit(cfg, out, model, tokenizer, datamodule, task_callbacks)
    if not trainer.is_global_zero:
        return other_rank_result(out, trainer, module, best)

    # Embed with the export itself: what users load is what the numbers describe.
    embedding, cells = predict(load_pretrained(best), datamodule.predict_dataloader(), "cell_embedding")
    embedding = embedding[np.argsort(cells)]  # (n_cells, h) in store order
    # The pretrained backbone's (n_cells, hidden) pooled output on the same tokens.
    untrained = backbone_with_weights(model, pretrained_state, PRETRAINED_WEIGHTS)
    pretrained, pretrained_cells = predict(untrained, datamodule.predict_dataloader(), "cell_embedding")
    baselines, baseline_embeddings = integration_baselines(
        counts,
        batch_ids,
        labels,
        n_top_genes=cfg.baselines.n_top_genes,
        n_pcs=cfg.baselines.n_pcs,
        seed=cfg.seed,
    )
    baseline_embeddings["pretrained"] = pretrained[np.argsort(pretrained_cells)]
    baselines["pretrained"] = integration_metrics(baseline_embeddings["pretrained"], batch_ids, labels)
    if run_scvi(cfg):
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
        "cross_batch_weight": cfg.cross_batch_weight,
        # epochs trained with the attraction: 0 when it is off, or starts after the run's last epoch
        "cross_batch_epochs": max(0, trainer.current_epoch - cfg.cross_batch_start_epoch) if attracted else 0,
        "latent_size": cfg.latent_size,
        "finetune_mode": cfg.finetune.mode,
        "scored_cells": "all",
        "n_cells": {"all": len(store), **{name: len(rows) for name, rows in splits.items()}},
        **training_record(trainer),
        "model": integration_metrics(embedding, batch_ids, labels),
        "baselines": baselines,
        "skipped_baselines": skipped_baselines(cfg),
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
