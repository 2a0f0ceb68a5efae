"""One generic LightningModule for every head: optimiser, learning-rate schedule, loss logging and throughput.

:class:`TrainingModule` wraps any model whose ``forward`` takes the batch's tensors as keyword arguments and returns
an output with ``.loss`` (every ``ScFoundationFor<Task>`` head). It reads nothing of the model but its ``forward``
signature, its parameters and, for the FLOP estimate, ``config.num_hidden_layers`` and ``config.hidden_size``.

Shapes: a padded batch holds ``B`` cells of length ``L`` (``attention_mask`` (B, L) marks the real tokens); a packed
batch is one row of ``T`` tokens whose cells ``cu_seqlens`` (B + 1,) delimits.
"""

import inspect
import math
import time
from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn

from sc_foundation.training.sharding import is_sharded, shard_per_layer

H100_BF16_DENSE_FLOPS = 989e12
"""Peak dense bf16 tensor-core throughput of one H100 SXM, in FLOP/s (NVIDIA's datasheet figure without sparsity)."""


def training_flops(
    non_embedding_params: int, tokens: int, sum_squared_lengths: int, num_layers: int, hidden_size: int
) -> float:
    """Estimated FLOPs of one forward and backward pass over a set of cells.

    ``6·N·T`` counts the weight matmuls (2 FLOPs per multiply-add, forward plus a backward twice as costly) and
    ``12·n·d·Σ L_i²`` the attention scores and their weighted sum, which grow with each cell's own length ``L_i``
    (cells attend only within themselves). Embedding lookups are not matmuls, hence ``N`` excludes them. Padding is
    not counted: the estimate is of useful work, so padding waste shows as a lower MFU.

    Args:
        non_embedding_params: ``N``, trainable parameters outside embedding tables.
        tokens: ``T = Σ L_i``, real tokens of the cells.
        sum_squared_lengths: ``Σ L_i²`` over the cells.
        num_layers: ``n``, Transformer blocks.
        hidden_size: ``d``, width of the residual stream.
    """
    return 6.0 * non_embedding_params * tokens + 12.0 * num_layers * hidden_size * sum_squared_lengths


