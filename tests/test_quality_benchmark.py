"""Smoke test of the quality benchmark: a cheap task end to end on real cells, a broken task that must not sink it,
and the table logic that decides whether we beat the baselines."""

import json
import math
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def quality(import_benchmark):
    return import_benchmark("quality")


def test_compare_marks_best_values_and_verdicts(quality):
    ours = {"model": {"median_l1": 1.0, "pearson": 0.5, "pearson_log1p": float("nan")}}
    baselines = {
        "knn_smoothing": {"median_l1": 2.0, "pearson": 0.5, "pearson_log1p": 0.3},
        "gene_mean": {"median_l1": 0.5, "pearson": 0.1, "pearson_log1p": 0.2},
        "scvi": {"skipped": "not installed"},
    }
    table = quality.compare("imputation", ours, baselines, "model")
    assert table["baselines"] == ["knn_smoothing", "gene_mean"] and table["skipped_baselines"] == {
        "scvi": "not installed"
    }
    assert table["best"] == {"median_l1": "gene_mean", "pearson": "model", "pearson_log1p": "knn_smoothing"}
    # lower median L1 is better: gene_mean's 0.5 beats our 1.0; our pearson only ties knn_smoothing; NaN never wins
    assert table["verdict"]["model"] == {"median_l1": "loss", "pearson": "tie", "pearson_log1p": "loss"}
    assert table["values"]["model"]["pearson_log1p"] is None and table["beats_all_baselines"] is False
    won = quality.compare(
        "annotation", {"model": {"accuracy": 0.9, "macro_f1": 0.8}}, {"b": {"accuracy": 0.8, "macro_f1": 0.7}}, "model"
    )
    assert won["beats_all_baselines"] is True and set(won["verdict"]["model"].values()) == {"win"}
    markdown = "\n".join(quality.table_markdown("imputation", table))
    assert "**no**" in markdown and "median_l1 (best: gene_mean)" in markdown and "scvi baseline skipped" in markdown


def test_quality_benchmark_runs_a_task_and_survives_a_broken_one(
    quality, pretrained, shared_data, tmp_path, monkeypatch
):
    broken = {**quality.TASKS["annotation_cellbench"], "files": ["no_such_dataset/missing.h5ad"], "description": "x"}
    monkeypatch.setitem(quality.TASKS, "broken", broken)
    out = tmp_path / "quality"
    argv = [
        "--out", str(out), "--pretrained", str(pretrained), "--tasks", "annotation_cellbench", "broken",
        "--max-epochs", "1", "--data-dir", str(shared_data), "--seed", "1", "--set", "data.panel_genes=200",
    ]  # fmt: skip
    payload = quality.main(argv)

    saved = json.loads((out / "quality.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert saved["complete"] is True and saved["seed"] == 1 and saved["max_epochs_override"] == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert saved["machine"]["cpu_count"] >= 1
    pre = saved["pretrained"]
    assert pre["path"] == str(Path(pretrained).resolve()) and pre["trained_here"] is False
    assert pre["config"]["model"]["hidden_size"] == 32 and pre["config"]["model"]["num_hidden_layers"] == 2
    assert pre["model_group"] == "custom" and pre["config"]["tokenizer"]["context_length"] == 256

    assert saved["summary"]["failed"] == ["broken"] and saved["summary"]["ok"] == ["annotation_cellbench"]
    assert quality.exit_status(saved) == 1
    failed = saved["tasks"]["broken"]
    assert failed["status"] == "error" and "missing.h5ad" in failed["error"] and "Traceback" in failed["traceback"]

    task = saved["tasks"]["annotation_cellbench"]
    assert task["status"] == "ok" and "trainer.max_epochs=1" in task["overrides"]
    assert task["epochs"] == 1 and 0 < task["steps"] <= math.ceil(task["n_cells"]["train"] / 32)  # one epoch
    assert task["wall_s"] > 0 and sum(task["n_cells"].values()) == 499
    metrics = json.loads(Path(task["metrics_file"]).read_text())
    table = task["comparisons"]["annotation"]
    assert table["ours"] == ["model"] and table["baselines"] == ["hvg_logreg", "pca_logreg"]
    for name, scores in {"model": metrics["model"], **metrics["baselines"]}.items():
        for key in ("accuracy", "macro_f1"):
            value = table["values"][name][key]
            assert math.isfinite(value) and 0 <= value <= 1 and value == scores[key], (name, key)
    for key in ("accuracy", "macro_f1"):
        best = table["best"][key]
        assert table["values"][best][key] == max(row[key] for row in table["values"].values())
    verdicts = table["verdict"]["model"]
    assert table["beats_all_baselines"] == all(v == "win" for v in verdicts.values())
    assert saved["summary"]["beats_all_baselines"] == {"annotation_cellbench": table["beats_all_baselines"]}

    png = out / "annotation_cellbench_confusion.png"
    assert task["figures"] == [str(png)] and saved["figures"] == [str(png)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    md = (out / "quality.md").read_text()
    assert "## annotation_cellbench" in md and "## broken" in md and "**FAILED**" in md
    assert "| **ours** |" in md and "| hvg_logreg |" in md and "ours beats all baselines? |" in md
    assert f"{metrics['model']['accuracy']:.3f}" in md and str(pretrained.resolve()) in md


def test_umap_grid_writes_a_png(quality, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    embedding = np.concatenate([rng.normal(0, 1, (60, 5)), rng.normal(6, 1, (60, 5))])
    kinds = np.repeat(["a", "b"], 60)
    path = quality.umap_grid(
        {"ours": embedding}, {"type": kinds, "batch": np.tile(["x", "y"], 60)}, tmp_path / "u.png", 0
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
