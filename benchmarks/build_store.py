"""Benchmark: building a corpus store from real count files, for each value encoding.

For each encoding (binned, rank, continuous) a store is built from the replicated real-data corpus (see
``_corpus.py``) into a fresh temporary folder by ``sc_foundation.data.store.build_store``, each build in a fresh
process of
its own so that the peak memory measured is that build's alone. The processes are forked from a multiprocessing fork
server that has imported ``sc_foundation.data.store`` once (importing the package pulls in torch, Lightning and
transformers: seconds and hundreds of MB per process), so a build process starts at once, holding the imports but
nothing of this script's own memory. Reported per encoding:

* ``cells_per_s``: cells written / wall seconds of the ``build_store`` call (both passes: the gene statistics that
  build the vocabulary, and the rank medians, then tokenizing and writing the shards). Process start is not
  counted; ``child_wall_s`` is the process's whole life as the parent saw it.
* ``cells_per_s_per_core``: the above divided by the worker processes actually busy, ``max(1, min(workers, parts))``
  (an input larger than ``--part-size`` cells is cut into row ranges, each a part).
* ``peak_rss_mb``: the largest peak resident memory of any process of the build: the kernel's high-water mark
  ``VmHWM`` of the build process (read by it at the end) and of each of its worker processes (read from ``/proc``
  every 20 ms while they live; the mark only grows, so the last reading is the peak up to 20 ms). ``ru_maxrss`` is
  not used: on Linux a process keeps its parent's high-water mark through fork + exec, so ``RUSAGE_CHILDREN`` after
  a ``subprocess`` call reports at least the parent's own peak. ``baseline_rss_mb`` is the build process's mark
  before the build (the imports it starts with); ``peak_rss_tree_mb`` the largest sum of current RSS over the build
  process and its workers seen by the polling.
* cells, tokens, mean tokens per cell, store size on disk and ``bytes_per_token`` (store size / tokens).

The input files are read once before each build so that every encoding starts with them in the page cache.

    python benchmarks/build_store.py --out build_store.json [--cells 200000] [--workers 1] [--chunk-size 8192]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _corpus import DEFAULT_CACHE, DEFAULT_DATA, machine_info, make_replicated_corpus, write_json_atomic

ENCODINGS = ("binned", "rank", "continuous")
TARGETS = {"cells_per_s_per_core": 5000}
POLL_S = 0.02
MB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--cells", type=int, default=200_000, help="cells in the replicated corpus")
    parser.add_argument("--workers", type=int, default=1, help="build_store num_workers (parts in parallel)")
    parser.add_argument(
        "--part-size", type=int, default=None, help="build_store part_size: cells per row range of an input"
    )
    parser.add_argument("--chunk-size", type=int, default=8192, help="cells read and tokenized at a time")
    parser.add_argument("--context", type=int, default=2048, help="context length (tokens per cell, CLS included)")
    parser.add_argument("--encodings", nargs="+", choices=ENCODINGS, default=list(ENCODINGS))
    parser.add_argument("--file-cells", type=int, default=50_000, help="about how many cells per corpus file")
    parser.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none", help="corpus files' HDF5")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared real-data folder")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the corpus is cached")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------- in the build process
def _build(job: dict) -> None:
    """Run one build as ``job`` describes and write what it measured to ``job["result"]``."""
    from sc_foundation.data.store import build_store
    from sc_foundation.data.tokenization import TokenizerConfig

    baseline = _high_water_bytes(os.getpid())
    config = TokenizerConfig(encoding=job["encoding"], context_length=job["context"])
    started = time.perf_counter()
    parts = {} if job["part_size"] is None else {"part_size": job["part_size"]}
    report = build_store(
        job["inputs"],
        job["store"],
        tokenizer_config=config,
        chunk_size=job["chunk_size"],
        num_workers=job["workers"],
        **parts,
    )
    seconds = time.perf_counter() - started
    result = {
        "seconds": seconds,
        "n_cells": report.n_cells,
        "n_cells_in": sum(s.n_cells_in for s in report.shards),
        "n_tokens": sum(s.n_tokens for s in report.shards),
        "n_truncated": sum(s.n_truncated for s in report.shards),
        "n_vocab": report.n_vocab,
        "shard_seconds": [s.seconds for s in report.shards],
        "resumed": report.resumed,
        "baseline_rss_bytes": baseline,
        "peak_rss_self_bytes": _high_water_bytes(os.getpid()),
    }
    write_json_atomic(job["result"], result)


def _high_water_bytes(pid: int) -> int | None:
    """Peak resident memory of a live process (``VmHWM``), or None when it cannot be read."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    if pid == os.getpid() and sys.platform == "darwin":  # no /proc: bytes, possibly including the parent's peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None


# ----------------------------------------------------------------------------------------------- in the parent
def _build_context():
    """Processes forked from a server that imported ``sc_foundation.data.store`` once (see the module docstring)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["sc_foundation.data.store"])
    return context


def _read_through(paths: list[Path]) -> None:
    """Read files once so that they sit in the page cache (every build then starts from the same state)."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(16 * MB):
                pass


