"""Benchmark: shuffled training batches as ready torch tensors, from the corpus store and from AnnData files.

Every loader works on the same cells: the replicated real-data corpus (see ``_corpus.py``) as ``.h5ad`` files, and a
binned store built from exactly those files (built once under the cache folder and reused while its plan matches).
A batch is ``batch_size`` shuffled cells as ``input_ids`` (B, L) int64, ``values`` (B, L) float32 and
``attention_mask`` (B, L) bool, padded to the longest cell of the batch (rounded up to a multiple of 8, as the store
does). Loaders:

* ``store``: the path a training run takes: ``CorpusDataModule(num_workers=0, mask_ratio=None)`` train loader
  (``CellBatchSampler`` with length grouping -> ``StoreBatchDataset`` -> ``DataLoader(batch_size=None)``);
* ``store_masked``: the same with the pretraining ``MaskingCollator`` on (``mask_ratio=0.15``);
* ``store_ungrouped``: the same as ``store`` without length grouping: random batches, like the AnnData loaders;
* ``store_workers``: ``store`` with ``--workers`` DataLoader worker processes; timing starts after the warm-up
  batches, the first of which waits for the workers to start, so worker start-up is not counted;
* ``backed_anndata``: what a user without a store does: ``anndata.read_h5ad(path, backed="r")`` on each file, random
  batches of cells over all files (sorted within each file, as h5py needs increasing indices), rows read from disk,
  then normalised and tokenized by the store's own tokenizer (``match_genes`` once per file, ``encode`` per batch)
  and padded into tensors;
* ``in_memory_anndata``: the same from AnnData read fully into memory; the load is timed and its memory reported
  separately, only the batches are timed;
* ``store_masked_workers{n}``: ``store_masked`` with ``n`` DataLoader workers (``--masked-workers``, default 1 and 2),
  which hand over groups of 4 batches as one shared buffer each (``sc_foundation.data.datamodule.SharedBatch``,
  ``GroupedBatches``);
* the peers (``--peers``, the ``bench`` extra; see ``_peers.py``): ``bionemo_scdl``, ``tiledbsoma_ml`` and
  ``annbatch`` (skipped below Python 3.12), each timed raw and tokenized; ``race`` compares them with ``store``.

Each loader runs ``--warmup`` untimed batches, then ``--repeats`` timed rounds of ``--batches`` batches and reports
the median round's cells/s; a loader whose timed rounds exceed ``--time-budget`` seconds in all stops early (the JSON
says so: ``stopped_by_time_budget``). The two AnnData loaders draw the very same batches.

    python benchmarks/data_loading.py --out data_loading.json [--cells 200000] [--batch-size 64] [--batches 300]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from _corpus import (
    DEFAULT_CACHE,
    DEFAULT_DATA,
    cached_binned_store,
    machine_info,
    make_replicated_corpus,
    write_json_atomic,
)
from _peers import tokenize

TARGETS = {"store_cells_per_s": 20000, "speedup_vs_backed": 10}
PEERS = ("bionemo_scdl", "tiledbsoma_ml", "annbatch")
MB = 2**20
PAD_TO_MULTIPLE = 8  # CorpusStore.get_batch's default
DETECTION_ROWS = 8192  # rows whose detected genes decide the match rate (build_store's first chunk)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--cells", type=int, default=200_000, help="cells in the replicated corpus")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048, help="context length of the store's tokenizer")
    parser.add_argument("--batches", type=int, default=300, help="timed batches per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per loader (the median is reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches before timing each loader")
    parser.add_argument("--time-budget", type=float, default=120.0, help="most timed seconds per loader")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the store_workers loader")
    parser.add_argument(
        "--masked-workers", type=int, nargs="+", default=[1, 2], help="worker counts of the masked store loaders"
    )
    parser.add_argument(
        "--peers", nargs="*", default=list(PEERS), choices=PEERS, help="peer loaders to race (the bench extra)"
    )
    parser.add_argument("--mask-ratio", type=float, default=0.15, help="masking of the store_masked loader")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--file-cells", type=int, default=50_000, help="about how many cells per corpus file")
    parser.add_argument("--compression", choices=("none", "gzip", "lzf"), default="none", help="corpus files' HDF5")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared real-data folder")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the corpus and store are cached")
    return parser.parse_args(argv)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def _children() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


# -------------------------------------------------------------------------------------------------- timing
def measure(batches: Iterator[dict], n_batches: int, warmup: int, budget_s: float, repeats: int) -> dict:
    """Time ``repeats`` rounds of ``n_batches`` consecutive batches after ``warmup`` untimed ones.

    ``cells_per_s`` is the median over the rounds (robust to a stall on a shared machine); the timed rounds stop
    early once they have taken ``budget_s`` seconds in all. Batch statistics are taken with numpy on a view of the
    mask: a torch reduction here would start torch's intra-op threads, which on a busy machine can cost more than
    the loader being measured.
    """
    for _ in range(warmup):
        next(batches)
    rates, spent = [], 0.0
    cells = real = slots = done = 0
    stopped_by_budget = False
    for round_ in range(repeats):
        round_cells = round_done = 0
        started = time.perf_counter()
        while round_done < n_batches:
            batch = next(batches)
            if isinstance(batch, dict):
                mask = batch["attention_mask"].numpy()
                round_cells += mask.shape[0]
                slots += mask.size
                real += int(np.count_nonzero(mask))
            else:  # a peer's raw batch: counts (tensor or array, cells first), or (counts, obs)
                round_cells += (batch[0] if isinstance(batch, tuple) else batch).shape[0]
            round_done += 1
            last = round_done == n_batches and round_ == repeats - 1
            if not last and spent + time.perf_counter() - started > budget_s:
                stopped_by_budget = True
                break
        seconds = time.perf_counter() - started
        spent += seconds
        rates.append(round_cells / seconds)
        cells += round_cells
        done += round_done
        if stopped_by_budget:
            break
    return {
        "cells_per_s": float(np.median(rates)),
        "cells_per_s_rounds": rates,
        "cells_per_s_overall": cells / spent,
        "tokens_per_s": real / spent,
        "batches": done,
        "cells": cells,
        "seconds": spent,
        "ms_per_batch": 1000 * spent / max(done, 1),
        "mean_tokens_per_cell": real / max(cells, 1),
        "padded_fraction": 1.0 - real / max(slots, 1),
        "warmup_batches": warmup,
        "stopped_by_time_budget": stopped_by_budget,
    }


# ------------------------------------------------------------------------------------------ store loaders
def _store_batches(loader) -> Iterator[dict]:
    """Batches of a store train loader, epoch after epoch (as Lightning drives it)."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError("the store loader produced no batch: fewer cells than one batch?")
        epoch += 1


