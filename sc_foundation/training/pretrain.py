"""Pretraining: what ``sc-foundation pretrain`` and ``python train.py`` run with ``conf/pretrain.yaml``.

Builds (or reuses) the tokenized corpus store of ``conf/data``, prints its report and the batch padding figures,
pretrains the head of the store's value encoding (``conf/model``, ``conf/trainer``, ``conf/logger``) and exports the
model with its tokenizer to ``<output_dir>/export/best`` (lowest validation loss) and ``<output_dir>/export/final``.
Lightning checkpoints (``<output_dir>/checkpoints/last.ckpt``) only serve resuming: ``ckpt_path=...``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from sc_foundation.conf.checks import check_config
from sc_foundation.data.datamodule import CorpusDataModule
from sc_foundation.data.datasets import DatasetUnavailableError, corpus_inputs, dataset_inputs
from sc_foundation.data.gene_panel import cached_panel_vocab
from sc_foundation.data.store import CorpusStore, build_store
from sc_foundation.data.tokenization import GeneTokenizer, TokenizerConfig
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import ScFoundationForMaskedGeneModeling, ScFoundationForMaskedValueModeling
from sc_foundation.training.console import announce, console_callbacks
from sc_foundation.training.lightning_module import TrainingModule
from sc_foundation.training.model_card import metrics_json, probe_table, render_model_card
from sc_foundation.training.probes import ProbeCallback, ProbeSet
from sc_foundation.training.runs import ExportBest, ExportBestProbe, best_note, export, output_dir, trainer_arguments


def build_corpus(cfg: DictConfig, rank: int | None = None, world_size: int | None = None):
    """The corpus store described by ``cfg.data``: built, resumed, or reused when complete.

    With ``data.panel.n_top_genes`` set, the vocabulary is a gene panel: the union of each input's highly variable
    genes (:mod:`sc_foundation.data.gene_panel`), selected once and cached under ``paths.cache/panels``.

    With ``rank`` and ``world_size`` (a launcher's, :func:`~sc_foundation.data.store.launcher_rank`), this process
    builds only its share of the parts and returns None; ``merge_store`` then completes the store, which a training
    run with the same config reuses (see docs/distributed.md).
    """
    data = cfg.data
    inputs = corpus_inputs(list(data.datasets), OmegaConf.to_container(data.files, resolve=True))
    vocab = data.vocab
    panel = data.get("panel") or {}
    if panel.get("n_top_genes"):
        if vocab is not None:
            raise ValueError("data.vocab and data.panel.n_top_genes both choose the vocabulary: set one of them")
        vocab = cached_panel_vocab(
            inputs,
            Path(cfg.paths.cache) / "panels",
            panel.n_top_genes,
            panel.get("max_cells", 20_000),
            cfg.seed,
            list(panel.get("exclude") or ()),
        )
    return build_store(
        inputs,
        data.store_dir,
        tokenizer_config=TokenizerConfig(**OmegaConf.to_container(data.tokenizer, resolve=True)),
        vocab=vocab,
        min_cells_per_gene=data.min_cells_per_gene,
        obs_keys=list(data.obs_keys),
        chunk_size=data.chunk_size,
        num_workers=data.build_workers,
        part_size=data.part_size,
        overwrite=data.rebuild_stale_store,
        rank=rank,
        world_size=world_size,
    )


def batch_aware(cfg: DictConfig) -> bool:
    """Whether ``cfg.model`` switches on a batch-aware pretraining term (which needs each cell's corpus batch)."""
    return bool(cfg.model.get("reconstruction_batch_conditioned")) or cfg.model.get("adversarial_batch_weight", 0) > 0


def corpus_batches(store: CorpusStore, column: str) -> tuple[list[str], np.ndarray]:
    """The corpus batches of the batch-aware terms: the sorted values of the store's obs ``column`` (``source``: the
    input files; ``batch``: each input's ``batch_key`` values, else its name) and each cell's (n_cells,) int64 id."""
    if column not in ("source", "batch"):
        raise ValueError(f"data.batch_column must be 'source' or 'batch', got {column!r}")
    values = store.obs[column].astype(str)
    names = sorted(values.unique())
    return names, pd.Categorical(values, categories=names).codes.astype(np.int64)


def build_model(cfg: DictConfig, store: CorpusStore):
    """The pretraining head of the store's value encoding; vocabulary, special ids and encoding from its tokenizer,
    and the corpus batches (``data.batch_column``) when a batch-aware term is on."""
    architecture = OmegaConf.to_container(cfg.model, resolve=True)
    if batch_aware(cfg):
        architecture["corpus_batch_names"] = corpus_batches(store, cfg.data.get("batch_column", "source"))[0]
    config = ScFoundationConfig.from_tokenizer(store.tokenizer, **architecture)
    head = ScFoundationForMaskedGeneModeling if config.value_encoding == "rank" else ScFoundationForMaskedValueModeling
    return head(config)


def probe_callback(cfg: DictConfig, tokenizer: GeneTokenizer) -> ProbeCallback | None:
    """The representation probes of ``cfg.probes`` (None when it is null or lists no sets). A registered probe set
    that no source can provide is skipped with a message, like a corpus dataset."""
    if not cfg.get("probes") or not cfg.probes.get("sets"):
        return None
    sets = []
    for settings in OmegaConf.to_container(cfg.probes.sets, resolve=True):
        probe = ProbeSet(**settings)
        if probe.dataset is not None:
            try:
                dataset_inputs(probe.dataset)
            except DatasetUnavailableError as error:
                print(f"[sc_foundation] skipping probe set {probe.name}: {error}", file=sys.stderr)
                continue
        sets.append(probe)
    if not sets:
        return None
    return ProbeCallback(
        sets,
        tokenizer,
        every_n_validations=cfg.probes.every_n_validations,
        n_neighbors=cfg.probes.n_neighbors,
        scvi=bool(cfg.probes.get("scvi", False)),
        cache_dir=Path(cfg.paths.cache) / "probe_references",
    )


def model_card_files(cfg: DictConfig, report, trainer: pl.Trainer, probes: ProbeCallback | None, seconds: float):
    """``README.md`` and ``metrics.json`` for the final export (:mod:`sc_foundation.training.model_card`)."""
    results = probes.history[-1]["results"] if probes is not None and probes.history else None
    losses = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.endswith("loss")}
    training = {
        "steps": trainer.global_step,
        "batch_size": cfg.data.loader.batch_size,
        "cells_seen": trainer.global_step * cfg.data.loader.batch_size * trainer.world_size,
        "precision": str(trainer.precision),
        "wall_time_s": round(seconds, 1),
        **losses,
    }
    data = {
        "inputs": ", ".join(s.source for s in report.shards),
        "cells": report.n_cells,
        "vocabulary": report.n_vocab,
        "tokenizer": OmegaConf.to_container(cfg.data.tokenizer, resolve=True),
        "panel": OmegaConf.to_container(cfg.data.get("panel"), resolve=True) if cfg.data.get("panel") else None,
    }
    recipe = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "sampling, masking and views": {
            k: cfg.data.loader.get(k)
            for k in ("source_balance", "mask_ratio", "view_keep", "view_depth", "view_gene_scale")
        },
        "seed": cfg.seed,
    }
    title = cfg.get("name") or "sc_foundation pretraining run"
    return {
        "README.md": render_model_card(title, data, recipe, training, results),
        "metrics.json": metrics_json(training, results),
    }


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Everything ``sc-foundation pretrain`` does, callable from tests with a composed config (and extra Trainer
    callbacks)."""
    started = time.perf_counter()
    check_config(cfg, "pretrain")  # a bad override fails here, in a second, not after the store build
    report = build_corpus(cfg)
    announce(report.format())
    per_cell = None
    if batch_aware(cfg):
        names, ids = corpus_batches(CorpusStore(report.path), cfg.data.get("batch_column", "source"))
        announce(f"batch-aware objectives over {len(names)} corpus batches ({cfg.data.batch_column}): {names}")
        per_cell = {"batch_ids": ids}
    loader = OmegaConf.to_container(cfg.data.loader, resolve=True)
    datamodule = CorpusDataModule(report.path, seed=cfg.seed, per_cell=per_cell, **loader)
    datamodule.setup()
    padding = datamodule.padding_report()
    announce(
        f"train/val cells: {len(datamodule.train_indices)}/{len(datamodule.val_indices)}; padded share of token "
        f"slots per epoch: {padding['length_grouped']:.1%} length-grouped vs {padding['random']:.1%} random batches"
    )
    announce(f"corpus store: {Path(report.path).resolve()}")

    pl.seed_everything(cfg.seed, workers=True)
    out = output_dir(cfg)
    store = datamodule.store
    model = build_model(cfg, store)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    trainer_kwargs = trainer_arguments(cfg.trainer, model.config)
    module = TrainingModule(model, max_steps=trainer_kwargs["max_steps"], **OmegaConf.to_container(cfg.optim))
    logger = hydra.utils.instantiate(cfg.logger, save_dir=str(out)) if cfg.get("logger") else False
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints",
        save_last=True,
        save_top_k=0,
        **OmegaConf.to_container(cfg.checkpoint, resolve=True),
    )
    best = ExportBest(store.tokenizer, out / "export" / "best")
    probes = probe_callback(cfg, store.tokenizer)
    best_probe = None
    if probes is not None and cfg.probes.get("select_best", False):
        best_probe = ExportBestProbe(probes, store.tokenizer, out / "export" / "best_probe")
    configured = [hydra.utils.instantiate(c) for c in cfg.get("callbacks") or []]
    extra = [*([probes] if probes else []), *([best_probe] if best_probe else [])]
    extra += [*console_callbacks(trainer_kwargs), *configured, *callbacks]
    callbacks = [checkpoints, best, *extra]
    trainer = pl.Trainer(**trainer_kwargs, default_root_dir=str(out), logger=logger, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    card = model_card_files(cfg, report, trainer, probes, time.perf_counter() - started)
    final = export(trainer, store.tokenizer, out / "export" / "final", extra_files=card)
    if trainer.is_global_zero:
        if probes is not None and probes.history:
            announce(f"probe table at step {probes.history[-1]['step']}:\n{probe_table(probes.history[-1]['results'])}")
        announce(f"exported model: {final.resolve()}{best_note(best.directory)}")
        if best_probe is not None and best_probe.best > -math.inf:
            announce(f"best probe score (mean ratio to PCA) {best_probe.best:.3f}: {best_probe.directory.resolve()}")
    return {
        "store": report.path,
        "report": report,
        "padding": padding,
        "output_dir": out,
        "export": final,
        "best_export": best.directory,
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
        "probes": probes,
        "best_probe_export": best_probe.directory if best_probe is not None else None,
    }
