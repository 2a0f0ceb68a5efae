"""Smoke test of the benchmark scripts: both run end to end at a tiny size and report sane figures."""

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import assert_positive

CELLS = 2000


@pytest.fixture(scope="module")
def scripts(import_benchmark):
    return import_benchmark("build_store"), import_benchmark("data_loading")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One corpus cache for both tests: the second reuses the files the first wrote."""
    return tmp_path_factory.mktemp("bench_cache")


def common_args(tmp_path: Path, cache: Path, shared_data: Path) -> list[str]:
    return ["--cells", str(CELLS), "--cache-dir", str(cache), "--data-dir", str(shared_data)]


def assert_written(out: Path, payload: dict) -> None:
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_build_store_benchmark(scripts, cache, tmp_path, shared_data):
    build_store, _ = scripts
    out = tmp_path / "build_store.json"
    payload = build_store.main(["--out", str(out), "--chunk-size", "500", *common_args(tmp_path, cache, shared_data)])
    assert_written(out, payload)
    assert {"machine", "config", "binned", "rank", "continuous", "targets"} <= set(payload)
    assert payload["machine"]["cpu_count"] >= 1 and payload["machine"]["numpy"] and payload["machine"]["torch"]
    assert payload["targets"] == {"cells_per_s_per_core": 5000}
    assert len(payload["config"]["corpus_files"]) == 2  # Kang and pbmc3k copies
    for encoding in ("binned", "rank", "continuous"):
        r = payload[encoding]
        assert r["cells"] == CELLS and r["n_files"] == 2
        assert_positive(
            r,
            ["cells_per_s", "cells_per_s_per_core", "seconds", "peak_rss_mb", "peak_rss_tree_mb", "tokens",
             "mean_length", "store_size_mb"],
        )  # fmt: skip
        assert r["cells_per_s_per_core"] == pytest.approx(r["cells_per_s"])  # one worker
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 0
        assert r["tokens"] == pytest.approx(r["mean_length"] * r["cells"])
    # Only the results file is left next to the cache: every temporary store was removed.
    assert not list(cache.glob("build-*"))


def test_data_loading_benchmark(scripts, cache, tmp_path, shared_data):
    _, data_loading = scripts
    out = tmp_path / "data_loading.json"
    argv = ["--out", str(out), "--batches", "5", "--repeats", "2", "--warmup", "1", "--workers", "1"]
    argv += ["--masked-workers", "1", "--peers"]  # no peers here: test_data_loading_peers races them
    payload = data_loading.main([*argv, *common_args(tmp_path, cache, shared_data)])
    assert_written(out, payload)
    loaders = ["store", "store_masked", "store_ungrouped", "store_workers", "store_masked_workers1"]
    loaders += ["backed_anndata", "in_memory_anndata"]
    assert {"machine", "config", "targets", "speedup_store_vs_backed", *loaders} <= set(payload)
    assert payload["targets"] == {"store_cells_per_s": 20000, "speedup_vs_backed": 10}
    assert payload["config"]["store"]["cells"] == CELLS
    for name in loaders:
        r = payload[name]
        assert_positive(r, ["cells_per_s", "seconds", "mean_tokens_per_cell", "batches", "cells"])
        assert 0 <= r["padded_fraction"] < 1
        assert r["batches"] == 10 and r["cells"] == 10 * 64
    # Same cells, same tokenizer: the AnnData loaders see the very same batches.
    assert payload["backed_anndata"]["mean_tokens_per_cell"] == payload["in_memory_anndata"]["mean_tokens_per_cell"]
    assert payload["speedup_store_vs_backed"] > 0
    assert payload["in_memory_anndata"]["load_s"] > 0 and payload["backed_anndata"]["open_s"] > 0
    assert not payload["config"]["store"]["reused"]
    # A second call with the same corpus returns the finished store instead of building it again.
    args = data_loading.parse_args([*argv, *common_args(tmp_path, cache, shared_data)])
    files = sorted(cache.glob(f"corpus-{CELLS}/*.h5ad"))
    store_dir, info = data_loading.build_or_reuse_store(files, args)
    assert info["reused"] and str(store_dir) == payload["config"]["store"]["path"]


@pytest.mark.slow
def test_data_loading_peers(scripts, cache, tmp_path, shared_data):
    """The peers (bench extra) run on the same cells, raw and tokenized; annbatch is listed as skipped on 3.11."""
    pytest.importorskip("bionemo.scdl")
    pytest.importorskip("tiledbsoma_ml")
    _, data_loading = scripts
    out = tmp_path / "peers.json"
    argv = ["--out", str(out), "--batches", "5", "--repeats", "1", "--warmup", "1", "--masked-workers", "1"]
    payload = data_loading.main([*argv, *common_args(tmp_path, cache, shared_data)])
    for peer in ("bionemo_scdl", "tiledbsoma_ml"):
        r = payload[peer]
        assert_positive(r, ["cells_per_s", "raw_cells_per_s", "mean_tokens_per_cell"])
        assert r["cells"] == 5 * 64 and 0 <= r["padded_fraction"] < 1
        assert set(payload["race"][peer]) == {"store_over_peer", "store_ungrouped_over_peer", "store_leads"}
    if sys.version_info < (3, 12):
        assert "Python >= 3.12" in payload["annbatch"]["skipped"]