def run_store(store_dir: Path, args, *, workers: int, mask_ratio: float | None, group_by_length: bool) -> dict:
    from sc_foundation.data.datamodule import CorpusDataModule

    started = time.perf_counter()
    module = CorpusDataModule(
        store_dir,
        batch_size=args.batch_size,
        val_fraction=0.0,
        mask_ratio=mask_ratio,
        group_by_length=group_by_length,
        num_workers=workers,
        seed=args.seed,
    )
    module.setup("fit")
    loader = module.train_dataloader()
    setup_s = time.perf_counter() - started
    rss = rss_mb()
    batches = _store_batches(loader)
    # With workers the first batch waits for them to start: it is always part of the untimed warm-up.
    warmup = max(args.warmup, 1 if workers else 0)
    result = measure(batches, args.batches, warmup, args.time_budget, args.repeats)
    batches.close()
    del batches, loader, module  # the last references: persistent workers end here, before the next loader runs
    if workers and _children():
        gc.collect()  # slow with torch loaded (about 0.5 s), so only when a reference cycle kept workers alive
    return {**result, "setup_s": setup_s, "rss_mb_after_setup": rss, "num_workers": workers}


# ---------------------------------------------------------------------------------------- AnnData loaders
class AnnDataBatches:
    """Random batches of cells from ``.h5ad`` files, tokenized by the store's tokenizer into padded tensors.

    The cells of all files form one index space; each epoch is a random permutation of it cut into batches. A batch
    reads, for each file it touches, that file's rows in increasing order, tokenizes them and pads the result.
    """

    def __init__(self, files: list[Path], tokenizer, *, backed: bool):
        import anndata

        from sc_foundation.data.tokenization import cell_keys

        self.tokenizer = tokenizer
        started = time.perf_counter()
        self.adatas = [anndata.read_h5ad(f, backed="r" if backed else None) for f in files]
        self.read_s = time.perf_counter() - started
        # Set-up a user does once per file: the X handle, the gene match and the per-cell keys.
        self.matrices = [a.X for a in self.adatas]
        # Detection over the first rows, as build_store does: a whole-genome panel lists many genes no cell
        # expresses, and match_genes refuses it (match rate below min_match_rate) when detection is not given.
        self.matches = [
            tokenizer.match_genes(
                np.asarray(a.var_names, dtype=str),
                source=str(f),
                cells_per_gene=np.bincount(X[:DETECTION_ROWS].indices, minlength=a.n_vars),
            )
            for a, X, f in zip(self.adatas, self.matrices, files, strict=True)
        ]
        self.keys = [cell_keys(a.obs_names) for a in self.adatas]
        self.starts = np.cumsum([0] + [a.n_obs for a in self.adatas])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def close(self) -> None:
        for adata in self.adatas:
            if adata.isbacked:
                adata.file.close()

    def batch(self, cells: np.ndarray) -> dict:
        cells = np.sort(cells)
        file_of = np.searchsorted(self.starts, cells, side="right") - 1
        groups = []
        for f in np.unique(file_of):
            rows = cells[file_of == f] - self.starts[f]
            groups.append((self.matrices[f][rows], self.matches[f], self.keys[f][rows]))
        return tokenize(self.tokenizer, groups, PAD_TO_MULTIPLE)

    def batches(self, batch_size: int, seed: int) -> Iterator[dict]:
        epoch = 0
        while True:
            order = np.random.default_rng([seed, epoch]).permutation(len(self))
            for lo in range(0, len(order) - batch_size + 1, batch_size):  # drop_last, as the store's train loader
                yield self.batch(order[lo : lo + batch_size])
            epoch += 1


