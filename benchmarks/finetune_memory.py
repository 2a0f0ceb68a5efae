"""Benchmark: fine-tuning memory and speed of published-size models on the CPU, in every mode, against the plan.

Stand-ins of the published sizes, in their published layouts, with random weights (memory and speed do not depend
on them): scGPT whole-human (512 wide, 12 layers, 8 heads, d_hid 512, post-norm ReLU, binned values, 60,697 tokens,
context 1,200), Geneformer V1 (256 wide, 6 layers, 4 heads, FFN 512, rank encoding, 25,426 tokens, 2,048
positions) and Geneformer V2 104M (768 wide, 12 layers, 12 heads, FFN 3,072, 20,275 tokens, 4,096 positions).

The cells are real: the 10x FACS-sorted PBMC reference (``mudan_pbmc``, 2,140 cells, 9 sorted populations as labels),
tokenized once per layout into a corpus store (each cell's top genes up to the context; its detected genes, so
lengths are the cells' own), and fine-tuned for cell-type annotation (``ScFoundationForCellClassification``, mean
pooling) through the real path: :class:`~sc_foundation.training.lightning_module.TrainingModule` and a Lightning
``Trainer`` over ``CorpusDataModule`` batches, on the longest cells of the data (every step about the longest batch).

Each (model, mode, checkpointing) runs in a fresh process, which reports its peak resident memory (``ru_maxrss``),
its resident memory before training (the baseline: libraries, weights, data), the seconds of each step after the
first, cells/s, and the plan of :mod:`sc_foundation.training.memory` for its own first batch (the batch and length
it really sees) and for the full context (what a run plans before it starts). Modes: ``full`` (every weight trains),
``frozen`` (the head only) and ``lora`` (rank 8 on qkv, out, fc_in, fc_out; ``finetune.mode=lora``).

    python benchmarks/finetune_memory.py --out finetune_memory.json [--models scgpt geneformer_v1 geneformer_v2]
        [--modes full frozen lora] [--checkpointing both] [--steps 3] [--batch-size 8] [--precision 32-true]
        [--glibc-heap]

Runs release freed memory to the system as fine-tuning does (``memory.release_freed_memory``); ``--glibc-heap``
keeps glibc's default heap, which holds freed activations (a higher resident peak, faster steps).

``--write-standin DIR --models scgpt`` writes instead a pretraining export of that layout (tokenizer of the real
cells, vocabulary of the genes they detect), for ``python finetune.py pretrained=DIR finetune.mode=lora``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared" / "data" / "mudan_pbmc" / "pbmc_facs_reference.h5ad"
CACHE = Path(os.environ.get("SC_FOUNDATION_CACHE", Path.home() / ".cache" / "sc_foundation")) / "finetune_memory"

LAYOUTS = {
    "scgpt": {
        "architecture": dict(
            hidden_size=512,
            num_hidden_layers=12,
            num_attention_heads=8,
            intermediate_size=512,
            norm_placement="post",
            final_norm=False,
            hidden_act="relu",
            embedding_norm="separate",
        ),
        "vocab_size": 60_697,
        "tokenizer": dict(encoding="binned", context_length=1200, truncation="top"),
    },
    "geneformer_v1": {
        "architecture": dict(
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=512,
            norm_placement="post",
            final_norm=False,
            hidden_act="relu",
        ),
        "vocab_size": 25_426,
        "tokenizer": dict(encoding="rank", context_length=2048, truncation="top", add_cls=False),
    },
    "geneformer_v2": {
        "architecture": dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            norm_placement="post",
            final_norm=False,
            hidden_act="gelu",
        ),
        "vocab_size": 20_275,
        "tokenizer": dict(encoding="rank", context_length=4096, truncation="top"),
    },
}


def store_for(name: str) -> str:
    """The corpus store of the real cells tokenized for layout ``name`` (built once, cached)."""
    from sc_foundation.data.store import build_store
    from sc_foundation.data.tokenization import TokenizerConfig

    config = TokenizerConfig(gene_id_type="symbol", **LAYOUTS[name]["tokenizer"])
    report = build_store(
        [{"path": str(DATA), "gene_key": None}],
        CACHE / f"{name}-{{plan}}",
        tokenizer_config=config,
        obs_keys=["cell_type"],
        min_cells_per_gene=3,
    )
    return str(report.path)


def model_config(name: str, tokenizer, published_vocab: bool):
    from sc_foundation.models.configuration import ScFoundationConfig

    layout = LAYOUTS[name]
    config = ScFoundationConfig.from_tokenizer(tokenizer, pooling="mean", **layout["architecture"])
    if published_vocab:  # the published embedding table (the cells' ids are all below it)
        config.vocab_size = layout["vocab_size"]
    return config


def run_one(args) -> dict:
    """One (model, mode, checkpointing) fine-tuning run in this process; the record of what it measured."""
    import numpy as np
    import psutil
    import pytorch_lightning as pl
    import torch

    from sc_foundation.data.datamodule import CorpusDataModule, split_cells
    from sc_foundation.data.store import CorpusStore
    from sc_foundation.models.adapters import LoraSettings, attach_lora
    from sc_foundation.models.modeling import ScFoundationForCellClassification
    from sc_foundation.tasks.common import category_ids
    from sc_foundation.training.hardware import cpu_description
    from sc_foundation.training.lightning_module import TrainingModule
    from sc_foundation.training.memory import estimate_training_memory, peak_resident, release_freed_memory

    released = not args.glibc_heap and release_freed_memory()  # as fine-tuning does (memory.release_freed_memory)
    torch.manual_seed(0)
    store = CorpusStore(args.store)
    names, labels = category_ids(store, "cell_type")
    config = model_config(args.models[0], store.tokenizer, published_vocab=True)
    config.num_labels = len(names)
    model = ScFoundationForCellClassification(config).train()
    if args.mode == "frozen":
        model.base_model.requires_grad_(False)
    elif args.mode == "lora":
        attach_lora(model, LoraSettings(), "random stand-in")
    if args.checkpointing:
        model.activation_checkpointing_enable()
    train, val = split_cells(store, 0.1, 0)
    # The steps' cells are the longest training cells, so that every step sees about the longest batch of the data.
    longest = train[np.argsort(-store.lengths[train], kind="stable")[: args.batch_size * args.steps]]
    datamodule = CorpusDataModule(
        args.store, args.batch_size, mask_ratio=None, per_cell={"labels": labels}, splits={"train": longest, "val": val}
    )
    datamodule.setup("fit")
    first = next(iter(datamodule.train_dataloader()))
    bf16 = args.precision.startswith("bf16")
    length = int(first["input_ids"].shape[1])
    context = store.tokenizer.config.context_length
    plan = {
        name: estimate_training_memory(
            model,
            first,
            batch_size=args.batch_size,
            length=tokens,
            bf16=bf16,
            gradient_checkpointing=args.checkpointing,
        )
        for name, tokens in (("seen", length), ("context", context))
    }
    baseline = psutil.Process().memory_info().rss
    step_times = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step_times.append(time.perf_counter() - self.started)

    module = TrainingModule(model, learning_rate=1e-4, warmup_steps=1, max_steps=args.steps)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Steps()],
    )
    trainer.fit(module, datamodule=datamodule)
    peak = peak_resident()
    timed = step_times[1:] or step_times
    seconds = float(np.median(timed))
    return {
        "model": args.models[0],
        "mode": args.mode,
        "checkpointing": args.checkpointing,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "releases_freed_memory": released,
        "first_batch_length": length,
        "context": context,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in model.parameters()),
        "baseline_gib": baseline / 2**30,
        "peak_gib": peak / 2**30,
        "added_gib": (peak - baseline) / 2**30,
        "plan_seen_gib": plan["seen"].added / 2**30,
        "traced_step_peak_gib": plan["seen"].step_peak / 2**30,
        "saved_activations_gib": plan["seen"].activations / 2**30,
        "plan_seen_peak_gib": (baseline + plan["seen"].added) / 2**30,
        "plan_context_peak_gib": (baseline + plan["context"].added) / 2**30,
        "seconds_per_step": seconds,
        "cells_per_s": args.batch_size / seconds,
        "step_seconds": step_times,
        "machine": cpu_description(),
    }


def write_standin(name: str, directory: Path) -> Path:
    """A pretraining export of layout ``name`` with random weights and the real cells' tokenizer."""
    import torch

    from sc_foundation.data.store import CorpusStore
    from sc_foundation.models.export import export_pretrained
    from sc_foundation.models.modeling import ScFoundationForMaskedValueModeling

    store = CorpusStore(store_for(name))
    torch.manual_seed(0)
    model = ScFoundationForMaskedValueModeling(model_config(name, store.tokenizer, published_vocab=False))
    return export_pretrained(model, store.tokenizer, directory)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("finetune_memory.json"))
    parser.add_argument("--models", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--modes", nargs="+", default=["full", "frozen", "lora"], choices=["full", "frozen", "lora"])
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--write-standin", type=Path, default=None)
    parser.add_argument("--glibc-heap", action="store_true", help="keep glibc's default heap (no release_freed_memory)")
    # internal: one run in this process
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing-on", dest="checkpointing_on", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        args.checkpointing = args.checkpointing_on
        print(json.dumps(run_one(args)))
        return
    if args.write_standin is not None:
        print(write_standin(args.models[0], args.write_standin))
        return
    switches = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    results = []
    for name in args.models:
        store = store_for(name)
        for mode in args.modes:
            for checkpointing in switches:
                if mode == "frozen" and checkpointing:
                    continue  # nothing is saved for backward inside a frozen backbone: checkpointing changes nothing
                command = [
                    sys.executable, __file__, "--one", "--store", store, "--models", name, "--mode", mode,
                    "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--precision", args.precision,
                ]  # fmt: skip
                if checkpointing:
                    command.append("--checkpointing-on")
                if args.glibc_heap:
                    command.append("--glibc-heap")
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    record = {"model": name, "mode": mode, "checkpointing": checkpointing, "error": done.stderr[-2000:]}
                else:
                    record = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(record)
                print(json.dumps({k: v for k, v in record.items() if k not in ("machine", "step_seconds")}), flush=True)
                args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
