"""Memory planned before a run: the peak a training run will reach, estimated from the model and the batch shape it
will see, and a refusal, naming the settings that would fit, when the machine cannot hold it.

The peak resident memory of a training step is estimated as

    baseline (the process as it stands: libraries, data, the model's weights)
    + gradients (one fp32 value per trainable weight)
    + optimizer state (AdamW: two fp32 moments per trainable weight)
    + activations (what autograd saves for the backward pass, at the planned batch and context)
    + workspace (one Transformer block's saved activations again: recomputed under checkpointing, or the gradients
      flowing back through it otherwise)

The activations are not guessed from a formula: the model's forward runs once under ``FakeTensorMode`` (shapes and
dtypes only, no memory, about a second) on a batch of the planned shape, with ``saved_tensors_hooks`` adding up the
bytes of every tensor saved for backward, block by block; under bf16 autocast the casts are traced as they happen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import psutil
import torch
from torch.func import functional_call

GIB = 2**30
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32, one each per trainable weight


class MemoryPlanError(RuntimeError):
    """A run that would not fit in the memory it may use, refused before it starts."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak resident memory of a training step, in bytes, by part (see the module docstring)."""

    baseline: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        """The peak: the process baseline (which holds the weights) plus what training adds."""
        return self.baseline + self.gradients + self.optimizer + self.activations + self.workspace

    @property
    def added(self) -> int:
        """What training adds to the process as it stands."""
        return self.total - self.baseline

    def format(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.2f}"
            for name in ("baseline", "gradients", "optimizer", "activations", "workspace")
        )
        return f"{self.total / GIB:.2f} GiB ({parts}; weights {self.weights / GIB:.2f} within the baseline)"


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def planned_batch(batch: Mapping[str, torch.Tensor], batch_size: int, length: int) -> dict[str, torch.Tensor]:
    """A batch of ``batch_size`` cells of ``length`` tokens each, every token real, tiled from a real padded
    ``batch``: token tensors (B, L, ...) become (batch_size, length, ...), per-cell tensors (B, ...) become
    (batch_size, ...). The worst case of the run: every cell fills the context."""
    cells, tokens = batch["input_ids"].shape
    rows = torch.arange(batch_size) % cells
    columns = torch.arange(length) % tokens
    planned = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            planned[key] = value
        elif key == "attention_mask":
            planned[key] = torch.ones(batch_size, length, dtype=value.dtype)
        elif value.dim() >= 2 and value.shape[:2] == (cells, tokens):
            planned[key] = value[rows][:, columns]
        elif value.shape[0] == cells:
            planned[key] = value[rows]
        else:
            planned[key] = value
    return planned