def warmup_cosine_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` steps, reaching the peak at step ``warmup_steps - 1`` (the first step
    already moves the weights, unlike a ramp that starts at 0); then a half cosine from 1 at step ``warmup_steps``
    down to ``min_lr_ratio`` at ``max_steps``, where it stays.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_decay_parameters(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """Trainable parameters by name, split into (decayed, not decayed).

    Exempt from weight decay: every parameter with fewer than two dimensions (biases, LayerNorm scales and shifts,
    learned vectors such as a mask embedding), where decay only pulls offsets and gains away from their meaning,
    and every ``nn.Embedding`` weight: AdamW's decoupled decay shrinks all rows at every step while only the rows of
    the genes in the batch get gradient, so rarely seen genes would fade. Decided by shape and module type, so a
    new module needs no naming convention. A parameter shared by two modules (tied weights) is listed once, under
    its first name; frozen parameters are left out.
    """
    decay, no_decay, seen = {}, {}, set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            exempt = param.ndim < 2 or isinstance(module, nn.Embedding)
            (no_decay if exempt else decay)[name] = param
    return decay, no_decay


def count_non_embedding_parameters(model: nn.Module) -> int:
    """``N`` of :func:`training_flops`: trainable parameters that are not ``nn.Embedding`` weights."""
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in embedding)


def _loss_terms(output) -> dict[str, torch.Tensor]:
    """The named terms of a composite loss (``masked_loss``, ``contrastive_loss``, ...) that an output carries."""
    return {
        name: value
        for name, value in output.items()
        if name.endswith("_loss") and isinstance(value, torch.Tensor) and value.dim() == 0
    }


def _cell_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) real tokens per cell, from ``attention_mask`` (padded) or ``cu_seqlens`` (packed)."""
    if "cu_seqlens" in batch:
        return batch["cu_seqlens"].diff()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(dim=1)
    input_ids = batch["input_ids"]  # no padding at all: every row is one full cell
    return torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)


class TrainingModule(pl.LightningModule):
    """Trains any ``ScFoundationPreTrainedModel`` head (pretraining or fine-tuning) on batches of tensors.

    Optimiser: AdamW over two groups (see :func:`split_decay_parameters`); learning rate from a linear warm-up and a
    cosine decay to ``min_lr_ratio * learning_rate`` (:func:`warmup_cosine_factor`), stepped per optimiser step.
    Gradient clipping is left to the Trainer (``pl.Trainer(gradient_clip_val=1.0)``), which clips after unscaling
    under mixed precision and knows the strategy (FSDP shards need its own clipping).

    Logged: ``train/loss``, ``train/lr`` and the terms of a composite loss (``train/masked_loss``, ...) every
    step; ``val/loss`` per epoch, averaged over ranks; and at each logging step (``Trainer(log_every_n_steps=...)``)
    the throughput of this device over the steps since the last:
    ``train/cells_per_s``, ``train/tokens_per_s`` (real tokens, padding excluded) and, on CUDA, ``train/mfu``, the
    estimated training FLOPs (:func:`training_flops`) per second over ``peak_flops``. Time spent in validation is
    left out of those windows.

    Args:
        model: a module whose ``forward`` returns an output with ``loss``; batch keys that ``forward`` does not take
            (``cell_index``, labels of other tasks) are dropped.
        learning_rate: peak learning rate.
        weight_decay: AdamW decoupled weight decay of the decayed group.
        betas: AdamW betas.
        warmup_steps: optimiser steps of linear warm-up.
        max_steps: optimiser steps of the whole schedule; None takes ``trainer.estimated_stepping_batches``.
        min_lr_ratio: final learning rate as a fraction of ``learning_rate``.
        backbone_lr_ratio: the backbone's parameters (``model.base_model``) learn at ``learning_rate`` times this,
            the rest (the head) at ``learning_rate``; the schedule scales both alike. Below 1 it fine-tunes a
            pretrained backbone gently while a new head learns at full rate. 1 (default) treats all parameters alike.
        layer_lr_decay: layer-wise learning-rate decay (as in BERT/ELECTRA fine-tuning): each backbone block learns at
            this factor times the rate of the block above it, the embeddings at ``layer_lr_decay ** L``; so the
            layers nearest the head adapt most and the general features below them least. 1 (default): off.
        peak_flops: peak FLOP/s of one device for the MFU estimate. The default is an H100 SXM's dense bf16 rate
            (989 TFLOP/s); set the peak of the device and precision in use (an A100 gives 312e12 in bf16).
    """

    def __init__(
        self,
        model: nn.Module,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 1000,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        peak_flops: float = H100_BF16_DENSE_FLOPS,
        backbone_lr_ratio: float = 1.0,
        layer_lr_decay: float = 1.0,
    ):
        super().__init__()
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, got {warmup_steps}, {min_lr_ratio}")
        if backbone_lr_ratio < 0:
            raise ValueError(f"backbone_lr_ratio must be >= 0, got {backbone_lr_ratio}")
        if not 0 < layer_lr_decay <= 1:
            raise ValueError(f"layer_lr_decay must be in (0, 1], got {layer_lr_decay}")
        if (backbone_lr_ratio, layer_lr_decay) != (1.0, 1.0) and getattr(model, "base_model", model) is model:
            raise ValueError("backbone_lr_ratio and layer_lr_decay need a head whose backbone is model.base_model")
        # The model's weights travel in the checkpoint's state_dict; the hyperparameters are the rest of the recipe.
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        self.peak_flops = peak_flops
        self.backbone_lr_ratio = backbone_lr_ratio
        self.layer_lr_decay = layer_lr_decay
        signature = inspect.signature(model.forward).parameters
        self._forward_keys = set(signature)
        self._forward_takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
        self._window = None  # throughput window: (start time, start step, device tensor [cells, tokens, Σ L²])

    def forward(self, batch: dict[str, torch.Tensor]):
        """The model's output for a batch dict (extra keys dropped)."""
        inputs = {k: v for k, v in batch.items() if self._forward_takes_any or k in self._forward_keys}
        if isinstance(inputs.get("max_seqlen"), torch.Tensor):
            inputs["max_seqlen"] = int(inputs["max_seqlen"])  # the store gives a 0-d tensor; kernels take an int
        return self.model(**inputs)

    def configure_optimizers(self):
        decay, no_decay = split_decay_parameters(self.model)
        groups = [
            {"params": list(decay.values()), "weight_decay": self.weight_decay},
            {"params": list(no_decay.values()), "weight_decay": 0.0},
        ]
        scales = self._lr_scales()
        if any(scale != 1.0 for scale in scales.values()):
            # Each group splits by learning-rate scale; the head's (1.0) comes first, so train/lr logs the head's rate.
            groups = [
                {**group, "params": params, "lr": self.learning_rate * scale}
                for scale in sorted(set(scales.values()), reverse=True)
                for group in groups
                if (params := [p for p in group["params"] if scales[id(p)] == scale])
            ]
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, betas=self.betas)
        max_steps = self.max_steps
        if max_steps is None:
            max_steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(max_steps):
                raise ValueError("max_steps=None needs a finite run: set Trainer(max_steps=...) or max_epochs")
        factor = partial(
            warmup_cosine_factor,
            warmup_steps=self.warmup_steps,
            max_steps=int(max_steps),
            min_lr_ratio=self.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _lr_scales(self) -> dict[int, float]:
        """Each parameter's learning rate as a multiple of ``learning_rate``, by ``id``: 1 for the head;
        ``backbone_lr_ratio * layer_lr_decay ** (L - depth)`` for the backbone, where the embeddings have depth 0,
        block ``i`` depth ``i + 1`` and the final norm depth ``L`` (the number of blocks)."""
        scales = {id(p): 1.0 for p in self.model.parameters()}
        if self.backbone_lr_ratio == 1.0 and self.layer_lr_decay == 1.0:
            return scales
        backbone = self.model.base_model
        depth_count = len(getattr(backbone, "layers", ()))
        for name, param in backbone.named_parameters():
            parts = name.split(".")
            depth = {"layers": None, "embeddings": 0}.get(parts[0], depth_count)
            if depth is None:
                depth = int(parts[1]) + 1
            scales[id(param)] = self.backbone_lr_ratio * self.layer_lr_decay ** (depth_count - depth)
        return scales

    def configure_model(self) -> None:
        """Called by Lightning before the strategy wraps the model, on every rank. Counts the parameters for the
        MFU estimate while they are whole, and under ``trainer=fsdp`` (:class:`~sc_foundation.training.sharding.
        FullyShardedStrategy`, which sets ``device_mesh``) shards the model per Transformer block."""
        if is_sharded(self.model):  # fit, then validate or test: sharded once
            return
        self._non_embedding_params = count_non_embedding_parameters(self.model)
        if self.device_mesh is not None:
            shard_per_layer(self.model, self.device_mesh["data_parallel"])

    def on_train_start(self) -> None:
        self._window = (time.perf_counter(), self.global_step, torch.zeros(3, dtype=torch.long, device=self.device))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        lengths = _cell_lengths(batch).long()
        batch_size = lengths.numel()
        self._log_throughput(batch_size)
        # Counted on the device and read only at logging steps, so no step waits on a GPU sync for them.
        self._window[2].add_(torch.stack([lengths.new_tensor(batch_size), lengths.sum(), (lengths**2).sum()]))
        output = self(batch)
        loss = output.loss
        self.log("train/loss", loss, batch_size=batch_size, prog_bar=True)
        for name, term in _loss_terms(output).items():
            self.log(f"train/{name}", term, batch_size=batch_size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        """Logs ``val/loss``; returns ``{"loss", "output"}``, so a callback's ``on_validation_batch_end`` can score
        the model's output (a task metric such as macro-F1) without a second forward pass."""
        output = self(batch)
        self.log("val/loss", output.loss, batch_size=_cell_lengths(batch).numel(), sync_dist=True, prog_bar=True)
        return {"loss": output.loss, "output": output}

    def on_validation_start(self) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_end(self) -> None:
        if self._window is not None:  # shift the window's start past the validation run
            start, step, counts = self._window
            self._window = (start + time.perf_counter() - self._validation_started, step, counts)

    def _log_throughput(self, batch_size: int) -> None:
        """At the first micro-batch of a logging step, log the window of steps that just ended and open a new one.

        The window closes at the start of the step whose metrics Lightning writes out (``(global_step + 1)`` a
        multiple of ``log_every_n_steps``), so the throughput is logged with the same step's loss.
        """
        every = self.trainer.log_every_n_steps
        start, start_step, counts = self._window
        if every == 0 or (self.global_step + 1) % every or self.global_step == start_step:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued kernels of the window belong to its time
        now = time.perf_counter()
        elapsed = now - start
        cells, tokens, sum_squares = counts.tolist()
        self.log("train/cells_per_s", cells / elapsed, batch_size=batch_size)
        self.log("train/tokens_per_s", tokens / elapsed, batch_size=batch_size)
        if self.device.type == "cuda":
            config = self.model.config
            flops = training_flops(
                self._non_embedding_params, tokens, sum_squares, config.num_hidden_layers, config.hidden_size
            )
            self.log("train/mfu", flops / elapsed / self.peak_flops, batch_size=batch_size)
        self._window = (now, self.global_step, torch.zeros_like(counts))
