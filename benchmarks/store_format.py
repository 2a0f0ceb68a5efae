"""Benchmark: store format 2 (narrow types) against format 1 (int32 ids, float32 values), on the same cells.

Takes a complete store and writes a format-1 copy of it beside (``<store>-format1``, made once): the same record
batches with the types format 1 wrote (``large_list<int32>`` ids, ``large_list<float32>`` values, plain string
labels). Then, in one process, it reads both with ``CorpusStore`` and times ``get_batch`` on the same seeded random
batches of ``--batch-size`` cells, the two stores alternating round by round (``--rounds`` rounds of ``--batches``
batches each), so that a load change on a shared machine hits both alike. Reported per format: bytes on disk,
bytes per token (directory size / tokens), and the median round's cells/s.

    python benchmarks/store_format.py --store .bench/store-binned-ctx2048-200000 --out store_format.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from _corpus import machine_info, write_json_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a complete store (format 2)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per format, alternating")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def format1_copy(store: Path) -> Path:
    """The store rewritten with format 1's column types, at ``<store>-format1`` (through a temporary folder)."""
    import pyarrow as pa

    out = store.with_name(f"{store.name}-format1")
    if out.exists():
        return out
    tmp = store.with_name(f".{store.name}-format1.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(store, tmp)
    for shard in sorted((tmp / "shards").glob("*.arrow")):
        reader = pa.ipc.open_stream(shard.read_bytes())
        batches = []
        for batch in reader:
            columns = {}
            for name in batch.schema.names:
                column = batch.column(name)
                if pa.types.is_dictionary(column.type):
                    column = column.cast(pa.string())
                elif name == "gene_ids":
                    column = column.cast(pa.large_list(pa.int32()))
                elif name == "values":
                    column = column.cast(pa.large_list(pa.float32()))
                columns[name] = column
            batches.append(pa.RecordBatch.from_pydict(columns))
        with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, batches[0].schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
    manifest = json.loads((tmp / "manifest.json").read_text())
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "format": 1}, indent=1))
    tmp.rename(out)
    return out


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from sc_foundation.store import CorpusStore

    paths = {"format2": args.store, "format1": format1_copy(args.store)}
    stores = {name: CorpusStore(path) for name, path in paths.items()}
    n_cells = len(stores["format2"])
    if len(stores["format1"]) != n_cells:
        raise RuntimeError("the format-1 copy holds other cells than its source")
    tokens = int(stores["format2"].lengths.sum())
    rng = np.random.default_rng(args.seed)
    rates: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(args.rounds):
        batches = [rng.choice(n_cells, args.batch_size, replace=False) for _ in range(args.batches)]
        for name, store in stores.items():
            store.get_batch(batches[0])  # warm
            started = time.perf_counter()
            for batch in batches:
                store.get_batch(batch)
            rates[name].append(args.batches * args.batch_size / (time.perf_counter() - started))
    results = {
        name: {
            "store": str(paths[name]),
            "bytes": directory_bytes(paths[name]),
            "bytes_per_token": directory_bytes(paths[name]) / tokens,
            "cells_per_s": float(np.median(rates[name])),
            "cells_per_s_rounds": rates[name],
        }
        for name in stores
    }
    payload = {
        "benchmark": "store_format",
        "machine": machine_info(),
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "tokens": tokens,
                   "cells": n_cells, "encoding": stores["format2"].tokenizer.config.encoding},
        **results,
        "size_format2_over_format1": results["format2"]["bytes"] / results["format1"]["bytes"],
        "speed_format2_over_format1": results["format2"]["cells_per_s"] / results["format1"]["cells_per_s"],
    }  # fmt: skip
    for name, r in results.items():
        print(f"{name}: {r['bytes_per_token']:.3f} bytes/token, {r['cells_per_s']:,.0f} cells/s (get_batch)")
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
