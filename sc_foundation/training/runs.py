"""Where a run writes, and how a Lightning run exports its model: shared by pretraining (``train.py``) and the
fine-tuning tasks (:mod:`sc_foundation.tasks`)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sc_foundation.data.tokenization import GeneTokenizer
from sc_foundation.models.adapters import export_state
from sc_foundation.models.export import export_pretrained
from sc_foundation.training.lightning_module import TrainingModule


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir``, else Hydra's run directory, else ``outputs/<date>/<time>`` (a composed config)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def export(
    trainer: pl.Trainer,
    module: TrainingModule,
    tokenizer: GeneTokenizer,
    directory: Path,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Export the trained model. Called on every rank (FSDP gathers the full weights collectively); rank 0 writes."""
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        prefix = "model."
        weights = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        weights, adapter_files = export_state(module.model, weights)  # LoRA: merged, or the adapters alone
        extra_files = {**adapter_files, **(extra_files or {})}
        export_pretrained(module.model, tokenizer, directory, state_dict=weights, extra_files=extra_files)
    trainer.strategy.barrier("export")
    return directory


def best_note(directory: Path) -> str:
    """How the run's last line names ``export/best``: only when it exists (no validation ran, none does)."""
    if (directory / "config.json").is_file():
        return f" (best validation loss: {directory.resolve()})"
    return " (no validation ran, so there is no export/best)"


class ExportBest(pl.Callback):
    """Exports the model to ``directory`` whenever the monitored validation metric reaches a new best.

    Args:
        monitor: a logged metric (``val/loss``, a task's ``val/macro_f1``).
        mode: ``min`` (a loss) or ``max`` (a score).
    """

    def __init__(self, tokenizer: GeneTokenizer, directory: Path, monitor: str = "val/loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.tokenizer = tokenizer
        self.directory = directory
        self.monitor = monitor
        self.sign = 1.0 if mode == "min" else -1.0  # compares sign * value, lower is better
        self.best = math.inf

    def on_validation_end(self, trainer: pl.Trainer, module: TrainingModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = self.sign * float(trainer.callback_metrics[self.monitor])  # averaged over ranks: the same on each
        if value < self.best:
            self.best = value
            export(trainer, module, self.tokenizer, self.directory)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]
