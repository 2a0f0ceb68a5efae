"""Smoke test of the GPU training benchmark on the CPU: both variants run on the same cells and report sane figures.

On the CPU the packed variant goes through SDPA with a block-diagonal mask (the varlen kernels are CUDA-only), so
this checks the wiring, the packed masking path and the FLOP accounting, not GPU speed.
"""

import json
import math

import pytest


@pytest.fixture(scope="module")
def train_gpu(import_benchmark):
    return import_benchmark("train_gpu")


def test_train_gpu_benchmark_runs_both_variants_on_cpu(train_gpu, tmp_path, shared_data):
    out = tmp_path / "train_gpu.json"
    argv = [
        *("--out", str(out), "--device", "cpu", "--precision", "fp32", "--model", "tiny"),
        *("--context", "64", "--cells", "120", "--batch-size", "4", "--steps", "2", "--warmup-steps", "1"),
        *("--min-cells-per-gene", "1", "--data-dir", str(shared_data), "--cache-dir", str(tmp_path / "cache")),
    ]
    results = train_gpu.main(argv)
    assert json.loads(out.read_text()).keys() == results.keys()
    padded, packed = results["padded_sdpa"], results["packed_varlen"]
    assert packed["attention"] == "sdpa_block_diagonal" and padded["attention"] == "sdpa"
    for record in (padded, packed):
        for key in ("cells_per_s", "tokens_per_s", "mfu", "tflops_per_s"):
            assert math.isfinite(record[key]) and record[key] > 0, key
        assert math.isfinite(record["last_loss"])
    # Same cells in both layouts: the same real token count, hence the same FLOPs per step.
    assert padded["tokens_per_s"] / padded["cells_per_s"] == pytest.approx(
        packed["tokens_per_s"] / packed["cells_per_s"]
    )
    assert results["speedup_packed_vs_padded"] > 0