def run_anndata(files: list[Path], store_dir: Path, args, *, backed: bool) -> dict:
    from sc_foundation.data.tokenization import GeneTokenizer

    before = rss_mb()
    started = time.perf_counter()
    source = AnnDataBatches(files, GeneTokenizer.from_pretrained(store_dir), backed=backed)
    setup_s = time.perf_counter() - started
    after = rss_mb()
    try:
        batches = source.batches(args.batch_size, args.seed)
        result = measure(batches, args.batches, args.warmup, args.time_budget, args.repeats)
    finally:
        source.close()
    return {
        **result,
        # read_h5ad alone (backed: opening; in memory: the full load), then with the gene matches and cell keys.
        "open_s" if backed else "load_s": source.read_s,
        "setup_s": setup_s,
        "rss_mb_after_setup": after,
        "rss_mb_added_by_setup": after - before,
    }


# ------------------------------------------------------------------------------------------------------ peers
def run_peer(name: str, files: list[Path], store_dir: Path, args) -> dict:
    """One peer loader (see ``_peers.py``), timed raw and tokenized; ``cells_per_s`` is the tokenized rate."""
    import _peers

    from sc_foundation.data.tokenization import GeneTokenizer

    if name == "annbatch":
        reason = _peers.annbatch_skip_reason()
        return {"skipped": reason}
    tokenizer = GeneTokenizer.from_pretrained(store_dir)
    cache = args.cache_dir / f"peers-{args.cells}"
    try:
        if name == "bionemo_scdl":
            peer = _peers.bionemo_scdl(files, cache, tokenizer, args.batch_size, args.seed)
        else:
            copy = _peers.soma_copy(files, cache / "soma-experiment")
            peer = _peers.tiledbsoma_ml(copy, tokenizer, args.batch_size, args.seed)
    except ImportError as error:
        return {"skipped": f"{error}; install the peers with {_peers.BENCH_EXTRA}"}
    try:
        raw = measure(peer["raw"](), args.batches, args.warmup, args.time_budget, args.repeats)
        tokenized = measure(peer["tokenized"](), args.batches, args.warmup, args.time_budget, args.repeats)
    finally:
        if "close" in peer:
            peer["close"]()
    setup = {k: v for k, v in peer.items() if k.endswith("_s")}
    return {**tokenized, "raw_cells_per_s": raw["cells_per_s"], "raw": raw, **setup}


# ------------------------------------------------------------------------------------------------ the run
def build_or_reuse_store(files: list[Path], args) -> tuple[Path, dict]:
    """The binned store of the corpus files (:func:`_corpus.cached_binned_store`) and facts about its build."""
    store_dir = args.cache_dir / f"store-binned-ctx{args.context}-{args.cells}"
    return store_dir, cached_binned_store(files, store_dir, args.context)


def race(loaders: dict[str, dict]) -> dict:
    """Our unmasked store loader against each peer that ran (tokenized rates: batches the model takes)."""
    grouped, ungrouped = loaders["store"]["cells_per_s"], loaders["store_ungrouped"]["cells_per_s"]
    return {
        name: {
            "store_over_peer": grouped / r["cells_per_s"],
            # Random batches, as the peers give: the like-for-like comparison.
            "store_ungrouped_over_peer": ungrouped / r["cells_per_s"],
            "store_leads": min(grouped, ungrouped) > r["cells_per_s"],
        }
        for name, r in loaders.items()
        if name in PEERS and "skipped" not in r
    }


