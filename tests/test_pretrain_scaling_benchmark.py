"""Smoke test of benchmarks/pretrain_scaling.py: two widths at equal (tiny) training time, probed along the way, the
fp32 rerun at equal steps, FLOPs that grow with width and steps, and the JSON, table and plot it writes."""

import json

import pytest

from tests.conftest import small_recipe


@pytest.mark.slow  # five short trainings and their probes: about a minute on 2 idle cores
def test_scaling_runs_widths_at_equal_time_and_the_precision_check(import_benchmark, shared_data, tmp_path):
    benchmark = import_benchmark("pretrain_scaling")
    small = [
        *small_recipe(tmp_path / "cache"),
        "probes.sets=[{name: cellbench, dataset: cellbench_3cl, label_key: cell_type, batch_key: batch,"
        " max_cells: 120}]",
    ]
    args = ["--out", str(tmp_path / "out"), "--widths", "64", "128", "--corpora", "--recipe-corpus", "recipe"]
    record = benchmark.main(
        [*args, "--minutes", "0.03", "--rounds", "2", "--precision-check", "--recipe-overrides", *small]
    )

    points = record["points"]
    assert list(points) == ["width 64, recipe", "width 128, recipe", "width 128, recipe, fp32"]
    for point in points.values():
        steps = [c["step"] for c in point["curve"]]
        assert len(steps) == 2 and steps[1] == 2 * steps[0] == point["steps"]
        assert point["curve"][1]["flops"] == pytest.approx(2 * point["curve"][0]["flops"])
        assert set(point["curve"][-1]["ratios"]["cellbench"]) == {"knn_accuracy", "avg_bio", "batch_score"}
        assert point["curve"][-1]["worst_ratio"] <= point["curve"][-1]["probe_score"]
    wide, fp32 = points["width 128, recipe"], points["width 128, recipe, fp32"]
    assert fp32["precision"] == "32-true" and fp32["steps"] == wide["steps"]
    assert wide["timing"]["flops_per_step"] > 2 * points["width 64, recipe"]["timing"]["flops_per_step"]
    out = tmp_path / "out"
    assert json.loads((out / "pretrain_scaling.json").read_text())["points"].keys() == points.keys()
    assert (out / "scaling.png").stat().st_size > 0
    assert "| width 128, recipe, fp32 | 32-true |" in (out / "pretrain_scaling.md").read_text()
