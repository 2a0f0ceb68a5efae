"""Benchmark: store format 3 (one-byte id steps) against formats 2 (narrow types) and 1, on the same cells.

Takes a complete store of the current format (3; a binned or continuous one, whose ids are stored as steps) and
writes copies of it beside, each made once: ``<store>-format2`` with the ids decoded back into ``list<uint16>``
``gene_ids`` (the format-2 layout), and ``<store>-format1`` with format 1's types on top (``large_list<int32>`` ids,
``large_list<float32>`` values, plain string labels). Then, in one process, it reads them all with ``CorpusStore``
and times ``get_batch`` on the same seeded random batches of ``--batch-size`` cells, the formats alternating round by
round in a rotating order (``--rounds`` rounds of ``--batches`` batches each), so that a load change on a shared
machine hits them alike. Reported per format: bytes on disk, bytes per token (directory size / tokens; the shards
alone too, since the fixed files weigh more in a smaller store), and the median round's cells/s, per
second of wall time and per second of this process's CPU time (which a busy machine disturbs less); then each older
format against the newest.

    python benchmarks/store_format.py --store .bench/store-binned-ctx2048-50000 --out store_format.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from _corpus import machine_info, write_json_atomic


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True, help="a complete store (format 3: binned or continuous)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=200, help="batches per timed round")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per format, alternating")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def decoded_ids(batch, id_type) -> pa.Array:
    """A format-3 record batch's ``gene_id_deltas`` and ``gene_id_exceptions`` decoded: the ids as a list array of
    ``id_type`` (a list or large list, as the steps were)."""
    from sc_foundation.data.store import delta_decode

    deltas = batch.column("gene_id_deltas")
    lengths = deltas.value_lengths().to_numpy().astype(np.int64)
    ids = deltas.flatten().to_numpy().astype(np.int64)
    delta_decode(ids, batch.column("gene_id_exceptions").flatten().to_numpy(), lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    large = pa.types.is_large_list(deltas.type)
    list_type, offset_type = (pa.LargeListArray, pa.int64()) if large else (pa.ListArray, pa.int32())
    return list_type.from_arrays(pa.array(offsets, type=offset_type), pa.array(ids).cast(id_type))


def older_copy(store: Path, format: int) -> Path:
    """The store rewritten in ``format`` (1 or 2), at ``<store>-format{format}`` (through a temporary folder).

    Format 2: the ids as ``gene_ids`` of the narrow id type (decoded from the steps of a format-3 store), everything
    else as stored. Format 1 on top: int32 ids and float32 values in large lists, labels as plain strings.
    """
    from sc_foundation.data.store import token_types
    from sc_foundation.data.tokenization import GeneTokenizer

    out = store.with_name(f"{store.name}-format{format}")
    if out.exists():
        return out
    id_type = token_types(GeneTokenizer.from_pretrained(store))[0]
    tmp = store.with_name(f".{store.name}-format{format}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(store, tmp)
    for shard in sorted((tmp / "shards").glob("*.arrow")):
        batches = []
        for batch in pa.ipc.open_stream(shard.read_bytes()):
            columns = {}
            for name in batch.schema.names:
                column = batch.column(name)
                if name == "gene_id_exceptions":
                    continue
                if name == "gene_id_deltas":  # the decoded ids take the steps' place
                    name, column = "gene_ids", decoded_ids(batch, id_type)
                if format == 1 and pa.types.is_dictionary(column.type):
                    column = column.cast(pa.string())
                elif format == 1 and name in ("gene_ids", "values"):
                    column = column.cast(pa.large_list(pa.int32() if name == "gene_ids" else pa.float32()))
                columns[name] = column
            batches.append(pa.RecordBatch.from_pydict(columns))
        with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, batches[0].schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
    manifest = json.loads((tmp / "manifest.json").read_text())
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "format": format}, indent=1))
    tmp.rename(out)
    return out


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from sc_foundation.data.store import FORMAT, CorpusStore

    newest = CorpusStore(args.store).format
    paths = {f"format{k}": args.store if k == newest else older_copy(args.store, k) for k in range(newest, 0, -1)}
    stores = {name: CorpusStore(path) for name, path in paths.items()}
    n_cells = len(stores[f"format{newest}"])
    if any(len(store) != n_cells for store in stores.values()):
        raise RuntimeError("a copy holds other cells than its source")
    tokens = int(stores[f"format{newest}"].lengths.sum())
    rng = np.random.default_rng(args.seed)
    rates: dict[str, list[float]] = {name: [] for name in stores}
    cpu_rates: dict[str, list[float]] = {name: [] for name in stores}
    names = list(stores)
    for round_ in range(args.rounds):
        batches = [rng.choice(n_cells, args.batch_size, replace=False) for _ in range(args.batches)]
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # each format leads in turn
            store = stores[name]
            store.get_batch(batches[0])  # warm
            started, cpu_started = time.perf_counter(), time.process_time()
            for batch in batches:
                store.get_batch(batch)
            rates[name].append(args.batches * args.batch_size / (time.perf_counter() - started))
            cpu_rates[name].append(args.batches * args.batch_size / (time.process_time() - cpu_started))
    results = {
        name: {
            "store": str(paths[name]),
            "bytes": directory_bytes(paths[name]),
            "bytes_per_token": directory_bytes(paths[name]) / tokens,
            "shard_bytes_per_token": directory_bytes(paths[name] / "shards") / tokens,
            "cells_per_s": float(np.median(rates[name])),
            "cells_per_s_rounds": rates[name],
            "cells_per_cpu_s": float(np.median(cpu_rates[name])),
            "cells_per_cpu_s_rounds": cpu_rates[name],
        }
        for name in stores
    }
    first = f"format{newest}"
    payload = {
        "benchmark": "store_format",
        "machine": machine_info(),
        "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "tokens": tokens,
                   "cells": n_cells, "encoding": stores[first].tokenizer.config.encoding, "reader_format": FORMAT},
        **results,
        **{f"size_{first}_over_{name}": results[first]["bytes"] / results[name]["bytes"] for name in names[1:]},
        **{f"speed_{first}_over_{name}": results[first]["cells_per_s"] / results[name]["cells_per_s"]
           for name in names[1:]},
        **{f"cpu_speed_{first}_over_{name}": results[first]["cells_per_cpu_s"] / results[name]["cells_per_cpu_s"]
           for name in names[1:]},
    }  # fmt: skip
    for name, r in results.items():
        print(
            f"{name}: {r['bytes_per_token']:.3f} bytes/token ({r['shard_bytes_per_token']:.3f} in the shards), "
            f"{r['cells_per_s']:,.0f} cells/s, {r['cells_per_cpu_s']:,.0f} cells per CPU s (get_batch)"
        )
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