def format_table(loaders: dict[str, dict]) -> str:
    head = (
        f"{'loader':<18} {'cells/s':>9} {'tokens/s':>11} {'ms/batch':>9} {'batches':>8} {'seconds':>8} "
        f"{'tokens/cell':>11} {'padded':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, r in loaders.items():
        if "skipped" in r:
            lines.append(f"{name:<18} skipped: {r['skipped']}")
            continue
        note = " (time budget)" if r["stopped_by_time_budget"] else ""
        note += f" (raw {r['raw_cells_per_s']:,.0f} cells/s)" if "raw_cells_per_s" in r else ""
        lines.append(
            f"{name:<22} {r['cells_per_s']:>9,.0f} {r['tokens_per_s']:>11,.0f} {r['ms_per_batch']:>9.2f} "
            f"{r['batches']:>8} {r['seconds']:>8.2f} {r['mean_tokens_per_cell']:>11.1f} "
            f"{100 * r['padded_fraction']:>6.1f}%{note}"
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
    store_dir, store_info = build_or_reuse_store(files, args)
    built = "reused" if store_info["reused"] else f"built in {store_info['seconds']:.1f} s"
    print(
        f"data loading benchmark: {store_info['cells']:,} cells in {len(files)} files, batch {args.batch_size}, "
        f"{args.repeats} x {args.batches} timed batches per loader after {args.warmup} warm-up; store {built}",
        flush=True,
    )
    workers, ratio = args.workers, args.mask_ratio
    runs: dict[str, Callable[[], dict]] = {
        "store": lambda: run_store(store_dir, args, workers=0, mask_ratio=None, group_by_length=True),
        "store_masked": lambda: run_store(store_dir, args, workers=0, mask_ratio=ratio, group_by_length=True),
        "store_ungrouped": lambda: run_store(store_dir, args, workers=0, mask_ratio=None, group_by_length=False),
        "store_workers": lambda: run_store(store_dir, args, workers=workers, mask_ratio=None, group_by_length=True),
        **{
            f"store_masked_workers{n}": lambda n=n: run_store(
                store_dir, args, workers=n, mask_ratio=ratio, group_by_length=True
            )
            for n in args.masked_workers
        },
        "backed_anndata": lambda: run_anndata(files, store_dir, args, backed=True),
        "in_memory_anndata": lambda: run_anndata(files, store_dir, args, backed=False),
        **{name: lambda name=name: run_peer(name, files, store_dir, args) for name in args.peers},
    }
    loaders = {}
    for name, run in runs.items():
        loaders[name] = run()
        if "skipped" in loaders[name]:
            print(f"  {name}: skipped ({loaders[name]['skipped']})", flush=True)
            continue
        raw = f" ({loaders[name]['raw_cells_per_s']:,.0f} raw)" if "raw_cells_per_s" in loaders[name] else ""
        print(f"  {name}: {loaders[name]['cells_per_s']:,.0f} cells/s{raw}", flush=True)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    store, backed = loaders["store"]["cells_per_s"], loaders["backed_anndata"]["cells_per_s"]
    payload = {
        "benchmark": "data_loading",
        "machine": machine,
        "config": {
            "cells": args.cells,
            "batch_size": args.batch_size,
            "context": args.context,
            "batches": args.batches,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "time_budget_s": args.time_budget,
            "workers": args.workers,
            "mask_ratio": args.mask_ratio,
            "seed": args.seed,
            "corpus_dir": str(corpus_dir),
            "corpus_files": [f.name for f in files],
            "corpus_compression": compression,
            "store": store_info,
            "batch": "shuffled cells -> input_ids (B, L) int64, values (B, L) float32, attention_mask (B, L) bool as "
            f"torch tensors, L = longest cell rounded up to a multiple of {PAD_TO_MULTIPLE}",
            "store_workers_timing": "timed after the warm-up batches; the first batch waits for the workers to "
            "start, so worker start-up is excluded",
            "anndata_batches": "same seeded random batches for backed and in-memory AnnData: cells drawn over all "
            "files, read per file in increasing row order, tokenized with the store's tokenizer",
            "timing": "warm-up batches untimed, then `repeats` rounds of `batches` batches; cells_per_s is the median "
            "round; a loader stops early when its timed rounds exceed time_budget_s (stopped_by_time_budget)",
        },
        **loaders,
        "speedup_store_vs_backed": store / backed,
        "speedup_store_vs_in_memory": store / loaders["in_memory_anndata"]["cells_per_s"],
        "speedup_store_ungrouped_vs_backed": loaders["store_ungrouped"]["cells_per_s"] / backed,
        # The race: our training path (store_masked, with its workers) against each peer's tokenized batches.
        "race": race(loaders),
        "targets": TARGETS,
        "meets_targets": {
            "store_cells_per_s": store >= TARGETS["store_cells_per_s"],
            "speedup_vs_backed": store / backed >= TARGETS["speedup_vs_backed"],
        },
    }
    print(format_table(loaders))
    print(
        f"store vs backed AnnData: {payload['speedup_store_vs_backed']:.1f}x; "
        f"vs in-memory AnnData: {payload['speedup_store_vs_in_memory']:.1f}x"
    )
    write_json_atomic(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
