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
        "--jobs", "2",
    ]  # fmt: skip
    payload = quality.main(argv)  # both runs side by side in two worker processes

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
    # each worker had its share of the cores as torch threads, and says what it cost
    assert saved["jobs"] == 2 and saved["threads_per_job"] == max(1, quality.cpu_cores() // 2)
    for run in (task["runs"]["1"], failed["runs"]["1"]):
        assert run["torch_threads"] == saved["threads_per_job"] and run["peak_rss_gib"] > 0.1
        assert 0 < run["finetune_wall_s"] <= run["wall_s"]
    metrics = json.loads(Path(task["metrics_file"]).read_text())
    table = task["comparisons"]["annotation"]
    assert table["ours"] == ["model", "frozen (stage)"] and table["baselines"] == ["hvg_logreg", "pca_logreg"]
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

    # --reuse takes the finished seed from the quality.json in --out instead of fine-tuning it again
    again = quality.main([*argv[:5], "annotation_cellbench", *argv[7:], "--reuse"])
    reused = again["tasks"]["annotation_cellbench"]
    assert reused["runs"]["1"]["reused"] is True and reused["runs"]["1"]["wall_s"] == task["runs"]["1"]["wall_s"]
    assert reused["comparisons"] == task["comparisons"] and reused["metrics_file"] == task["metrics_file"]
    assert "| **ours** |" in md and "| hvg_logreg |" in md and "ours beats all baselines? |" in md
    assert f"{metrics['model']['accuracy']:.3f}" in md and str(pretrained.resolve()) in md


def test_one_job_runs_in_this_process_and_records_each_failed_seed(quality, pretrained, tmp_path, monkeypatch):
    broken = {**quality.TASKS["annotation_cellbench"], "files": ["no_such_dataset/missing.h5ad"], "description": "x"}
    monkeypatch.setitem(quality.TASKS, "broken", broken)
    argv = ["--out", str(tmp_path), "--pretrained", str(pretrained), "--tasks", "broken", "--seeds", "0", "1"]
    saved = quality.main([*argv, "--jobs", "1"])
    import torch

    assert saved["jobs"] == 1 and saved["threads_per_job"] is None
    record = saved["tasks"]["broken"]
    assert record["status"] == "error" and record["error"].startswith("seed 0: ") and "missing.h5ad" in record["error"]
    for run in record["runs"].values():
        assert run["status"] == "error" and "Traceback" in run["traceback"]
        assert run["torch_threads"] == torch.get_num_threads()  # this process's threads, untouched
    assert "- runs: one at a time in this process" in (tmp_path / "quality.md").read_text()
    with pytest.raises(SystemExit):
        quality.parse_args([*argv, "--jobs", "0"])


def test_umap_grid_writes_a_png(quality, tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    embedding = np.concatenate([rng.normal(0, 1, (60, 5)), rng.normal(6, 1, (60, 5))])
    kinds = np.repeat(["a", "b"], 60)
    path = quality.umap_grid(
        {"ours": embedding}, {"type": kinds, "batch": np.tile(["x", "y"], 60)}, tmp_path / "u.png", 0
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_aggregate_reports_mean_and_spread_and_weighs_gaps_against_it(quality):
    def table(ours: float, lr: float, pca: float, skipped: bool = False) -> dict:
        baselines = {"hvg_logreg": {"accuracy": lr, "macro_f1": lr}, "pca_logreg": {"accuracy": pca, "macro_f1": pca}}
        if skipped:
            baselines["pca_logreg"] = {"skipped": "not installed"}
        return quality.compare("annotation", {"model": {"accuracy": ours, "macro_f1": ours}}, baselines, "model")

    # ours 0.70 ± 0.10 against logistic regression 0.66 ± 0.02: ahead by 0.04, within the spread -> a tie
    tables = [table(0.6, 0.64, 0.5), table(0.7, 0.66, 0.5), table(0.8, 0.68, 0.5)]
    merged = quality.aggregate(tables)
    assert merged["n_seeds"] == 3 and merged["values"]["model"]["macro_f1"] == pytest.approx(0.7)
    assert merged["std"]["model"]["macro_f1"] == pytest.approx(0.1) and merged["std"]["pca_logreg"]["macro_f1"] == 0
    assert merged["per_seed"]["hvg_logreg"]["macro_f1"] == [0.64, 0.66, 0.68]
    assert merged["best"]["macro_f1"] == "model" and merged["spread"]["macro_f1"] == pytest.approx(0.1)
    assert merged["verdict"]["model"]["macro_f1"] == "tie" and merged["at_least_best"]["model"]["macro_f1"] is True
    assert merged["beats_all_baselines"] is False
    # steady seeds: the same gap is now larger than the spread
    steady = quality.aggregate([table(0.70, 0.66, 0.5), table(0.71, 0.66, 0.5), table(0.69, 0.66, 0.5)])
    assert steady["verdict"]["model"] == {"accuracy": "win", "macro_f1": "win"} and steady["beats_all_baselines"]
    behind = quality.aggregate([table(0.5, 0.66, 0.5), table(0.52, 0.66, 0.5)])
    assert behind["verdict"]["model"]["macro_f1"] == "loss" and not behind["at_least_best"]["model"]["macro_f1"]
    # one seed: compare's verdicts; a baseline skipped at any seed is left out
    single = quality.aggregate([tables[0]])
    assert single["verdict"] == tables[0]["verdict"] and single["std"]["model"]["macro_f1"] == 0
    partial = quality.aggregate([table(0.6, 0.64, 0.5), table(0.7, 0.66, 0.5, skipped=True)])
    assert partial["baselines"] == ["hvg_logreg"] and partial["skipped_baselines"] == {"pca_logreg": "not installed"}
    markdown = "\n".join(quality.table_markdown("annotation", merged))
    assert "0.700 ± 0.100" in markdown and "mean ± sd over 3 seeds" in markdown and "= (tie)" in markdown


def test_seed_flags(quality, tmp_path):
    assert quality.parse_args(["--out", str(tmp_path)]).seeds == [0]
    assert quality.parse_args(["--out", str(tmp_path), "--seed", "4", "--full"]).seeds == [4, 5, 6]
    assert quality.parse_args(["--out", str(tmp_path), "--seeds", "2", "7"]).seeds == [2, 7]
    with pytest.raises(SystemExit):
        quality.parse_args(["--out", str(tmp_path), "--full", "--seeds", "1"])


def test_facs_reference_and_pbmc68k_share_one_label_set(quality, shared_data, tmp_path):
    import anndata

    files = quality.facs_to_pbmc68k(shared_data, tmp_path, reference_cells=None)
    reference, query = (anndata.read_h5ad(f["path"]) for f in files)
    mapped = set(quality.FACS_TO_PBMC68K.values())
    assert set(reference.obs["cell_type"]) == set(query.obs["cell_type"]) == mapped and len(mapped) == 8
    # every reference cell but the 191 CD4+ helper T cells; every pbmc68k cell but its 240 Dendritic and 13 CD34+
    assert (reference.n_obs, query.n_obs) == (2140 - 191, 700 - 240 - 13)
    assert (reference.obs["cell_type"] == "CD56+ NK").sum() == 769 and (query.obs["cell_type"] == "CD19+ B").sum() == 95
    capped = anndata.read_h5ad(quality.facs_to_pbmc68k(shared_data, tmp_path / "capped", seed=1)[0]["path"])
    assert capped.n_obs == 700 and set(capped.obs_names) < set(reference.obs_names)
    shift = quality.TASKS["annotation_shift_facs"]
    assert "split.test_groups=[pbmc68k_mapped.h5ad]" in shift["overrides"] and shift["within"] == "annotation"
    assert all(quality.TASKS[spec["within"]] for spec in quality.TASKS.values() if spec.get("within"))


def test_thinned_cellbench_makes_one_line_rare_in_each_protocol(quality, shared_data, tmp_path):
    import anndata
    import pandas as pd

    thinned = anndata.read_h5ad(quality.thinned_cellbench(shared_data, tmp_path / "s0", seed=0)[0]["path"])
    counts = pd.crosstab(thinned.obs["batch"], thinned.obs["cell_type"])
    # CellBench holds 112 / 81 / 81 cells of H1975 / H2228 / HCC827 in CEL-seq2 and 86 / 69 / 70 in Drop-seq
    assert counts.loc["sc_celseq2"].tolist() == [112, 13, 81] and counts.loc["sc_dropseq"].tolist() == [13, 69, 70]
    again = anndata.read_h5ad(quality.thinned_cellbench(shared_data, tmp_path / "again", seed=0)[0]["path"])
    other = anndata.read_h5ad(quality.thinned_cellbench(shared_data, tmp_path / "s1", seed=1)[0]["path"])
    assert list(again.obs_names) == list(thinned.obs_names) and set(other.obs_names) != set(thinned.obs_names)
    assert quality.TASKS["integration_thinned"]["prepare"] == "thinned_cellbench"


def test_snare_integration_row_holds_every_library_and_type_in_its_subset(quality, shared_data, tmp_path):
    import anndata

    spec = quality.TASKS["integration_snare"]
    assert spec["task"] == "integration" and {"batch_key=Batch", "label_key=cell_type"} <= set(spec["overrides"])
    written = quality.subset_files(spec["files"], shared_data, tmp_path, spec["subset"], seed=0)
    cells = anndata.read_h5ad(written[0]["path"])
    # 2,000 of 10,309 cells: all 12 libraries and 15 types stay, in uneven shares (a mild batch, not a balanced one)
    assert cells.n_obs == 2000 and cells.obs["Batch"].nunique() == 12 and cells.obs["cell_type"].nunique() == 15
    shares = cells.obs.groupby("Batch", observed=True)["cell_type"].value_counts(normalize=True).unstack(fill_value=0)
    assert (shares.max() - shares.min()).max() > 0.1


def test_top_context_keeps_the_most_expressed_genes_and_counts_the_pushed_out(import_benchmark):
    import numpy as np

    context_shift = import_benchmark("context_shift")
    x = np.array([[5.0, 0.0, 3.0, 1.0], [0.0, 2.0, 0.0, 0.0], [1.0, 1.0, 4.0, 2.0]])  # (cells, genes)
    chosen = context_shift.top_context(x, 2)
    assert chosen.tolist() == [[True, False, True, False], [False, True, False, False], [False, False, True, True]]
    shares = context_shift.gene_shares(x, chosen)
    # gene 0: expressed in cells 0 and 2, in context only in cell 0 -> half pushed out; gene 3 the other way round
    np.testing.assert_allclose(shares["pushed_out"], [0.5, 0.5, 0.0, 0.5])
    np.testing.assert_allclose(shares["in_context"], [1 / 3, 1 / 3, 2 / 3, 1 / 3])


def test_refusal_table_leads_with_novelty_beside_both_baselines(quality):
    def refusal(unseen, known, auroc):
        return {"unseen_refused": unseen, "known_refused": known, "auroc_unseen": auroc}

    metrics = {
        "model": {"accuracy": 0.9, "macro_f1": 0.8},
        "baselines": {"hvg_logreg": {"accuracy": 0.9, "macro_f1": 0.8}},
        "calibration": {
            "model": {
                "ece": 0.1,
                "ece_uncalibrated": 0.2,
                **refusal(0.1, 0.05, 0.7),
                "novelty": refusal(0.9, 0.04, 0.98),
            },
            "hvg_logreg": {"ece": 0.1, "ece_uncalibrated": 0.1, **refusal(0.2, 0.05, 0.8)},
            "pca_novelty": refusal(0.8, 0.06, 0.97),
        },
    }
    table = quality.comparisons("annotation", metrics)["refusal"]
    assert table["ours"] == ["model_novelty", "model"] and table["primary"] == "model_novelty"
    assert table["baselines"] == ["hvg_logreg", "pca_novelty"] and table["beats_all_baselines"] is True
    assert table["verdict"]["model"] == {"unseen_refused": "loss", "known_refused": "tie", "auroc_unseen": "loss"}
    markdown = "\n".join(quality.table_markdown("refusal", table))
    assert "**ours: model_novelty**" in markdown and "ours (model_novelty) beats every baseline" in markdown
    # both novelty spaces scored: the stored one leads, the other follows as its own row
    ours = metrics["calibration"]["model"]
    ours["novelty"] = {**ours["novelty"], "space": "pretrained"}
    ours["novelty_by_space"] = {"pretrained": ours["novelty"], "classifier": refusal(0.6, 0.05, 0.9)}
    table = quality.comparisons("annotation", metrics)["refusal"]
    assert table["ours"] == ["model_novelty", "model_novelty_classifier", "model"]
    assert table["primary"] == "model_novelty" and table["beats_all_baselines"] is True
    assert table["verdict"]["model_novelty_classifier"]["auroc_unseen"] == "loss"


def test_a_frozen_stage_shows_beside_the_exported_model(quality):
    """With a weight ensemble both averaged models are rows; with LP-FT alone the frozen head is (the tuned model is
    the export itself)."""
    metrics = {
        "model": {"accuracy": 0.9, "macro_f1": 0.8},
        "baselines": {"hvg_logreg": {"accuracy": 0.85, "macro_f1": 0.75}},
        "calibration": {
            "model": {"ece": 0.1, "ece_uncalibrated": 0.2},
            "hvg_logreg": {"ece": 0.1, "ece_uncalibrated": 0.1},
        },
        "stages": {
            "weight_ensemble": 0.75,
            "head_from_frozen": False,
            "frozen": {"accuracy": 0.8, "macro_f1": 0.7},
            "tuned": {"accuracy": 0.95, "macro_f1": 0.78},
        },
    }
    table = quality.comparisons("annotation", metrics)["annotation"]
    assert table["ours"] == ["model", "frozen (stage)", "tuned (stage)"] and table["primary"] == "model"
    assert table["verdict"]["frozen (stage)"]["macro_f1"] == "loss"
    assert table["verdict"]["tuned (stage)"] == {"accuracy": "win", "macro_f1": "win"}
    assert table["beats_all_baselines"] is True  # decided by the average, the model that is exported
    del metrics["stages"]["tuned"]  # LP-FT alone: the tuned model is the export, scored once as "model"
    metrics["stages"] |= {"weight_ensemble": None, "head_from_frozen": True}
    assert quality.comparisons("annotation", metrics)["annotation"]["ours"] == ["model", "frozen (stage)"]
    metrics["stages"] = None
    assert quality.comparisons("annotation", metrics)["annotation"]["ours"] == ["model"]


def test_long_runs_are_submitted_first_in_table_order(quality):
    units = [(name, 0, 0) for name in ("annotation", "imputation", "protein", "integration_snare", "atac")]
    units.append(("integration", 1, 1))
    order = [name for name, _, _ in quality.submission_order(units)]
    assert order == ["imputation", "integration_snare", "integration", "annotation", "protein", "atac"]


def test_default_jobs_one_per_core_within_memory_and_one_with_cuda(quality, monkeypatch):
    import torch

    gib = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 0}
    monkeypatch.setattr(quality.os, "sysconf", lambda name: gib[name])
    monkeypatch.setattr(quality, "cpu_cores", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gib["SC_PHYS_PAGES"] = 64 * 2**30 // 4096
    assert quality.default_jobs() == 16  # one per core: 16 x 3 GiB fit in 64 GiB
    gib["SC_PHYS_PAGES"] = 24 * 2**30 // 4096
    assert quality.default_jobs() == 8  # 24 GiB hold 8 workers at JOB_MEMORY_GIB each
    gib["SC_PHYS_PAGES"] = 2 * 2**30 // 4096
    assert quality.default_jobs() == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gib["SC_PHYS_PAGES"] = 64 * 2**30 // 4096
    assert quality.default_jobs() == 1
