"""Training a task to convergence: its own validation metric, learning curves, and gradual unfreezing.

A fine-tuning run is budgeted in epochs over the training cells (``trainer.max_epochs``); the learning-rate schedule
spans that budget, and early stopping ends it once the task's own validation metric (``early_stopping.monitor``:
``val/macro_f1`` for annotation, the likelihood ``val/loss`` for the decoding tasks) has not improved for
``early_stopping.patience`` epochs (counted from ``early_stopping.start_epoch``). These callbacks supply the metric,
stop the run, record the curves and unfreeze the backbone.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from sklearn.metrics import f1_score

from sc_foundation.data.genes import _atomic_write_text

TIE_BREAK = 1e-4  # weight of the validation loss against macro-F1: below any F1 step of a few hundred cells


class ValidationMacroF1(pl.Callback):
    """Logs ``val/macro_f1``, the macro-averaged F1 of the validation cells' predicted classes, after each validation,
    and ``val/macro_f1_then_loss``: the same minus ``1e-4 * val/loss``, which selects by macro-F1 and, among epochs
    of equal macro-F1 (a few dozen validation cells make ties common, e.g. several epochs at 1.0), the one with the
    lower validation loss, rather than the first.

    Reads the logits of the output the training module returns from each validation step (no second forward pass)
    and the batch's ``labels``; under DDP the predictions of every rank's validation cells are gathered first.
    Classes absent from the validation cells count only if predicted (scikit-learn's ``labels=None`` convention), as
    in the test metrics.
    """

    def on_validation_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._predicted, self._true, self._losses = [], [], []

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._predicted.append(outputs["output"].logits.argmax(-1).cpu())
        self._true.append(batch["labels"].cpu())
        self._losses.append(float(outputs["loss"]) * len(batch["labels"]))  # the batch's summed loss

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        true = torch.cat(self._true).numpy() if self._true else np.zeros(0, dtype=np.int64)
        predicted = torch.cat(self._predicted).numpy() if self._predicted else np.zeros(0, dtype=np.int64)
        losses = sum(self._losses)
        if trainer.world_size > 1:
            # Each rank validated its own share of the cells: score them all, so that every rank logs the same
            # value, agrees on a new best (ExportBest's export is a collective) and on when to stop.
            shares = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, (true, predicted, losses))
            true, predicted = np.concatenate([s[0] for s in shares]), np.concatenate([s[1] for s in shares])
            losses = sum(s[2] for s in shares)
        if not len(true):
            return
        score = float(f1_score(true, predicted, average="macro", zero_division=0))
        module.log("val/macro_f1", score, prog_bar=True)
        loss = losses / len(true)  # the mean validation loss per cell, as val/loss
        module.log("val/macro_f1_then_loss", score - TIE_BREAK * min(loss, 100.0))


class EarlyStoppingFrom(EarlyStopping):
    """Lightning's early stopping, silent before ``start_epoch``: patience counts from that epoch's validation on.

    Why: a task whose loss rises for a while by design stops inside that rise with ordinary patience. Integration is
    one: its discriminator takes hold around epochs 8-13 and the reconstruction loss climbs before it falls again.
    The best weights are still chosen over every epoch (the export callback watches them all).
    """

    def __init__(self, start_epoch: int = 0, **kwargs):
        if start_epoch < 0:
            raise ValueError(f"early_stopping.start_epoch must be 0 or more, got {start_epoch}")
        super().__init__(**kwargs)
        self.start_epoch = start_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch >= self.start_epoch:
            super().on_validation_end(trainer, pl_module)


class LearningCurves(pl.Callback):
    """Writes the run's learning curves: ``curves.csv`` after every validation, ``curves.png`` at the end.

    One row per validation: ``epoch``, ``step``, ``wall_s`` (seconds since training started), ``train_loss`` (mean
    of the training steps since the last row), ``lr`` (the head's) and every logged ``val/*`` metric. The PNG plots
    the losses against the epoch, and the monitored metric on its own axis when it is not a loss. Rank 0 writes;
    each file is replaced atomically.
    """

    def __init__(self, directory: Path, monitor: str):
        self.directory = Path(directory)
        self.monitor = monitor
        self.rows: list[dict] = []
        self._losses: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._losses.append(float(loss))

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "wall_s": round(time.perf_counter() - self._started, 2),
            "train_loss": float(np.mean(self._losses)) if self._losses else math.nan,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        metrics = sorted(trainer.callback_metrics.items())
        row |= {name: float(value) for name, value in metrics if name.startswith("val/")}
        self.rows.append(row)
        self._losses = []
        self.write_csv()

    def on_fit_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.rows:
            self.write_png()

    def write_csv(self) -> Path:
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.directory / "curves.csv", buffer.getvalue())
        return self.directory / "curves.csv"

    def write_png(self) -> Path:
        # A bare Figure, not pyplot: no backend switch and no display in a notebook that called the task.
        from matplotlib.figure import Figure

        epochs = [row["epoch"] + 1 for row in self.rows]
        figure = Figure(figsize=(6, 4))
        losses = figure.subplots()
        losses.plot(epochs, [row["train_loss"] for row in self.rows], label="train loss")
        losses.plot(epochs, [row.get("val/loss", math.nan) for row in self.rows], label="val loss")
        losses.set_xlabel("epoch")
        losses.set_ylabel("loss")
        handles = losses.get_legend_handles_labels()
        if self.monitor != "val/loss":
            metric = losses.twinx()
            metric.plot(epochs, [row.get(self.monitor, math.nan) for row in self.rows], color="C2", label=self.monitor)
            metric.set_ylabel(self.monitor)
            extra = metric.get_legend_handles_labels()
            handles = (handles[0] + extra[0], handles[1] + extra[1])
        losses.legend(*handles, loc="best")
        figure.tight_layout()
        path = self.directory / "curves.png"
        temporary = path.with_name(f".tmp-{path.name}")
        figure.savefig(temporary, dpi=100, format="png")
        temporary.replace(path)
        return path


class GradualUnfreezing(pl.Callback):
    """``finetune.mode=gradual``: the backbone is frozen for the first ``unfreeze_epoch`` epochs, so a fresh head
    learns on fixed features first, then everything trains (at the schedule's rate by then).

    Frozen by dropping the backbone's gradients before each optimiser step (before clipping, so the clipping norm is
    the head's), not by ``requires_grad``: DDP builds its gradient reducer over the parameters that require
    gradients when training starts and fails at the next step when that set changes (and a parameter that starts
    frozen would never be synchronised once unfrozen). AdamW skips parameters without gradients, so the backbone
    stays put, weight decay included, exactly as if it were frozen; the price is the backbone's backward pass
    during the frozen epochs.
    """

    def __init__(self, unfreeze_epoch: int):
        if unfreeze_epoch < 1:
            raise ValueError(f"finetune.unfreeze_epoch must be >= 1, got {unfreeze_epoch}")
        self.unfreeze_epoch = unfreeze_epoch

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer) -> None:
        if trainer.current_epoch < self.unfreeze_epoch:
            for param in module.model.base_model.parameters():
                param.grad = None
