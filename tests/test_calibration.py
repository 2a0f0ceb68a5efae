"""Calibrated annotation with a refusal (sc_foundation.tasks.calibration): the expected calibration error, the
temperature, the refusal threshold, the held-out type, and the annotation task that reports them on a shift split."""

import json

import anndata
import numpy as np
import pytest
import torch
from scipy.special import softmax

from sc_foundation import annotate, tasks
from sc_foundation.data.store import CorpusStore
from sc_foundation.data.tokenization import GeneTokenizer
from sc_foundation.models.checksums import read_checksums, verify_checksums
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.novelty import NOVELTY_FILE
from sc_foundation.tasks.calibration import (
    IGNORE,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    hold_out_label,
    refusal_threshold,
)

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "~logger"]


def sampled(logits: np.ndarray, temperature: float, rng) -> np.ndarray:
    """(n,) labels drawn from softmax(logits / temperature): a classifier with these logits is off by that factor."""
    p = softmax(logits / temperature, axis=1)
    return np.array([rng.choice(p.shape[1], p=row) for row in p])


def test_ece_is_near_zero_for_calibrated_and_large_for_overconfident_probabilities():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4000, 4))
    labels = sampled(logits, 1.0, rng)
    assert expected_calibration_error(softmax(logits, axis=1), labels) < 0.03
    assert expected_calibration_error(softmax(4 * logits, axis=1), labels) > 0.1
    # by hand: two bins, confidence 0.9 with accuracy 0.5 and confidence 0.6 with accuracy 1
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    assert expected_calibration_error(probabilities, np.array([0, 1, 1, 1])) == pytest.approx((2 * 0.4 + 2 * 0.4) / 4)


def test_temperature_undoes_overconfidence_and_the_threshold_keeps_its_coverage():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (5000, 5))
    labels = sampled(logits, 2.5, rng)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.1)
    probabilities = softmax(logits, axis=1)
    threshold = refusal_threshold(probabilities, 0.9)
    assert (probabilities.max(1) >= threshold).mean() == pytest.approx(0.9, abs=0.002)
    with pytest.raises(ValueError, match="coverage"):
        refusal_threshold(probabilities, 0)


def test_report_refuses_unseen_cells_and_scores_known_ones_alone():
    rng = np.random.default_rng(2)
    known = rng.normal(0, 1, (300, 3))
    known[np.arange(300), rng.integers(0, 3, 300)] += 5  # one class stands out...
    labels = sampled(known, 1.0, rng)  # ...and is right as often as its probability says
    unseen = rng.normal(0, 0.3, (40, 3))  # no class stands out
    test_logits = np.concatenate([known[200:], unseen])
    test_labels = np.concatenate([labels[200:], np.full(40, IGNORE)])
    report = calibration_report(known[:200], labels[:200], test_logits, test_labels, coverage=0.95)
    assert report["n_known"] == 100 and report["n_unseen"] == 40
    assert report["unseen_refused"] == 1.0 and report["known_refused"] < 0.15 and report["auroc_unseen"] > 0.99
    assert 0 <= report["ece"] < 0.1 and 0.5 < report["threshold"] < 1
    assert report["temperature"] == pytest.approx(1, abs=0.3)
    without = calibration_report(known[:200], labels[:200], known[200:], labels[200:])
    assert "unseen_refused" not in without and without["ece"] == report["ece"]


def test_hold_out_label_keeps_the_type_out_of_training_only():
    names = ["a", "b", "c"]
    labels = np.array([0, 1, 2, 0, 1, 2, 1, 2, 0])
    splits = {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5]), "test": np.array([6, 7, 8])}
    known, remapped, kept = hold_out_label(names, labels, splits, "b")
    assert known == ["a", "c"] and remapped.tolist() == [0, IGNORE, 1, 0, IGNORE, 1, IGNORE, 1, 0]
    assert kept["train"].tolist() == [0, 2, 3] and kept["val"].tolist() == [5] and kept["test"].tolist() == [6, 7, 8]
    assert hold_out_label(names, labels, splits, None)[0] == names
    with pytest.raises(ValueError, match=r"'z' is not one of the labels \['a', 'b', 'c'\]"):
        hold_out_label(names, labels, splits, "z")
    with pytest.raises(ValueError, match="no test cell"):
        hold_out_label(names, labels, {**splits, "test": np.array([7, 8])}, "b")


