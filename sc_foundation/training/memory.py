"""Memory planned before a run: the peak a training run will reach, estimated from the model and the batch shape it
will see, and a refusal, naming the settings that would fit, when the machine cannot hold it.

The estimate is not a formula: one whole training step (forward, backward, AdamW step) runs under
``FakeTensorMode``, on a batch of the planned shape, with the weights' real ``requires_grad``, precision (bf16
autocast traced as it casts) and gradient checkpointing (recomputation traced as it happens). Fake tensors have
shapes, dtypes and lifetimes but no memory and no arithmetic, so the step costs a few seconds whatever the model's
size, and a dispatch mode follows every tensor the step creates from its first op to its last reference: the
largest sum alive at once is the step's tensor peak (activations saved for backward, gradients, optimizer state, and
the transients in between). The peak resident memory of the run is then

    baseline (the process as it stands: libraries, data, the model's weights)
    + tensor peak of the step
    + allowance (ALLOCATOR_ALLOWANCE x the tensor peak: memory the allocator holds beyond live tensors, and kernels'
      own scratch buffers, which fake tensors do not see; measured with :func:`release_freed_memory` in effect,
      which fine-tuning sets)

A head whose forward reads tensor values (a data-dependent shape, which fake tensors cannot know) is estimated from
its saved activations instead, measured on two real cells and scaled to the batch, plus one block's worth of
transients, the gradients and the optimizer state.
"""

from __future__ import annotations

import ctypes
import dataclasses
import sys
import weakref
from collections.abc import Mapping
from pathlib import Path

import psutil
import torch
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 128 * 1024
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32, one each per trainable weight
ALLOCATOR_ALLOWANCE = {True: 0.5, False: 1.5}
"""Resident memory beyond the live tensors, as a share of the step's tensor peak, with :func:`release_freed_memory`
in effect (True) or glibc's default (False): measured 0.01 to 0.37 and 0.37 to 1.43 on this project's CPU
(tests/memory_probe.py, BENCHMARKS.md), rounded up."""
INFERENCE_ALLOWANCE = 0.6
"""The same for an inference forward (no backward, glibc's default heap): the resident rise was 1.02x to 1.57x the
traced tensor peak (batches of 100k down to 20k padded tokens; benchmarks/inference_memory.py, a 512-wide model at a
20,000-token context; BENCHMARKS.md), rounded up. Training's 1.5 made a 2 GiB budget use 0.84 GiB; 0.6 uses 1.25."""


class MemoryPlanError(RuntimeError):
    """A run that would not fit in the memory it may use, refused before it starts."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak resident memory of a training run, in bytes (see the module docstring). ``weights``,
    ``gradients``, ``optimizer`` and ``activations`` (saved for backward) say what the peak is made of."""

    baseline: int
    step_peak: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    releases_freed_memory: bool = True

    @property
    def allowance(self) -> int:
        return int(ALLOCATOR_ALLOWANCE[self.releases_freed_memory] * self.step_peak)

    @property
    def total(self) -> int:
        """The peak: the process baseline (which holds the weights) plus what training adds."""
        return self.baseline + self.added

    @property
    def added(self) -> int:
        """What training adds to the process as it stands."""
        return self.step_peak + self.allowance

    def format(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.2f}"
            for name in ("baseline", "step_peak", "allowance", "activations", "gradients", "optimizer")
        )
        return f"{self.total / GIB:.2f} GiB ({parts})"


def release_freed_memory() -> bool:
    """Have glibc's malloc serve every allocation of 128 KiB or more by its own ``mmap``, handed back to the system
    when freed, instead of raising its threshold as it goes and keeping freed activations in its heap: with its
    default, a training step's resident peak measured up to 2.4x its live tensors (LoRA, whose small saved tensors pin
    the heap), against 1.01-1.37x with this. Returns False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def peak_resident() -> int:
    """The most resident memory this process has held, in bytes: ``VmHWM`` of ``/proc/self/status`` (Linux), the
    high-water mark of this program's own memory (``ru_maxrss`` would carry over the parent's across fork and exec);
    ``ru_maxrss`` elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


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


