"""Benchmark: GPU pretraining throughput and MFU, padded batches with SDPA against packed batches with varlen kernels.

The cells are real (the first ``--cells`` cells of ``kang_ifnb``, tokenized into a binned store at ``--context``,
both cached under ``.bench/``; the helpers are ``train_throughput.py``'s). The same cells in the same batches are
drawn twice through the training loader, ``CorpusDataModule(mask_ratio=0.15)``: once padded to the longest cell of
each batch, once packed end to end with ``cu_seqlens``. Variants, each a fresh model of ``conf/model/<--model>.yaml``
with the same seed, trained with the ``TrainingModule``'s AdamW and schedule under bf16 autocast:

* ``padded_sdpa``: ``attention_backend="sdpa"`` on padded batches (PyTorch SDPA with a key-padding mask);
* ``packed_varlen``: ``attention_backend="flash_varlen"`` on packed batches: flash-attn's varlen kernel when
  installed, else torch's own (the JSON records which), else SDPA with a block-diagonal mask off CUDA.

Reported per variant: cells/s, real tokens/s, seconds/step, and MFU = training FLOPs / seconds / ``--peak-flops``,
with FLOPs from ``sc_foundation.training.lightning_module.training_flops`` (6·N·T + 12·n·d·Σ L², real tokens only, so
padding shows
as lost MFU). Steps are timed with ``torch.cuda.synchronize`` after ``--warmup-steps`` untimed ones.

    python benchmarks/train_gpu.py --out train_gpu.json [--model base] [--context 2048] [--batch-size 16]
        [--steps 30] [--warmup-steps 5] [--cells 20000] [--peak-flops 989e12]
    python benchmarks/train_gpu.py --out smoke.json --device cpu --precision fp32 --model tiny --context 64 ...
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from _corpus import DEFAULT_CACHE, DEFAULT_DATA, machine_info, write_json_atomic
from train_throughput import build_or_reuse_store, draw_batches, kang_slice

from sc_foundation.conf import CONFIG_ROOT

MODEL_CONFIGS = CONFIG_ROOT / "model"
VARIANTS = {"padded_sdpa": (False, "sdpa"), "packed_varlen": (True, "flash_varlen")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--model", default="base", help="a conf/model/*.yaml name")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--cells", type=int, default=20000, help="first cells of kang_ifnb to tokenize")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="per-device peak (H100 bf16 dense)")
    parser.add_argument("--mask-ratio", type=float, default=0.15)
    parser.add_argument("--min-cells-per-gene", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    return parser.parse_args(argv)


def varlen_kernel(device: str) -> str:
    """Which kernel the model's packed path uses on ``device`` (see ``sc_foundation.models.modeling``)."""
    from sc_foundation.models import modeling

    if not device.startswith("cuda"):
        return "sdpa_block_diagonal"
    if modeling.flash_attn_varlen_func is not None:
        return "flash_attn"
    return "torch_varlen" if modeling.varlen_attn is not None else "sdpa_block_diagonal"


def build_model(args, store, backend: str):
    import torch
    from omegaconf import OmegaConf

    from sc_foundation.models.configuration import ScFoundationConfig
    from sc_foundation.models.modeling import ScFoundationForMaskedValueModeling

    size = OmegaConf.to_container(OmegaConf.load(MODEL_CONFIGS / f"{args.model}.yaml"))
    config = ScFoundationConfig.from_tokenizer(store.tokenizer, **{**size, "attention_backend": backend})
    torch.manual_seed(args.seed)
    return ScFoundationForMaskedValueModeling(config).to(args.device)


def cell_lengths(batch: dict):
    """(B,) real tokens per cell of a padded or packed batch."""
    if "cu_seqlens" in batch:
        return batch["cu_seqlens"].diff()
    return batch["attention_mask"].sum(dim=1)


def run_variant(name: str, batches: list[dict], store, args) -> dict:
    import torch

    from sc_foundation.training.lightning_module import TrainingModule, count_non_embedding_parameters, training_flops

    _, backend = VARIANTS[name]
    model = build_model(args, store, backend)
    module = TrainingModule(model, warmup_steps=args.warmup_steps, max_steps=args.warmup_steps + args.steps)
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    cuda = args.device.startswith("cuda")
    autocast = (
        torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )

    def step(batch: dict) -> float:
        with autocast:
            loss = module(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    on_device = [{k: v.to(args.device, non_blocking=True) for k, v in b.items()} for b in batches]
    warm, timed = on_device[: args.warmup_steps], on_device[args.warmup_steps :]
    model.train()
    for batch in warm:
        step(batch)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step(batch) for batch in timed]
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    lengths = torch.cat([cell_lengths(b).to("cpu", torch.int64) for b in timed])
    flops = training_flops(
        count_non_embedding_parameters(model),
        int(lengths.sum()),
        int((lengths**2).sum()),
        model.config.num_hidden_layers,
        model.config.hidden_size,
    )
    return {
        "attention": backend if name == "padded_sdpa" else varlen_kernel(args.device),
        "cells_per_s": len(lengths) / seconds,
        "tokens_per_s": int(lengths.sum()) / seconds,
        "seconds_per_step": seconds / len(timed),
        "timed_steps": len(timed),
        "tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / args.peak_flops,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "last_loss": float(losses[-1]),
        "non_embedding_parameters": count_non_embedding_parameters(model),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    store_dir, store_info = build_or_reuse_store(kang_slice(args), args)
    results = {
        "machine": machine_info(),
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "store": store_info},
    }
    for name in args.variants:
        packed, _ = VARIANTS[name]
        batches, store = draw_batches(store_dir, args, pack=packed)
        results[name] = run_variant(name, batches, store, args)
    if {"padded_sdpa", "packed_varlen"} <= results.keys():
        results["speedup_packed_vs_padded"] = (
            results["packed_varlen"]["cells_per_s"] / results["padded_sdpa"]["cells_per_s"]
        )
    write_json_atomic(args.out, results)
    for name in args.variants:
        r = results[name]
        print(
            f"{name:<14} {r['attention']:<20} {r['cells_per_s']:>9.1f} cells/s {r['tokens_per_s']:>11.0f} tokens/s "
            f"MFU {100 * r['mfu']:5.1f}%  {r['seconds_per_step']:.3f} s/step"
        )
    return results


if __name__ == "__main__":
    main()
