"""What the fine-tuning tasks share: input checks, tokenization with the pretrained tokenizer, seeded splits, the
loaders, the fit with early stopping and the export, and prediction over a loader."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from sc_foundation.data.datamodule import CorpusDataModule, split_cells, split_train_val_test
from sc_foundation.data.datasets import corpus_inputs
from sc_foundation.data.genes import _atomic_write_text
from sc_foundation.data.io import InvalidInputError
from sc_foundation.data.store import RESERVED_COLUMNS, CorpusInput, CorpusStore, build_store
from sc_foundation.data.tokenization import GeneTokenizer
from sc_foundation.models.adapters import LoraSettings, attach_lora, lora_parameter_count
from sc_foundation.tasks.evaluation import read_counts
from sc_foundation.tasks.imputation_protocol import choose_panel, panel_shares, vocabulary_counts
from sc_foundation.tasks.scvi_baselines import scvi_available
from sc_foundation.training.console import announce, console_callbacks
from sc_foundation.training.lightning_module import TrainingModule
from sc_foundation.training.memory import available_memory, plan_training, release_freed_memory
from sc_foundation.training.runs import ExportBest, export, trainer_arguments

from .convergence import EarlyStoppingFrom, GradualUnfreezing, LearningCurves

MODES = ("full", "frozen", "lower_lr", "gradual", "lora")
LIBRARY_SIZES = ("input", "panel")
"""``data.library_size``: what a cell's counts are normalised by (``TokenizerConfig.library_size``)."""


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


