"""What the CPU can do fast, detected rather than assumed, and its measured matmul rate.

bf16 pays on a CPU only where the hardware has bf16 dot-product instructions: AMX (``amx_bf16``, Intel Sapphire
Rapids and later) or AVX512-BF16 (``avx512_bf16``, Intel Cooper Lake and later, AMD Zen 4 and later). Elsewhere
torch emulates bf16 matmuls through fp32 conversions and they run slower than fp32, so bf16 must be chosen by the
flags of the CPU in use, never by default.
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags, any of which gives native bf16 dot products."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux ``/proc/cpuinfo``); empty where they cannot be read."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where this CPU multiplies bf16 natively (AMX or AVX512-BF16) and torch's oneDNN backend can use it."""
    return bool(cpu_flags() & set(BF16_CPU_FLAGS)) and torch.backends.mkldnn.is_available()


def cpu_description() -> dict:
    """The CPU as a benchmark should state it: model name, cores torch uses, and the bf16 flags it has."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": name,
        "torch_threads": torch.get_num_threads(),
        "bf16_flags": sorted(cpu_flags() & set(BF16_CPU_FLAGS)),
        "fast_bf16": cpu_has_fast_bf16(),
    }


BF16_CPU_MIN_HIDDEN_SIZE = 128
BF16_CPU_MIN_HEAD_SIZE = 64
"""The smallest model for which ``auto`` trains in bf16 on a CPU with native bf16: the matmuls must be large enough
for bf16 to outweigh its casts. Measured on a 2-core AMD EPYC with AVX512-BF16 (``benchmarks/pretrain_quality.py
--precision 20 --precision-models ...``, the recipe's batches, bf16 autocast against fp32 on alternating steps),
width x heads: 64 x 4 0.72x, 64 x 2 0.93x, 128 x 8 0.97x; 128 x 2 1.25x, 256 x 4 1.78x, 512 x 8 2.33x.
The published models (scGPT, Geneformer) have heads of 64 dimensions."""


def resolve_cpu_precision(precision: str, hidden_size: int | None = None, head_size: int | None = None) -> str:
    """A Lightning precision for a CPU run: ``"auto"`` becomes ``"bf16-mixed"`` on a CPU with native bf16 for a
    model at least :data:`BF16_CPU_MIN_HIDDEN_SIZE` wide with heads of at least :data:`BF16_CPU_MIN_HEAD_SIZE`
    dimensions (None: not known, decided by the CPU alone) and ``"32-true"`` elsewhere; any other value is returned
    unchanged (the user's explicit choice)."""
    if precision != "auto":
        return precision
    large_enough = (hidden_size is None or hidden_size >= BF16_CPU_MIN_HIDDEN_SIZE) and (
        head_size is None or head_size >= BF16_CPU_MIN_HEAD_SIZE
    )
    return "bf16-mixed" if cpu_has_fast_bf16() and large_enough else "32-true"


def model_sizes(config) -> dict[str, int]:
    """``hidden_size`` and ``head_size`` of a model config (an HF config), the sizes :func:`resolve_cpu_precision`
    decides by."""
    return {"hidden_size": config.hidden_size, "head_size": config.hidden_size // config.num_attention_heads}


def runs_on_cuda(accelerator: str) -> bool:
    """Whether a Lightning ``accelerator`` setting puts the run on CUDA (``gpu``, ``cuda``, or ``auto`` with CUDA)."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(
    precision: str, accelerator: str, hidden_size: int | None = None, head_size: int | None = None
) -> str:
    """A Lightning precision for ``accelerator``: ``"auto"`` becomes ``"bf16-mixed"`` on CUDA
    (:func:`runs_on_cuda`) and :func:`resolve_cpu_precision`'s choice for the model's ``hidden_size`` and
    ``head_size`` on a CPU; any other value is returned unchanged."""
    if precision != "auto":
        return precision
    if runs_on_cuda(accelerator):
        return "bf16-mixed"
    return resolve_cpu_precision(precision, hidden_size, head_size)


def precision_reason(
    precision: str, accelerator: str, hidden_size: int | None = None, head_size: int | None = None
) -> str:
    """Why :func:`resolve_precision` chooses what it does from ``precision``, for the run report:
    ``"auto: CPU with native bf16: avx512_bf16"`` or ``"set in the config"``."""
    if precision != "auto":
        return "set in the config"
    if runs_on_cuda(accelerator):
        return "auto: GPU"
    if not cpu_has_fast_bf16():
        return "auto: CPU without native bf16 (AMX or AVX512-BF16), where emulated bf16 is slower than fp32"
    flags = ", ".join(sorted(cpu_flags() & set(BF16_CPU_FLAGS)))
    if resolve_cpu_precision(precision, hidden_size, head_size) == "32-true":
        return (
            f"auto: CPU with native bf16 ({flags}), but a model {hidden_size} wide with heads of {head_size} trains "
            f"faster in fp32 (bf16 pays from width {BF16_CPU_MIN_HIDDEN_SIZE} with heads of {BF16_CPU_MIN_HEAD_SIZE})"
        )
    return f"auto: CPU with native bf16: {flags}"


def matmul_flops_per_s(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0, device: str = "cpu") -> float:
    """Measured dense matmul throughput (FLOP/s) of ``size`` x ``size`` matrices in ``dtype`` on ``device``.

    Repeats ``a @ b`` (2·size³ FLOPs each) for about ``seconds`` after one warm-up product; the machine's practical
    peak, against which a model's achieved FLOP/s is a share.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: kernel selection and caches
    repeats, started = 0, time.perf_counter()
    while True:
        a @ b
        repeats += 1
        if device != "cpu":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2.0 * size**3 * repeats / elapsed
