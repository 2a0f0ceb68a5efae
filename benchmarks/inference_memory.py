"""Benchmark: ``sc_foundation.embed`` on a long-context model keeps the memory its plan allows.

A stand-in of a published width (512 wide, 8 heads of 64, FFN 2,048; ``--layers`` deep, untrained: memory does
not depend on the weights) with a context of ``--context`` tokens (20,000 by default, scGPT's "all genes" setting)
embeds the ``--cells`` CellBench cells with the most detected genes (real counts; the longest cells of the shared
data, several thousand tokens each). Each setting runs in a fresh process, so that its peak resident memory (VmHWM)
is its own:

- ``planned``: ``embed``'s default, batches capped at the padded tokens a fake-tensor forward at the full context
  says fit in the budget (``--budgets-gb``, standing in for a quarter of the memory available);
- ``unplanned``: batches of ``--batch-size`` cells whatever their length (the behaviour before the plan).

Reported per setting: the rise of the peak resident memory over the process before ``embed`` (model loaded), the
batches and their largest padded size, seconds, and the largest difference of the embedding from the unplanned one
(fp32: batch composition changes only the rounding of long cells, whose padded length moves the kernels' blocking).

    python benchmarks/inference_memory.py --out inference_memory.json [--context 20000] [--cells 64]
        [--layers 2] [--budgets-gb 0.5 2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _corpus import DEFAULT_CACHE, DEFAULT_DATA, cached_binned_store, machine_info, write_json_atomic

CELLBENCH = "cellbench_3cl/cellbench_3cl.h5ad"


def standin(cache: Path, context: int, layers: int) -> Path:
    """An export of the stand-in at ``context`` on a vocabulary of CellBench's genes (built once, then reused)."""
    from sc_foundation.data.store import CorpusStore
    from sc_foundation.models.configuration import ScFoundationConfig
    from sc_foundation.models.export import export_pretrained
    from sc_foundation.models.modeling import ScFoundationModel

    out = cache / f"inference_memory_standin_{context}_{layers}"
    if (out / "config.json").exists():
        return out
    store = cached_binned_store([DEFAULT_DATA / CELLBENCH], cache / f"inference_memory_store_{context}", context)
    tokenizer = CorpusStore(store["path"]).tokenizer
    architecture = {"hidden_size": 512, "num_hidden_layers": layers, "num_attention_heads": 8}
    config = ScFoundationConfig.from_tokenizer(tokenizer, intermediate_size=2048, **architecture)
    return export_pretrained(ScFoundationModel(config), tokenizer, out)


def longest_cells(n: int):
    """The ``n`` CellBench cells with the most detected genes, raw counts."""
    import anndata

    adata = anndata.read_h5ad(DEFAULT_DATA / CELLBENCH)
    detected = np.asarray((adata.X > 0).sum(axis=1)).ravel()
    return adata[np.sort(np.argsort(detected)[-n:])].copy()


def child(args: argparse.Namespace) -> None:
    """One setting in this process: embed, then print a JSON line of what it measured."""
    from sc_foundation import inference, load_pretrained
    from sc_foundation.training.memory import peak_resident

    model = load_pretrained(args.model, device="cpu")
    cells = longest_cells(args.cells)
    batches = []
    split = inference._padded_batches

    def recording(chunk, pad_id, batch_size, token_limit=None):
        for rows, batch in split(chunk, pad_id, batch_size, token_limit):
            batches.append(list(batch["input_ids"].shape))
            yield rows, batch

    inference._padded_batches = recording
    budget = args.budget_gb
    inference._memory_budget = lambda: int(budget * 2**30) if budget else 2**62  # unplanned: no cap but batch_size
    before = peak_resident()
    started = time.perf_counter()
    embedded = inference.embed(cells, model, copy=True, batch_size=args.batch_size).obsm["X_sc_foundation"]
    seconds = time.perf_counter() - started
    np.save(args.embedding, embedded)
    result = {
        "peak_rise_gib": (peak_resident() - before) / 2**30,
        "peak_gib": peak_resident() / 2**30,
        "batches": len(batches),
        "largest_batch": max(batches, key=lambda shape: shape[0] * shape[1]),
        "seconds": seconds,
        "tokens_per_cell": float(np.mean([int((c > 0).sum()) for c in cells.X.toarray()])),
    }
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=20_000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cells", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budgets-gb", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--budget-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--embedding", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model = standin(args.cache_dir, args.context, args.layers)
    record = {"machine": machine_info(), "context": args.context, "layers": args.layers, "cells": args.cells}
    settings = {"unplanned": 0.0, **{f"planned {b:g} GiB": b for b in args.budgets_gb}}
    for name, budget in settings.items():
        embedding = args.out.with_suffix(f".{name.replace(' ', '_')}.npy")
        command = [sys.executable, __file__, "--out", str(args.out), "--child", "--model", str(model)]
        command += ["--cells", str(args.cells), "--batch-size", str(args.batch_size), "--budget-gb", str(budget)]
        command += ["--embedding", str(embedding)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        record[name] = json.loads(done.stdout.strip().splitlines()[-1])
        reference = np.load(args.out.with_suffix(".unplanned.npy"))
        record[name]["max_difference"] = float(np.abs(np.load(embedding) - reference).max())
        print(name, record[name], flush=True)
        write_json_atomic(args.out, record)
    return record


if __name__ == "__main__":
    main()