def saved_activations(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], bf16: bool) -> tuple[int, list[int]]:
    """Bytes autograd saves for backward in one training forward of ``model`` on ``batch``: (outside the blocks, per
    block). Traced under ``FakeTensorMode`` (no memory is used, nothing is computed); a head whose forward reads
    values (a data-dependent shape, which fake tensors cannot know) is run for real on two of the cells and scaled
    to the batch. Parameters saved as they are are not counted (they are the weights); their bf16 casts under
    autocast are."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    try:
        return _trace_saved(model, batch, bf16, fake=True)
    except (DataDependentOutputException, DynamicOutputShapeException):
        cells = batch["input_ids"].shape[0]
        few = planned_batch(batch, min(2, cells), batch["input_ids"].shape[1])
        outside, per_block = _trace_saved(model, few, bf16, fake=False)
        scale = cells / few["input_ids"].shape[0]
        return int(outside * scale), [int(size * scale) for size in per_block]


def _trace_saved(model, batch, bf16: bool, fake: bool) -> tuple[int, list[int]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sc_foundation.training.lightning_module import TrainingModule

    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    convert = mode.from_tensor if fake else (lambda tensor: tensor)
    state = {name: convert(p) for name, p in model.named_parameters()}
    state |= {name: convert(b) for name, b in model.named_buffers()}
    weights = {id(t) for t in state.values()}
    inputs = {key: convert(v) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    blocks = list(getattr(model.base_model, "layers", ()))
    per_block, current, outside = [0] * len(blocks), [None], [0]
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda *_: current.__setitem__(0, None)))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in weights:
            size = tensor.numel() * tensor.element_size()
            if current[0] is None:
                outside[0] += size
            else:
                per_block[current[0]] += size
        return None if not fake else tensor  # a real run keeps nothing: no backward follows

    checkpointing = getattr(model.base_model, "gradient_checkpointing", False)
    was_training = model.training
    step = TrainingModule(model)  # its forward drops the batch keys the model does not take
    try:
        model.base_model.gradient_checkpointing = False  # trace every block's own saved tensors
        model.train()
        with (
            mode,
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            functional_call(step, {f"model.{name}": value for name, value in state.items()}, (inputs,))
    finally:
        model.base_model.gradient_checkpointing = checkpointing
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return outside[0], per_block


def estimate_training_memory(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    batch_size: int,
    length: int,
    bf16: bool,
    gradient_checkpointing: bool,
    baseline: int | None = None,
    trainable: int | None = None,
) -> MemoryEstimate:
    """The peak resident memory of training ``model`` (its parameters' ``requires_grad`` as they will train) with
    AdamW on batches of ``batch_size`` cells of ``length`` tokens, shaped like the real ``batch``.

    Args:
        bf16: under bf16 autocast (``bf16-mixed``): fp32 weights, bf16 matmul activations.
        gradient_checkpointing: blocks keep only their input (B, L, h) and recompute the rest in backward.
        baseline: the process's resident bytes before training; default: now.
        trainable: trainable weights to plan for instead of the model's own (e.g. LoRA's, before it is attached).
    """
    outside, per_block = saved_activations(model, planned_batch(batch, batch_size, length), bf16)
    trainable = trainable_parameters(model) if trainable is None else trainable
    largest_block = max(per_block, default=0)
    if gradient_checkpointing:
        hidden = model.config.hidden_size
        activations = outside + len(per_block) * batch_size * length * hidden * 4  # each block's fp32 input
    else:
        activations = outside + sum(per_block)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return MemoryEstimate(
        baseline=psutil.Process().memory_info().rss if baseline is None else baseline,
        weights=weights,
        gradients=trainable * 4,
        optimizer=trainable * 4 * ADAMW_STATES,
        activations=activations,
        workspace=largest_block,
    )


def plan_training(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    settings: dict,
    *,
    bf16: bool,
    length: int,
    limit: int,
    lora_trainable: int | None = None,
) -> MemoryEstimate:
    """The run's estimated peak, or a refusal when it exceeds ``limit`` bytes.

    Args:
        settings: ``batch_size``, ``accumulate_grad_batches``, ``gradient_checkpointing`` and ``lora`` (whether the
            model already trains LoRA adapters), as the run is configured.
        lora_trainable: the trainable weights the model would have under LoRA, so that LoRA can be proposed.

    Raises:
        MemoryPlanError: the estimate exceeds ``limit``; the message names the settings that would fit.
    """
    baseline = psutil.Process().memory_info().rss

    def estimate(batch_size: int, gradient_checkpointing: bool, lora: bool) -> MemoryEstimate:
        return estimate_training_memory(
            model,
            batch,
            batch_size=batch_size,
            length=length,
            bf16=bf16,
            gradient_checkpointing=gradient_checkpointing,
            baseline=baseline,
            trainable=lora_trainable if lora and not settings["lora"] else None,
        )

    planned = estimate(settings["batch_size"], settings["gradient_checkpointing"], settings["lora"])
    if planned.total > limit:
        proposable = {**settings, "lora": settings["lora"] or lora_trainable is None}  # LoRA only where counted
        fits = alternatives(lambda **trial: estimate(**trial).total, proposable, limit)
        raise MemoryPlanError(refusal(planned, limit, fits))
    return planned


def available_memory(limit_gb: float | None = None) -> int:
    """Bytes this process may grow to: ``limit_gb`` when given, else its resident memory now plus what the machine
    has available (psutil's ``available``: free memory and reclaimable caches, other processes' use left out)."""
    if limit_gb is not None:
        return int(limit_gb * GIB)
    return psutil.Process().memory_info().rss + psutil.virtual_memory().available


def alternatives(estimate_for, settings: dict, limit: int, most: int = 4) -> list[str]:
    """Up to ``most`` changes of settings that would fit within ``limit`` bytes, each as the overrides to pass, found
    by re-estimating: smaller micro-batches accumulated to the same cells per optimizer step, gradient
    checkpointing, LoRA, and their combinations, in that order of preference.

    Args:
        estimate_for: ``estimate_for(batch_size=..., gradient_checkpointing=..., lora=...)`` -> bytes, a candidate's
            estimated peak.
        settings: the run's ``batch_size``, ``accumulate_grad_batches``, ``gradient_checkpointing`` and ``lora``.
    """
    batch, accumulate = settings["batch_size"], settings["accumulate_grad_batches"]
    splits = [
        {"batch_size": batch // factor, "accumulate_grad_batches": accumulate * factor}
        for factor in (2, 4, 8, 16)
        if batch % factor == 0
    ]
    switches = [{}]
    if not settings["gradient_checkpointing"]:
        switches.append({"gradient_checkpointing": True})
    if not settings["lora"]:
        switches += [{"lora": True}, *([{"gradient_checkpointing": True, "lora": True}] if len(switches) > 1 else [])]
    fits = []
    for switch in switches:
        for split in [{}, *splits]:
            change = {**switch, **split}
            if not change:
                continue
            trial = {**settings, **change}
            peak = estimate_for(
                batch_size=trial["batch_size"],
                gradient_checkpointing=trial["gradient_checkpointing"],
                lora=trial["lora"],
            )
            if peak <= limit:
                overrides = " ".join(_override(name, value) for name, value in change.items())
                fits.append(f"{overrides}  (estimated peak {peak / GIB:.2f} GiB)")
                break  # the largest micro-batch that fits with this switch
        if len(fits) == most:
            break
    return fits


_OVERRIDES = {
    "batch_size": "data.batch_size",
    "accumulate_grad_batches": "trainer.accumulate_grad_batches",
    "gradient_checkpointing": "gradient_checkpointing",
    "lora": "finetune.mode",
}


def _override(name: str, value) -> str:
    if name == "lora":
        return "finetune.mode=lora"
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{_OVERRIDES[name]}={value}"


def refusal(estimate: MemoryEstimate, limit: int, fits: list[str]) -> str:
    """The message of a run refused for memory: what it needs, what it may use, and what would fit."""
    lines = [
        f"this run would need about {estimate.total / GIB:.2f} GiB at its peak, more than the {limit / GIB:.2f} GiB "
        f"it may use (memory.limit_gb, or what the machine has available). Estimate: {estimate.format()}.",
    ]
    if fits:
        lines.append("Settings that would fit (pass them as overrides):")
        lines += [f"  {fit}" for fit in fits]
    else:
        lines.append(
            "No smaller batch, gradient checkpointing or finetune.mode=lora fits either: use a machine with more "
            "memory, a shorter context (data.panel_genes) or a smaller model."
        )
    lines.append("memory.check=false skips this check.")
    return "\n".join(lines)
