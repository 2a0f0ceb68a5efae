"""Pretraining entry point: ``python train.py [hydra overrides]``.

Builds (or reuses) the tokenized corpus store of ``conf/data``, prints its report and the batch padding figures,
pretrains the head of the store's value encoding (``conf/model``, ``conf/trainer``, ``conf/logger``) and exports the
model with its tokenizer to ``<output_dir>/export/best`` (lowest validation loss) and ``<output_dir>/export/final``.
Lightning checkpoints (``<output_dir>/checkpoints/last.ckpt``) only serve resuming: ``ckpt_path=...``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from sc_foundation.configuration import ScFoundationConfig
from sc_foundation.console import announce, console_callbacks
from sc_foundation.data import CorpusDataModule
from sc_foundation.datasets import corpus_inputs
from sc_foundation.export import export_pretrained
from sc_foundation.hardware import resolve_precision
from sc_foundation.modeling import ScFoundationForMaskedGeneModeling, ScFoundationForMaskedValueModeling
from sc_foundation.store import CorpusStore, build_store
from sc_foundation.tokenization import GeneTokenizer, TokenizerConfig
from sc_foundation.training import TrainingModule


def build_corpus(cfg: DictConfig):
    """The corpus store described by ``cfg.data``: built, resumed, or reused when complete."""
    data = cfg.data
    inputs = corpus_inputs(list(data.datasets), OmegaConf.to_container(data.files, resolve=True))
    return build_store(
        inputs,
        data.store_dir,
        tokenizer_config=TokenizerConfig(**OmegaConf.to_container(data.tokenizer, resolve=True)),
        vocab=data.vocab,
        min_cells_per_gene=data.min_cells_per_gene,
        obs_keys=list(data.obs_keys),
        chunk_size=data.chunk_size,
        num_workers=data.build_workers,
        overwrite=data.rebuild_stale_store,
    )


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir``, else Hydra's run directory, else ``outputs/<date>/<time>`` (a composed config)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def build_model(cfg: DictConfig, store: CorpusStore):
    """The pretraining head of the store's value encoding; vocabulary, special ids and encoding from its tokenizer."""
    config = ScFoundationConfig.from_tokenizer(store.tokenizer, **OmegaConf.to_container(cfg.model, resolve=True))
    head = ScFoundationForMaskedGeneModeling if config.value_encoding == "rank" else ScFoundationForMaskedValueModeling
    return head(config)


def export(trainer: pl.Trainer, module: TrainingModule, tokenizer: GeneTokenizer, directory: Path) -> Path:
    """Export the trained model. Called on every rank (FSDP gathers the full weights collectively); rank 0 writes."""
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        prefix = "model."
        weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        export_pretrained(module.model, tokenizer, directory, state_dict=weights)
    trainer.strategy.barrier("export")
    return directory


def best_note(directory: Path) -> str:
    """How the run's last line names ``export/best``: only when it exists (no validation ran, none does)."""
    if (directory / "config.json").is_file():
        return f" (best validation loss: {directory.resolve()})"
    return " (no validation ran, so there is no export/best)"


class ExportBest(pl.Callback):
    """Exports the model to ``directory`` whenever the validation loss reaches a new low."""

    def __init__(self, tokenizer: GeneTokenizer, directory: Path, monitor: str = "val/loss"):
        self.tokenizer = tokenizer
        self.directory = directory
        self.monitor = monitor
        self.best = math.inf

    def on_validation_end(self, trainer: pl.Trainer, module: TrainingModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])  # averaged over ranks: the same on each
        if value < self.best:
            self.best = value
            export(trainer, module, self.tokenizer, self.directory)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]


def run(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """Everything ``train.py`` does, callable from tests with a composed config (and extra Trainer callbacks)."""
    report = build_corpus(cfg)
    announce(report.format())
    datamodule = CorpusDataModule(report.path, seed=cfg.seed, **OmegaConf.to_container(cfg.data.loader, resolve=True))
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
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_kwargs["precision"] = resolve_precision(trainer_kwargs["precision"], trainer_kwargs["accelerator"])
    module = TrainingModule(model, max_steps=trainer_kwargs["max_steps"], **OmegaConf.to_container(cfg.optim))
    logger = hydra.utils.instantiate(cfg.logger, save_dir=str(out)) if cfg.get("logger") else False
    if isinstance(trainer_kwargs.get("strategy"), dict):
        trainer_kwargs["strategy"] = hydra.utils.instantiate(trainer_kwargs["strategy"])
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints",
        save_last=True,
        save_top_k=0,
        **OmegaConf.to_container(cfg.checkpoint, resolve=True),
    )
    best = ExportBest(store.tokenizer, out / "export" / "best")
    configured = [hydra.utils.instantiate(c) for c in cfg.get("callbacks") or []]
    callbacks = [checkpoints, best, *console_callbacks(trainer_kwargs), *configured, *callbacks]
    trainer = pl.Trainer(**trainer_kwargs, default_root_dir=str(out), logger=logger, callbacks=callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    final = export(trainer, module, store.tokenizer, out / "export" / "final")
    if trainer.is_global_zero:
        announce(f"exported model: {final.resolve()}{best_note(best.directory)}")
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
    }


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
