"""Where a run writes, and how a Lightning run exports its model: shared by pretraining (``train.py``) and the
fine-tuning tasks (:mod:`sc_foundation.tasks`)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sc_foundation.data.tokenization import GeneTokenizer
from sc_foundation.models.adapters import export_state
from sc_foundation.models.export import export_pretrained
from sc_foundation.training.console import announce
from sc_foundation.training.hardware import model_sizes, precision_reason, resolve_precision
from sc_foundation.training.sharding import gather_model


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir``, else Hydra's run directory, else ``outputs/<date>/<time>`` (a composed config)."""
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    if HydraConfig.initialized() and HydraConfig.get().runtime.output_dir:
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def trainer_arguments(trainer: DictConfig, model_config=None) -> dict:
    """``pl.Trainer`` keyword arguments from a ``conf/trainer`` config: precision ``auto`` resolved for the
    accelerator and the size of the model it will train (``model_config``, an HF config; None: unknown)
    (:func:`~sc_foundation.training.hardware.resolve_precision`; the run report says what and why), and a strategy
    given as a ``{_target_: ...}`` dict (``trainer=fsdp``) instantiated, which Lightning would refuse as an unknown
    name."""
    kwargs = OmegaConf.to_container(trainer, resolve=True)
    requested = kwargs["precision"]
    sizes = {} if model_config is None else model_sizes(model_config)
    kwargs["precision"] = resolve_precision(requested, kwargs["accelerator"], **sizes)
    reason = precision_reason(requested, kwargs["accelerator"], **sizes)
    announce(f"precision: {kwargs['precision']} ({reason})")
    if isinstance(kwargs.get("strategy"), dict):
        kwargs["strategy"] = hydra.utils.instantiate(kwargs["strategy"])
    return kwargs


def export(
    trainer: pl.Trainer,
    tokenizer: GeneTokenizer,
    directory: Path,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Export the trained model. Called on every rank (FSDP gathers the full weights collectively); rank 0 writes."""
    model = gather_model(trainer)
    if trainer.is_global_zero:
        weights, adapter_files = export_state(model, model.state_dict())  # LoRA: merged, or the adapters alone
        extra_files = {**adapter_files, **(extra_files or {})}
        export_pretrained(model, tokenizer, directory, state_dict=weights, extra_files=extra_files)
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

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = self.sign * float(trainer.callback_metrics[self.monitor])  # averaged over ranks: the same on each
        if value < self.best:
            self.best = value
            export(trainer, self.tokenizer, self.directory)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]


def probe_score(results: dict) -> float:
    """One number for a probe round (``RepresentationProbe.evaluate``): the mean, over sets and their headline
    metrics (kNN accuracy, AvgBIO, and the batch score where a set has batches), of ours over PCA's."""
    ratios = [value for result in results.values() for value in result["ratio"].values()]
    return float(sum(ratios) / len(ratios))


class ExportBestProbe(pl.Callback):
    """Exports the model to ``directory`` whenever a probe round reaches a new best :func:`probe_score`.

    Validation loss keeps falling while the embedding can get worse (PBMC's probes peak early in a long run): this
    keeps the checkpoint by what the embedding is for. It reads the rounds of a :class:`ProbeCallback` placed before
    it in the Trainer's callbacks; rank 0 decides, every rank exports (FSDP gathers collectively).
    """

    def __init__(self, probes, tokenizer: GeneTokenizer, directory: Path):
        self.probes = probes
        self.tokenizer = tokenizer
        self.directory = directory
        self.best = -math.inf
        self._seen = 0

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        history = self.probes.history
        score = probe_score(history[-1]["results"]) if trainer.is_global_zero and len(history) > self._seen else None
        self._seen = len(history)
        improved = score is not None and score > self.best
        if trainer.strategy.broadcast(improved, src=0):
            if trainer.is_global_zero:
                self.best = score
            export(trainer, self.tokenizer, self.directory)

    def state_dict(self) -> dict:
        return {"best": self.best, "seen": self._seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self._seen = state_dict["best"], state_dict["seen"]
