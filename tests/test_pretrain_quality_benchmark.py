"""Smoke test of benchmarks/pretrain_quality.py: the recipe, its probe table and curve, an ablation and the fp32 /
bf16 timing, end to end on a small slice of the recipe (cellbench only, a few steps)."""

import json

import pytest

from tests.conftest import small_recipe


def test_pretrain_quality_runs_recipe_probes_ablation_and_precision(import_benchmark, shared_data, tmp_path):
    benchmark = import_benchmark("pretrain_quality")
    small = [
        *small_recipe(tmp_path / "cache"),
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1",
        "optim.warmup_steps=1",
        "probes.sets=[{name: cellbench, dataset: cellbench_3cl, max_cells: 120}]",
    ]
    args = ["--out", str(tmp_path / "out"), "--probe-cells", "150", "--ablations", "no_contrastive"]
    record = benchmark.main(
        [*args, "--ablation-steps", "2", "--precision", "2", "--precision-models", "32x2", "--recipe-overrides", *small]
    )

    assert record["recipe"]["steps"] == 6
    assert [h["step"] for h in record["probe_history"]] == [3, 6]
    table = record["probes"]["cellbench"]
    assert table["n_cells"] == 150 and 0 < table["pca"]["knn_accuracy"] <= 1
    assert table["ratio"]["knn_accuracy"] == pytest.approx(table["ours"]["knn_accuracy"] / table["pca"]["knn_accuracy"])
    assert set(record["ablations"]) == {"recipe (same steps)", "no_contrastive"}
    assert record["ablations"]["no_contrastive"]["steps"] == 2
    assert record["precision"]["s_per_step_fp32"] > 0 and record["precision"]["s_per_step_bf16"] > 0
    narrow = record["precision_by_size"]["32x2"]
    assert narrow["hidden_size"] == 32 and narrow["trainer_precision_chosen"] == "32-true"  # too narrow for bf16
    assert 0 < narrow["flops_per_step"] < record["precision"]["flops_per_step"]
    out = tmp_path / "out"
    assert json.loads((out / "pretrain_quality.json").read_text())["probes"]["cellbench"]["n_cells"] == 150
    assert (out / "probe_curve.png").stat().st_size > 0
    markdown = (out / "pretrain_quality.md").read_text()
    assert "| cellbench |" in markdown and "no_contrastive" in markdown and "bf16" in markdown
