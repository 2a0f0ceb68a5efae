"""Benchmark: what one rank holds under DDP against FSDP2 sharded per Transformer block, with and without activation
checkpointing, measured in the same launch on the same cells.

The real path: ``sc_foundation.training.pretrain.run`` with ``trainer=ddp`` then ``trainer=fsdp`` then ``trainer=fsdp
gradient_checkpointing=true``, each on ``--nproc`` CPU processes over gloo (one torchrun launch; the script starts it
itself when not launched by torchrun), ``--steps`` optimiser steps of the masked-value pretraining of ``conf/model/
<--model>`` on the first ``--cells`` cells of ``kang_ifnb`` at ``--context`` tokens, batches of ``--batch-size`` cells
per rank, fp32 (``32-true``: no autocast weight copies in the activation count). After each step a callback measures
on every rank:

* ``param_bytes``: the parameters this rank holds between steps (FSDP2: its shards; DDP: every parameter);
* ``grad_bytes``: the ``.grad`` tensors the optimiser stepped with (FSDP2: sharded; DDP also keeps its own gradient
  buckets, a second copy that is not counted here);
* ``optimizer_bytes``: AdamW's moments (and step counters) in ``optimizer.state``;
* ``activation_bytes``: the tensors autograd saved for the backward pass during the step's forward, through
  ``torch.autograd.graph.saved_tensors_hooks`` (parameters excluded, each storage once). Under activation
  checkpointing only what is saved outside the checkpointed blocks is seen; the block inputs that the checkpoint keeps
  to recompute from (one (B, L, h) tensor per block) are added as ``checkpoint_input_bytes``.

Reported per setting: the largest value of each over the ranks and steps, their sum ``total_bytes``, the median
seconds per step (wall time on a shared machine: compare within one run) and the ratio of ``total_bytes`` to DDP's.

    python benchmarks/distributed_memory.py --out distributed_memory.json [--model small] [--nproc 2] [--steps 3]
        [--context 256] [--batch-size 8] [--cells 400]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from _corpus import DEFAULT_CACHE, DEFAULT_DATA, cached_slice, machine_info, write_json_atomic

KANG = "kang_ifnb/kang_ifnb.h5ad"
SETTINGS = {
    "ddp": ["trainer=ddp"],
    "fsdp_per_block": ["trainer=fsdp"],
    "fsdp_per_block_checkpointed": ["trainer=fsdp", "gradient_checkpointing=true"],
}
KINDS = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes", "checkpoint_input_bytes")


def local_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank stores for ``tensor``: its local shard for a ``DTensor``."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


class MemoryRecorder(pl.Callback):
    """Per step: bytes of parameters, gradients, optimiser state and saved activations this rank holds (see the module
    docstring), and the step's wall time."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._started = time.perf_counter()
        self._saved, seen = 0, set()

        def pack(tensor):
            key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
            if not isinstance(tensor, torch.nn.Parameter) and key not in seen:
                seen.add(key)
                self._saved += key[1]
            return tensor

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self._hooks.__enter__()
        lengths = batch["attention_mask"].shape
        model = module.model
        blocks = len(model.base_model.layers) if model.base_model.gradient_checkpointing else 0
        self._checkpoint_inputs = blocks * lengths[0] * lengths[1] * model.config.hidden_size * 4

    def on_before_backward(self, trainer, module, loss):
        self._hooks.__exit__(None, None, None)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        params = list(module.model.parameters())
        optimizer = trainer.optimizers[0]
        self.steps.append(
            {
                "param_bytes": sum(local_bytes(p) for p in params),
                "grad_bytes": sum(local_bytes(p.grad) for p in params if p.grad is not None),
                "optimizer_bytes": sum(
                    local_bytes(value)
                    for state in optimizer.state.values()
                    for value in state.values()
                    if isinstance(value, torch.Tensor)
                ),
                "activation_bytes": self._saved,
                "checkpoint_input_bytes": self._checkpoint_inputs,
                "seconds": time.perf_counter() - self._started,
            }
        )


def measure(args, name: str, overrides: list[str]) -> dict:
    """One setting on this rank: ``pretrain.run`` with the recorder; its per-kind maxima over the steps."""
    from sc_foundation.conf import compose
    from sc_foundation.training import pretrain

    kang = cached_slice(
        Path(args.data) / KANG, Path(args.cache) / f"kang_{args.cells}.h5ad", args.cells, evenly_spaced=True
    )
    cfg = compose(
        "pretrain",
        [
            *overrides,
            f"model={args.model}",
            "trainer.accelerator=cpu",
            f"trainer.devices={args.nproc}",
            "trainer.precision=32-true",
            f"trainer.max_steps={args.steps}",
            "trainer.limit_val_batches=0",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "~logger",
            "probes=null",
            "data.datasets=[]",
            f"data.files=[{kang}]",
            f"data.tokenizer.context_length={args.context}",
            "data.min_cells_per_gene=1",
            "data.loader.group_by_length=false",
            f"data.loader.batch_size={args.batch_size}",
            f"paths.cache={args.cache}",
            f"output_dir={Path(args.cache) / 'distributed_memory' / name}",
        ],
    )
    recorder = MemoryRecorder()
    result = pretrain.run(cfg, [recorder])
    steps = recorder.steps[1:] or recorder.steps  # the first step's optimiser state is created during it
    record = {kind: max(step[kind] for step in steps) for kind in KINDS}
    record["total_bytes"] = sum(record[kind] for kind in KINDS)
    record["seconds_per_step"] = statistics.median(step["seconds"] for step in recorder.steps)
    record["parameters"] = sum(p.numel() for p in result["module"].model.parameters())
    return record


def main(args) -> None:
    ranks = {}
    for name, overrides in SETTINGS.items():
        mine = measure(args, name, overrides)
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, mine)
        ranks[name] = gathered
    if torch.distributed.get_rank() != 0:
        return
    results = {}
    for name, records in ranks.items():
        results[name] = {key: max(r[key] for r in records) for key in (*KINDS, "total_bytes", "seconds_per_step")}
        results[name]["parameters"] = records[0]["parameters"]
    for name in results:
        results[name]["total_vs_ddp"] = results[name]["total_bytes"] / results["ddp"]["total_bytes"]
    payload = {
        "benchmark": "distributed_memory",
        "settings": vars(args) | {"precision": "32-true", "backend": "gloo"},
        "machine": machine_info(),
        "per_rank_max": results,
    }
    write_json_atomic(args.out, payload)
    mib = 2**20
    print(f"{'setting':30s} " + " ".join(f"{k.removesuffix('_bytes'):>12s}" for k in (*KINDS, "total_bytes")))
    for name, record in results.items():
        row = " ".join(f"{record[k] / mib:12.1f}" for k in (*KINDS, "total_bytes"))
        print(f"{name:30s} {row}  MiB per rank, {record['seconds_per_step']:.2f} s/step, x{record['total_vs_ddp']:.2f}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="distributed_memory.json")
    parser.add_argument("--model", default="small")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cells", type=int, default=400)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--cache", default=str(DEFAULT_CACHE))
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if "WORLD_SIZE" not in os.environ:  # start the processes: torchrun runs this script on each
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={arguments.nproc}"]
        sys.exit(subprocess.run([*command, *sys.argv]).returncode)
    torch.distributed.init_process_group("gloo")
    main(arguments)