class _LiveTensors(TorchDispatchMode):
    """Follows the storage of every tensor an op creates until its last reference dies (PyTorch keeps a tensor's
    Python object alive as long as autograd holds the tensor, so a finalizer fires when the storage is really free)
    and records the largest sum alive at once. Views share their base's storage and count once."""

    def __init__(self):
        super().__init__()
        self.references: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _follow(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.references:
            self.references[key] += 1
        else:
            self.references[key], self.sizes[key] = 1, storage.nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.references[key] -= 1
        if not self.references[key]:
            del self.references[key]
            self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in given:  # in-place ops return their input
                self._follow(tensor)
        return out


def trace_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], bf16: bool) -> tuple[int, int]:
    """One training step of ``model`` on ``batch`` (forward, backward, AdamW step) under ``FakeTensorMode``:
    (the tensor peak of the step beyond the weights, the bytes saved for backward). Gradient checkpointing as the
    model has it set. Raises ``DataDependentOutputException`` for a forward that reads values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sc_foundation.training.lightning_module import TrainingModule

    mode = FakeTensorMode()
    weights = {
        name: torch.nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
        for name, p in model.named_parameters()
    }
    state = weights | {name: mode.from_tensor(b) for name, b in model.named_buffers()}
    inputs = {key: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    saved, held = [0], {id(t) for t in state.values()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in held:
            saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    live = _LiveTensors()
    step = TrainingModule(model)  # its forward drops the batch keys the model does not take
    was_training = model.training
    model.train()
    try:
        # The fake weights stand in for the real ones through the backward too: checkpointed blocks recompute there.
        with mode, live, _reparametrize_module(step, {f"model.{name}": value for name, value in state.items()}):
            optimizer = torch.optim.AdamW([p for p in weights.values() if p.requires_grad], lr=1e-4)
            with (
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
            ):
                output = step(inputs)
            output.loss.backward()
            del output
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return live.peak, saved[0]


def trace_inference(module: torch.nn.Module, batch: Mapping[str, torch.Tensor], bf16: bool) -> int:
    """The tensor peak (bytes, beyond the weights) of one inference forward of ``module`` on ``batch`` under
    ``FakeTensorMode`` and ``torch.inference_mode``: what :func:`sc_foundation.embed` holds at once for that batch.
    Raises ``DataDependentOutputException`` for a forward that reads values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    state = {name: mode.from_tensor(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
    inputs = {key: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for key, v in batch.items()}
    live = _LiveTensors()
    was_training = module.training
    module.eval()
    try:
        with (
            torch.inference_mode(),
            mode,
            live,
            _reparametrize_module(module, state),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            module(**inputs)
    finally:
        module.train(was_training)
    return live.peak


def inference_token_limit(
    module: torch.nn.Module, batch: Mapping[str, torch.Tensor], length: int, bf16: bool, budget: int
) -> int:
    """Padded tokens (cells x longest cell) an inference batch may hold so that its tensors stay within ``budget``
    bytes: ``budget`` over the bytes per token of a forward on one cell of ``length`` tokens (the model's full
    context; attention's cost per token grows with the length, so shorter cells are planned for more than they
    need). ``batch`` is a real padded batch, tiled to that shape (:func:`planned_batch`)."""
    per_token = trace_inference(module, planned_batch(batch, 1, length), bf16) / length
    return max(length, int(budget / (per_token * (1 + INFERENCE_ALLOWANCE))))


def saved_activations(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], bf16: bool) -> tuple[int, list[int]]:
    """Bytes autograd saves for backward in a training forward of ``model`` on ``batch``: (outside the blocks, per
    block), measured by a real forward on two of the cells, scaled to the batch: the fallback for a head whose
    forward reads values (fake tensors cannot trace it). Parameters saved as they are are not counted (they are the
    weights); their bf16 casts under autocast are."""
    cells, length = batch["input_ids"].shape
    few = planned_batch(batch, min(2, cells), length)
    blocks = list(getattr(model.base_model, "layers", ()))
    per_block, current, outside = [0] * len(blocks), [None], [0]
    weights = {id(p) for p in model.parameters()}
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda *_, i=index: current.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda *_: current.__setitem__(0, None)))

    def pack(tensor: torch.Tensor) -> None:
        if id(tensor) not in weights:
            size = tensor.numel() * tensor.element_size()
            if current[0] is None:
                outside[0] += size
            else:
                per_block[current[0]] += size
        # nothing is kept: no backward follows

    from sc_foundation.training.lightning_module import TrainingModule

    checkpointing = getattr(model.base_model, "gradient_checkpointing", False)
    was_training = model.training
    try:
        model.base_model.gradient_checkpointing = False  # every block's own saved tensors
        model.train()
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        ):
            TrainingModule(model)(few)
    finally:
        model.base_model.gradient_checkpointing = checkpointing
        model.train(was_training)
        for handle in handles:
            handle.remove()
    scale = cells / few["input_ids"].shape[0]
    return int(outside[0] * scale), [int(size * scale) for size in per_block]


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
    releases_freed_memory: bool = True,
) -> MemoryEstimate:
    """The peak resident memory of training ``model`` (its parameters' ``requires_grad`` as they will train) with
    AdamW on batches of ``batch_size`` cells of ``length`` tokens, shaped like the real ``batch`` (see the module
    docstring).

    Args:
        bf16: under bf16 autocast (``bf16-mixed``): fp32 weights, bf16 matmul activations.
        gradient_checkpointing: blocks keep only their input (B, L, h) and recompute the rest in backward.
        baseline: the process's resident bytes before training; default: now.
        trainable: trainable weights to plan for instead of the model's own (LoRA's, before it is attached): their
            gradients and optimizer state replace the model's own in the peak.
        releases_freed_memory: whether :func:`release_freed_memory` is in effect (the allocator's allowance).
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    from sc_foundation.models.modeling import ScFoundationForMultimodal

    planned = planned_batch(batch, batch_size, length)
    own = trainable_parameters(model)
    trainable = own if trainable is None else trainable
    checkpointing = getattr(model.base_model, "gradient_checkpointing", False)

    def measured() -> tuple[int, int]:
        outside, per_block = saved_activations(model, planned, bf16)
        if gradient_checkpointing:  # each block keeps its fp32 input (B, L, h)
            saved = outside + len(per_block) * batch_size * length * model.config.hidden_size * 4
        else:
            saved = outside + sum(per_block)
        return saved + max(per_block, default=0) + own * 4 * (1 + ADAMW_STATES), saved

    try:
        model.base_model.gradient_checkpointing = gradient_checkpointing
        # The multimodal head reads tensor values (which cells carry the second modality), which fake tensors cannot
        # trace: it is measured directly. Catching the fake-tensor error for it worked alone, but late in a long
        # pytest session that error surfaced as a SystemError from a lazy import in torch's raise path.
        if isinstance(model, ScFoundationForMultimodal):
            step_peak, activations = measured()
        else:
            try:
                step_peak, activations = trace_step(model, planned, bf16)
            except (DataDependentOutputException, DynamicOutputShapeException):
                step_peak, activations = measured()
    finally:
        model.base_model.gradient_checkpointing = checkpointing
    step_peak += (trainable - own) * 4 * (1 + ADAMW_STATES)
    return MemoryEstimate(
        baseline=psutil.Process().memory_info().rss if baseline is None else baseline,
        step_peak=step_peak,
        weights=sum(p.numel() * p.element_size() for p in model.parameters()),
        gradients=trainable * 4,
        optimizer=trainable * 4 * ADAMW_STATES,
        activations=activations,
        releases_freed_memory=releases_freed_memory,
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
    releases_freed_memory: bool = True,
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
            releases_freed_memory=releases_freed_memory,
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