def predict(model: torch.nn.Module, loader, field: str = "logits", **forward_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The output ``field`` (n, ...) (e.g. ``logits`` (n, C), ``cell_embedding`` (n, h)) and the store indices (n,)
    of every cell the loader yields, with the model in eval mode; ``forward_kwargs`` go to every forward call."""
    outputs, cells = predict_fields(model, loader, (field,), **forward_kwargs)
    return outputs[field], cells


@torch.no_grad()
def predict_fields(
    model: torch.nn.Module, loader, fields: Sequence[str], **forward_kwargs
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Several output fields from one pass, as :func:`predict`: ``{field: (n, ...)}`` and the (n,) store indices."""
    step = TrainingModule(model).eval()  # its forward drops batch keys the model does not take
    outputs, cells = {field: [] for field in fields}, []
    for batch in loader:
        batch = {key: value.to(model.device) for key, value in batch.items()}
        output = step(batch | forward_kwargs)
        for field in fields:
            outputs[field].append(getattr(output, field).float().cpu())
        cells.append(batch["cell_index"].cpu())
    return {field: torch.cat(parts).numpy() for field, parts in outputs.items()}, torch.cat(cells).numpy()


def read_inputs(cfg: DictConfig) -> list[CorpusInput]:
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


def panel_tokenizer(
    tokenizer: GeneTokenizer, inputs: Sequence[CorpusInput], n_genes: int, include_zeros: bool
) -> GeneTokenizer:
    """``tokenizer`` reading cells through the task's ``n_genes`` most variable vocabulary genes (scanpy, Seurat
    flavour, over all the inputs' cells; :func:`~sc_foundation.tasks.imputation_protocol.choose_panel`), zeros included
    when
    ``include_zeros``, with a context that holds the whole panel: every cell is read through the same genes, the
    ones that tell the task's cells apart, as the baselines' HVG matrices are."""
    counts = vocabulary_counts(read_counts(inputs), tokenizer, inputs[0].species)  # (n_cells, n_vocabulary_genes)
    genes = counts.var_names[choose_panel(counts, n_genes)]
    config = tokenizer.config
    context = len(genes) + int(config.add_cls) + int(config.add_eos)
    panel = dataclasses.replace(
        config, gene_panel=tuple(genes), include_zeros=include_zeros, context_length=context, truncation="top"
    )
    return GeneTokenizer(tokenizer.vocab, panel, tokenizer.gene_medians)


def tokenize_inputs(cfg: DictConfig, out: Path, inputs: Sequence[CorpusInput], obs_keys: Sequence[str]):
    """The task's tokenizer and the store of the inputs tokenized with it (obs columns ``obs_keys`` kept): the
    pretrained tokenizer, or with ``data.panel_genes`` that tokenizer through the task's gene panel
    (:func:`panel_tokenizer`); ``data.library_size`` sets what the cells' counts are normalised by."""
    tokenizer = GeneTokenizer.from_pretrained(cfg.pretrained)
    library = cfg.data.get("library_size", "input")
    if library != tokenizer.config.library_size:
        config = dataclasses.replace(tokenizer.config, library_size=library)
        tokenizer = GeneTokenizer(tokenizer.vocab, config, tokenizer.gene_medians)
    if cfg.data.get("panel_genes"):
        tokenizer = panel_tokenizer(tokenizer, inputs, cfg.data.panel_genes, cfg.data.include_zeros)
    if cfg.data.get("panel_genes") or library != "input":
        announce(f"task tokenizer: {tokenizer}")
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


def category_ids(store: CorpusStore, column: str) -> tuple[list[str], np.ndarray]:
    """The sorted category names of an obs column and each store cell's id into them, (n_cells,) int64."""
    names = sorted(store.obs[column].astype(str).unique())
    return names, pd.Categorical(store.obs[column].astype(str), categories=names).codes.astype(np.int64)


def task_datamodule(cfg: DictConfig, store_path, per_cell: dict[str, np.ndarray], splits: dict) -> CorpusDataModule:
    """Unmasked loaders over the task's store and splits, each batch carrying ``per_cell`` targets (B,).

    ``data.thin_depth`` needs counts, which only continuous values give back: with a model whose tokenizer reads
    bins or ranks (scGPT, Geneformer) the thinning is left out, and the run says so."""
    thin_depth = cfg.data.get("thin_depth")
    encoding = None if thin_depth is None else CorpusStore(store_path).tokenizer.config.encoding
    if encoding not in (None, "continuous"):
        announce(
            f"data.thin_depth is off for this model: its tokenizer reads {encoding} values, from which the counts "
            "that thinning needs cannot be recovered"
        )
        thin_depth = None
    return CorpusDataModule(
        store_path,
        cfg.data.batch_size,
        mask_ratio=None,
        group_by_length=cfg.data.group_by_length,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        per_cell=per_cell,
        splits=splits,
        token_dropout=cfg.data.token_dropout,
        thin_depth=thin_depth,
    )


def three_way_split(cfg: DictConfig, out: Path, store: CorpusStore, labels: np.ndarray | None) -> dict:
    """Seeded train/val/test store rows by ``cfg.split`` (stratified by the (n_cells,) class ids ``labels`` when
    given, unless split by random groups), written to ``splits.json``. With ``split.test_groups`` the test cells are
    those groups of ``split.split_by`` (a shift split), and train/val a split by cell of the rest."""
    split = cfg.split
    test_groups = split.get("test_groups")
    splits = split_train_val_test(
        store,
        split.val_fraction,
        split.test_fraction,
        split.seed,
        labels=labels if split.stratify and (split.split_by is None or test_groups) else None,
        group_by=split.split_by,
        test_groups=None if test_groups is None else list(test_groups),
    )
    write_splits(cfg, out, store, splits)
    return splits


def two_way_split(cfg: DictConfig, out: Path, store: CorpusStore) -> dict:
    """Seeded train/val store rows by ``cfg.split`` (whole groups of ``split_by`` when set), written to
    ``splits.json``: the tasks scored on all cells, where validation serves early stopping only."""
    split = cfg.split
    train, val = split_cells(store, split.val_fraction, split.seed, split.split_by)
    splits = {"train": train, "val": val}
    write_splits(cfg, out, store, splits)
    return splits


def write_splits(cfg: DictConfig, out: Path, store: CorpusStore, splits: dict[str, np.ndarray]) -> None:
    record = {
        name: {"store_index": rows.tolist(), "cell_id": store.obs["cell_id"].iloc[rows].tolist()}
        for name, rows in splits.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / "splits.json", json.dumps({"seed": cfg.split.seed, **record}))


def architecture_overrides(cfg: DictConfig) -> dict:
    """Backbone settings a task may change without new weights (null keeps the pretrained one): ``pooling`` and
    ``finetune.dropout`` (the backbone's ``hidden_dropout_prob``)."""
    overrides = {"pooling": cfg.pooling} if cfg.get("pooling") else {}
    if cfg.finetune.dropout is not None:
        overrides["hidden_dropout_prob"] = cfg.finetune.dropout
    return overrides


@torch.no_grad()
def init_decoder_bias(decoder: torch.nn.Module, bias: np.ndarray) -> None:
    """Start a fresh feature decoder at the training cells' average (its bias (F,)): a short fine-tuning run then
    spends its steps on what differs between cells, not on learning the mean."""
    decoder.bias.copy_(torch.as_tensor(bias, dtype=decoder.bias.dtype))


def init_panel_decoder(decoder: torch.nn.Module, train_counts: np.ndarray) -> None:
    """:func:`init_decoder_bias` of a gene-panel decoder: the log of the training cells' (n_train, G) mean panel
    shares."""
    init_decoder_bias(decoder, np.log(panel_shares(train_counts).mean(0) + 1e-8))


def fit(cfg: DictConfig, out: Path, model, tokenizer, datamodule, callbacks: Sequence[pl.Callback]):
    """Fine-tune ``model`` (a head fresh from ``from_pretrained``) by ``cfg.finetune`` to convergence.

    The budget is ``trainer.max_epochs`` epochs (or ``trainer.max_steps`` when set), and the learning-rate schedule
    spans it (:class:`~sc_foundation.training.lightning_module.TrainingModule` with ``max_steps=None`` reads the real
    number of
    steps). Validation runs after every epoch; the weights with the best ``early_stopping.monitor`` (mode
    ``early_stopping.mode``) are exported to ``out/export/best``, and the run stops after ``early_stopping.patience``
    epochs without improvement. The curves go to ``out/curves.csv`` and ``out/curves.png``.

    Returns:
        the trainer, the module and the export directory.
    """
    finetune, stopping = cfg.finetune, cfg.early_stopping
    model.train()  # from_pretrained returns it in eval mode, which Lightning would keep (no dropout)
    if finetune.mode == "frozen":
        model.base_model.requires_grad_(False)
    trainer_kwargs = trainer_arguments(cfg.trainer, model.config)
    prepare_memory(cfg, model, tokenizer, datamodule, trainer_kwargs)
    max_steps = trainer_kwargs.get("max_steps", -1)
    module = TrainingModule(
        model,
        max_steps=None if max_steps in (None, -1) else max_steps,
        backbone_lr_ratio=finetune.backbone_lr_ratio if finetune.mode == "lower_lr" else 1.0,
        layer_lr_decay=finetune.layer_lr_decay,
        **OmegaConf.to_container(cfg.optim),
    )
    logger = hydra.utils.instantiate(cfg.logger, save_dir=str(out)) if cfg.get("logger") else False
    best = ExportBest(tokenizer, out / "export" / "best", monitor=stopping.monitor, mode=stopping.mode)
    callbacks = [
        *callbacks,  # first: a task's metric callback logs what the next ones read
        best,
        EarlyStoppingFrom(
            stopping.start_epoch, monitor=stopping.monitor, mode=stopping.mode, patience=stopping.patience
        ),
        LearningCurves(out, stopping.monitor),
        *([GradualUnfreezing(finetune.unfreeze_epoch)] if finetune.mode == "gradual" else []),
        *console_callbacks(trainer_kwargs),
    ]
    trainer = pl.Trainer(
        **trainer_kwargs,
        default_root_dir=str(out),
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=datamodule)
    if not (best.directory / "config.json").exists():  # no validation ran: the final weights are the best known
        export(trainer, tokenizer, best.directory)
    return trainer, module, best.directory


def other_rank_result(out: Path, trainer: pl.Trainer, module, best: Path) -> dict:
    """What a task returns on a DDP rank other than 0 once training is done. The ranks train together, but rank 0
    alone scores the export, on every test cell once, and writes ``metrics.json``: scored on each rank, each would
    see its share of the cells and write its own file."""
    return {"output_dir": out, "metrics": None, "export": best, "trainer": trainer, "module": module}


def lora_settings(cfg: DictConfig) -> LoraSettings:
    """``finetune.lora`` as :class:`~sc_foundation.models.adapters.LoraSettings`."""
    lora = OmegaConf.to_container(cfg.finetune.lora, resolve=True)
    return LoraSettings(**{**lora, "target_modules": tuple(lora["target_modules"])})


def prepare_memory(cfg: DictConfig, model, tokenizer, datamodule, trainer_kwargs: dict) -> None:
    """Attach LoRA (``finetune.mode=lora``) and gradient checkpointing (``gradient_checkpointing``), then plan the
    run's peak memory (:mod:`sc_foundation.training.memory`) and refuse it, naming settings that fit, when it exceeds
    ``memory.limit_gb`` (default: what the machine has available). ``memory.check=false`` skips the plan."""
    settings = lora_settings(cfg)
    lora_trainable = None if cfg.finetune.mode in ("frozen", "lora") else lora_parameter_count(model, settings)
    if cfg.finetune.mode == "lora":
        attach_lora(model, settings, cfg.pretrained)
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if trainer_kwargs["accelerator"] not in ("cpu", "auto") or torch.cuda.is_available():
        return  # the plan is of this process's resident (CPU) memory
    # Freed activations go back to the system, so the peak is the plan's; about 1.1x slower steps (BENCHMARKS.md).
    releases = bool(cfg.memory.release_freed_memory) and release_freed_memory()
    if not cfg.memory.check:
        return
    datamodule.setup("fit")
    sample = next(iter(datamodule.train_dataloader()))
    # Batches are padded to their longest cell: the longest cell of the data bounds them, the context at most.
    length = int(min(tokenizer.config.context_length, datamodule.store.lengths.max()))
    run = {
        "batch_size": cfg.data.batch_size,
        "accumulate_grad_batches": trainer_kwargs.get("accumulate_grad_batches", 1),
        "gradient_checkpointing": bool(cfg.gradient_checkpointing),
        "lora": cfg.finetune.mode == "lora",
    }
    limit = available_memory(cfg.memory.limit_gb)
    estimate = plan_training(
        model,
        sample,
        run,
        bf16=trainer_kwargs["precision"].startswith("bf16"),
        length=length,
        limit=limit,
        lora_trainable=lora_trainable,
        releases_freed_memory=releases,
    )
    announce(
        f"memory plan: {cfg.data.batch_size} cells x {length} tokens (the longest cell), peak about "
        f"{estimate.format()}; "
        f"limit {limit / 2**30:.2f} GiB"
    )


def training_record(trainer: pl.Trainer) -> dict:
    """How the fine-tuning run went, for metrics.json: ``steps``, ``epochs`` trained, and whether early stopping
    ended it (``stopped_early``, with the ``best_epoch`` of the monitored metric) or the budget did."""
    stopping = trainer.early_stopping_callback
    stopped = stopping is not None and stopping.stopped_epoch > 0
    return {
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "stopped_early": stopped,
        "best_epoch": trainer.current_epoch - 1 - stopping.wait_count if stopping is not None else None,
    }


def run_scvi(cfg: DictConfig) -> bool:
    """Whether to fit the scVI baseline: asked for (``baselines.scvi``) and installed (the ``baselines`` extra)."""
    return bool(cfg.baselines.scvi) and scvi_available()


def skipped_baselines(cfg: DictConfig) -> dict[str, str]:
    """Baselines left out of a run, and why, for metrics.json."""
    if not cfg.baselines.scvi:
        return {"scvi": "baselines.scvi=false"}
    if not scvi_available():
        return {"scvi": 'scvi-tools is not installed: pip install -e ".[baselines]"'}
    return {}
