"""What a run shows: the report of ``train.py`` and ``finetune.py`` on screen and in Hydra's log file, one progress bar
over the run's optimiser steps (on a terminal; elsewhere, a log line every few steps), and a one-line model summary.

Lightning's defaults read badly for step-bounded runs: the bar counts batches per epoch (``Epoch 0/-2 ... 150/150``
with ``max_epochs=-1``, ``60/29`` after a resume), shows the logger's ``v_num``, and the model summary reports
``Total FLOPs: 0`` for a model without an example input.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

from sc_foundation.training.sharding import unsharded_class

log = logging.getLogger(__name__)


def announce(message: str, logger: logging.Logger = log) -> None:
    """Tell the user ``message``: logged under a Hydra app (Hydra writes it to the screen and to its ``<job>.log``),
    printed when ``run(cfg)`` is called directly, where nothing would show a log record."""
    if HydraConfig.initialized():
        logger.info(message)
    else:
        print(message)


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run: optimiser steps done out of ``max_steps`` (resumed runs start where they left
    off), with the progress-bar metrics and no logger version."""

    def init_train_tqdm(self) -> Tqdm:
        trainer = self.trainer
        return Tqdm(
            desc="steps",
            total=trainer.max_steps if trainer.max_steps > 0 else None,
            initial=trainer.global_step,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, *_) -> None:
        """Epochs are no landmark of a step-bounded run: the bar goes on."""

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *_) -> None:
        bar = self.train_progress_bar
        if bar.disable or not self._should_update(trainer.global_step, bar.total):
            return
        bar.update(trainer.global_step - bar.n)
        bar.set_postfix(self.get_metrics(trainer, module))

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, module))

    def get_metrics(self, trainer: pl.Trainer, module: pl.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        return metrics


class StepLogLines(pl.Callback):
    """The progress of a run whose output is not a terminal (a batch job's log, a pipe, CI): a line every
    ``every_n_steps`` optimiser steps and at the end, with the progress-bar metrics and the step rate, instead of a
    bar that a file would receive as hundreds of carriage-return refreshes.

    Args:
        lines: about this many lines over a run of known length; a run of unknown length logs every 50 steps.
    """

    def __init__(self, lines: int = 20):
        self.lines = lines
        self.every_n_steps = 50
        self._started: tuple[int, float] | None = None
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        total = trainer.estimated_stepping_batches
        if total and total != float("inf"):
            self.every_n_steps = max(1, round(total / self.lines))
        self._started = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *_) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._log(trainer, module)

    def _log(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step or self._started is None:
            return  # several batches per step (gradient accumulation) reach here with the same step
        self._last_step = step
        total = trainer.estimated_stepping_batches
        done = f"step {step}/{total}" if total and total != float("inf") else f"step {step}"
        first_step, started = self._started
        rate = (step - first_step) / max(time.perf_counter() - started, 1e-9)
        metrics = {k: v for k, v in trainer.progress_bar_metrics.items() if k != "v_num"}
        shown = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in metrics.items())
        announce(f"{done}, epoch {trainer.current_epoch}{shown}, {rate:.2f} steps/s", log)


class ParameterSummary(pl.Callback):
    """The model summary as one line: the head's class and its total and trainable parameters."""

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = getattr(module, "model", module)  # under FSDP, numel() of a shard is its global size
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        announce(f"model: {unsharded_class(model).__name__}, {total:,} parameters ({trainable:,} trainable)", log)


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip")


def console_callbacks(trainer_kwargs: dict) -> list[pl.Callback]:
    """Our progress bar (a terminal) or progress lines (anything else) and model summary in place of Lightning's, as
    ``trainer_kwargs`` enables them.

    Switches Lightning's own summary off in ``trainer_kwargs`` and drops Lightning's product tips from its log.
    """
    callbacks = []
    if trainer_kwargs.get("enable_progress_bar", True):
        if sys.stdout.isatty():
            callbacks.append(StepProgressBar())
        else:
            callbacks.append(StepLogLines())
            trainer_kwargs["enable_progress_bar"] = False  # else Lightning adds its own bar
    if trainer_kwargs.get("enable_model_summary", True):
        callbacks.append(ParameterSummary())
    trainer_kwargs["enable_model_summary"] = False
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if _not_an_advert not in rank_zero.filters:
        rank_zero.addFilter(_not_an_advert)
    # Third-party noise a user cannot act on: jax (under scib-metrics) looking for a TPU, and a deprecation inside
    # Lightning's own pytree helper.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=UserWarning)
    return callbacks