def test_annotation_on_a_shift_split_with_a_held_out_type(pretrained, cellbench, tmp_path):
    """Train on CEL-seq2 without H2228, test on Drop-seq: the test split is every Drop-seq cell, the classifier
    knows two lines, and the report scores the H2228 cells' refusal beside the known cells' calibration. The cells
    are normalised over the panel (data.library_size=panel), and the export keeps that for inference."""
    out = tmp_path / "out"
    cfg = tasks.compose_config(
        [
            f"pretrained={pretrained}",
            f"data.files=[{{path: {cellbench}, batch_key: batch}}]",
            f"output_dir={out}",
            "data.panel_genes=200",
            "split.split_by=batch",
            "split.test_groups=[sc_dropseq]",
            "holdout_label=H2228",
            "data.library_size=panel",
            "trainer.max_epochs=3",
            *QUIET,
        ]
    )
    result = tasks.run(cfg)
    metrics = result["metrics"]
    obs = CorpusStore(result["store"]).obs
    splits = json.loads((out / "splits.json").read_text())
    test = obs.iloc[splits["test"]["store_index"]]
    assert set(test["batch"]) == {"sc_dropseq"} and len(test) == (obs["batch"] == "sc_dropseq").sum()
    for name in ("train", "val"):
        side = obs.iloc[splits[name]["store_index"]]
        assert set(side["batch"]) == {"sc_celseq2"} and "H2228" not in set(side["cell_type"])
    unseen = int((test["cell_type"] == "H2228").sum())
    assert metrics["model"]["labels"] == ["H1975", "HCC827"] and metrics["model"]["n_cells"] == len(test) - unseen
    assert metrics["baselines"]["hvg_logreg"]["n_cells"] == len(test) - unseen and metrics["holdout_label"] == "H2228"
    for name in ("model", "hvg_logreg"):
        report = metrics["calibration"][name]
        assert report["n_unseen"] == unseen > 0 and report["n_known"] == len(test) - unseen
        for key in ("ece", "ece_uncalibrated", "known_refused", "unseen_refused", "auroc_unseen"):
            assert 0 <= report[key] <= 1, (name, key, report[key])
        assert report["temperature"] > 0
    assert json.loads((out / "metrics.json").read_text())["calibration"] == metrics["calibration"]
    # the refusal by novelty: scored for ours and in the PCA baseline's space, its reference kept in the export
    for report in (metrics["calibration"]["model"]["novelty"], metrics["calibration"]["pca_novelty"]):
        assert report["n_unseen"] == unseen and report["n_reference"] == len(splits["train"]["store_index"])
        assert 0 <= report["auroc_unseen"] <= 1 and report["neighbors"] == 5 and report["threshold"] > 0
    export = out / "export" / "best"
    assert verify_checksums(export) and NOVELTY_FILE in read_checksums(export)
    classifier = load_pretrained(export, device="cpu")
    reference = classifier.novelty_reference
    assert reference.threshold == metrics["calibration"]["model"]["novelty"]["threshold"]
    # measured in the pretrained embedding (the default): the reference carries the backbone as it was before
    # fine-tuning, which full fine-tuning then changed; the classifier's own embedding is scored beside it
    assert reference.space == metrics["calibration"]["model"]["novelty"]["space"] == "pretrained"
    assert set(metrics["calibration"]["model"]["novelty_by_space"]) == {"pretrained", "classifier"}
    before = load_pretrained(pretrained, device="cpu").base_model.state_dict()
    after = classifier.base_model.state_dict()
    assert set(reference.encoder_state) == set(before) == set(after)
    assert all(np.array_equal(reference.encoder_state[name], before[name].numpy()) for name in before)
    assert not all(torch.equal(before[name], after[name]) for name in before)
    # annotate() on the same Drop-seq cells refuses what the run scored: it reads them again with those weights
    query = anndata.read_h5ad(cellbench)
    query = query[query.obs["batch"] == "sc_dropseq"].copy()
    annotate(query, export, refuse_novel=True)
    known = (query.obs["cell_type"] != "H2228").to_numpy()
    refused = (query.obs["sc_foundation_label"] == "unknown").to_numpy()
    novelty = metrics["calibration"]["model"]["novelty"]
    assert refused[known].mean() == pytest.approx(novelty["known_refused"], abs=1.5 / known.sum())
    assert refused[~known].mean() == pytest.approx(novelty["unseen_refused"], abs=1.5 / (~known).sum())
    assert GeneTokenizer.from_pretrained(out / "export" / "best").config.library_size == "panel"
