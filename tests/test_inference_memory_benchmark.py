"""Smoke test of benchmarks/inference_memory.py: a long-context stand-in embeds the longest CellBench cells in fresh
processes, unplanned and under a small budget; the planned run splits the batch, holds less memory, and gives the
same embedding."""

import json

import pytest


@pytest.mark.slow  # three fresh processes, each loading torch and embedding cells of about 10,000 genes
def test_planned_inference_splits_batches_and_keeps_the_embedding(import_benchmark, shared_data, tmp_path):
    benchmark = import_benchmark("inference_memory")
    out = tmp_path / "out" / "inference_memory.json"
    args = ["--out", str(out), "--context", "2000", "--layers", "1", "--cells", "4", "--batch-size", "4"]
    record = benchmark.main([*args, "--budgets-gb", "0.01", "--cache-dir", str(tmp_path / "cache")])

    unplanned, planned = record["unplanned"], record["planned 0.01 GiB"]
    assert unplanned["batches"] == 1 and unplanned["largest_batch"] == [4, 2000]
    assert planned["batches"] > 1 and planned["largest_batch"][0] < 4
    assert unplanned["max_difference"] == 0 and planned["max_difference"] < 1e-5
    assert planned["peak_rise_gib"] < unplanned["peak_rise_gib"]
    assert json.loads(out.read_text())["context"] == 2000