def _poll_tree(process, worker_peaks: dict[int, int]) -> int:
    """Current RSS summed over ``process`` and its descendants; records each descendant's high-water mark."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
            if p.pid != process.pid:
                peak = _high_water_bytes(p.pid)
                if peak is not None:
                    worker_peaks[p.pid] = max(peak, worker_peaks.get(p.pid, 0))
    return total


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_build(encoding: str, files: list[Path], work_dir: Path, args: argparse.Namespace) -> dict:
    """Build one store in a child process; return its figures."""
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix=f"build-{encoding}-", dir=work_dir))
    try:
        job = {
            "encoding": encoding,
            "context": args.context,
            "chunk_size": args.chunk_size,
            "workers": args.workers,
            "part_size": args.part_size,
            "inputs": [str(f) for f in files],
            "store": str(tmp / "store"),
            "result": str(tmp / "result.json"),
        }
        _read_through(files)
        started = time.perf_counter()
        child = _build_context().Process(target=_build, args=(job,), name=f"build-{encoding}")
        child.start()
        process = psutil.Process(child.pid)
        peak_tree, worker_peaks = 0, {}
        while child.is_alive():
            with contextlib.suppress(psutil.NoSuchProcess):
                peak_tree = max(peak_tree, _poll_tree(process, worker_peaks))
            time.sleep(POLL_S)
        child.join()
        child_wall = time.perf_counter() - started
        if child.exitcode != 0 or not Path(job["result"]).exists():
            raise RuntimeError(f"the {encoding} build failed (exit code {child.exitcode}); its traceback is above")
        result = json.loads(Path(job["result"]).read_text())
        store_bytes = _directory_bytes(tmp / "store")
        n_parts = len(list((tmp / "store" / "shards").glob("*.arrow")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if result["resumed"]:
        raise RuntimeError(f"the {encoding} build reused finished shards {result['resumed']}: not a fresh build")
    workers_peak = max(worker_peaks.values(), default=0)
    self_peak, baseline = result["peak_rss_self_bytes"] or 0, result["baseline_rss_bytes"] or 0
    busy = max(1, min(args.workers, n_parts))
    rate = result["n_cells"] / result["seconds"]
    sequential = busy == 1
    return {
        "cells_per_s": rate,
        "cells_per_s_per_core": rate / busy,
        "busy_processes": busy,
        "seconds": result["seconds"],
        # Pass 2 (tokenize + write) summed over files; with one busy process the rest of `seconds` is pass 1.
        "shard_seconds_sum": sum(result["shard_seconds"]),
        "stats_pass_seconds": result["seconds"] - sum(result["shard_seconds"]) if sequential else None,
        "child_wall_s": child_wall,
        "peak_rss_mb": max(self_peak, workers_peak) / MB,
        "peak_rss_self_mb": self_peak / MB,
        "peak_rss_workers_mb": workers_peak / MB if worker_peaks else None,
        "worker_processes_seen": len(worker_peaks),
        "peak_rss_tree_mb": peak_tree / MB,
        "baseline_rss_mb": baseline / MB,
        "n_files": len(files),
        "cells_in": result["n_cells_in"],
        "cells": result["n_cells"],
        "tokens": result["n_tokens"],
        "mean_length": result["n_tokens"] / max(result["n_cells"], 1),
        "cells_truncated": result["n_truncated"],
        "vocab_size": result["n_vocab"],
        "store_size_mb": store_bytes / MB,
        "bytes_per_token": store_bytes / max(result["n_tokens"], 1),
        "n_parts": n_parts,
        "meets_target": rate / busy >= TARGETS["cells_per_s_per_core"],
    }


def format_table(results: dict[str, dict]) -> str:
    head = (
        f"{'encoding':<11} {'cells':>9} {'seconds':>8} {'cells/s':>9} {'/core':>8} {'stats s':>8} {'peak MB':>8} "
        f"{'tree MB':>8} {'tokens':>12} {'mean len':>9} {'store MB':>9}"
    )
    lines = [head, "-" * len(head)]
    for encoding, r in results.items():
        stats = "-" if r["stats_pass_seconds"] is None else f"{r['stats_pass_seconds']:.1f}"
        lines.append(
            f"{encoding:<11} {r['cells']:>9,} {r['seconds']:>8.1f} {r['cells_per_s']:>9,.0f} "
            f"{r['cells_per_s_per_core']:>8,.0f} {stats:>8} {r['peak_rss_mb']:>8.0f} {r['peak_rss_tree_mb']:>8.0f} "
            f"{r['tokens']:>12,} {r['mean_length']:>9.1f} {r['store_size_mb']:>9.1f} {r['bytes_per_token']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    machine = machine_info()
    compression = None if args.compression == "none" else args.compression
    corpus_dir = args.cache_dir / f"corpus-{args.cells}"
    files = make_replicated_corpus(
        corpus_dir, args.cells, file_cells=args.file_cells, compression=compression, data_dir=args.data_dir
    )
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"build_store benchmark: {args.cells:,} cells in {len(files)} files, workers={args.workers}, "
        f"chunk_size={args.chunk_size}, context={args.context}",
        flush=True,
    )
    results = {}
    for encoding in args.encodings:
        results[encoding] = run_build(encoding, files, args.cache_dir, args)
        r = results[encoding]
        print(f"  {encoding}: {r['cells_per_s']:,.0f} cells/s, peak {r['peak_rss_mb']:.0f} MB", flush=True)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    payload = {
        "benchmark": "build_store",
        "machine": machine,
        "config": {
            "cells": args.cells,
            "workers": args.workers,
            "chunk_size": args.chunk_size,
            "context": args.context,
            "corpus_dir": str(corpus_dir),
            "corpus_files": [f.name for f in files],
            "corpus_file_cells": args.file_cells,
            "corpus_compression": compression,
            "corpus": "real kang_ifnb + pbmc3k cells replicated with unique cell ids (see benchmarks/_corpus.py)",
            "timing": "wall seconds of build_store (statistics pass + shard pass) in a fresh process per encoding "
            "(forked from a server that imported sc_foundation.data.store); inputs read once beforehand so they are in "
            "the page cache",
            "part_size": args.part_size,
            "per_core": "cells_per_s / max(1, min(workers, n_parts))",
        },
        **results,
        "targets": TARGETS,
    }
    print(format_table(results))
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
