"""benchmarks/context_ceiling.py: the probes' scores of PCA on the values each token choice keeps."""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from sc_foundation.data.tokenization import GeneTokenizer

CELLBENCH_ONLY = [
    "experiment=cpu_pretrain",
    "probes.sets=[{name: cellbench, dataset: cellbench_3cl, batch_key: batch}]",
]


@pytest.fixture
def relative_export(pretrained, tmp_path):
    """The tiny export with a tokenizer that reads cells by ``relative`` truncation (seeded medians)."""
    folder = tmp_path / "export"
    shutil.copytree(pretrained, folder)
    base = GeneTokenizer.from_pretrained(folder)
    medians = np.random.default_rng(0).uniform(0.5, 20.0, len(base.vocab))
    medians[base.vocab.special_ids] = np.nan
    GeneTokenizer(base.vocab, dataclasses.replace(base.config, truncation="relative"), medians).save(folder)
    return folder


def test_context_ceiling_scores_each_token_choice_beside_hvg_pca(import_benchmark, relative_export, tmp_path):
    benchmark = import_benchmark("context_ceiling")
    out = tmp_path / "out"
    args = ["--out", str(out), "--pretrained", str(relative_export), "--contexts", "16", "--probe-cells", "200"]
    record = benchmark.main([*args, "--recipe-overrides", *CELLBENCH_ONLY])

    scores = record["sets"]["cellbench"]["scores"]
    assert list(scores) == ["hvg_pca", "all", "top 16", "relative 16"]
    assert scores["top 16"]["genes_per_cell"] == scores["relative 16"]["genes_per_cell"] == 15  # 16 with the CLS
    assert scores["all"]["genes_per_cell"] > 16  # cellbench cells express far more than 16 of its panel genes
    for s in scores.values():
        assert 0 < s["knn_accuracy"] <= 1 and 0 <= s["batch_score"] <= 1
    # The two choices keep different genes, so PCA of what they keep differs.
    assert scores["top 16"]["avg_bio"] != scores["relative 16"]["avg_bio"]
    assert json.loads((out / "context_ceiling.json").read_text())["sets"]["cellbench"]["n_cells"] == 200
    assert "| cellbench (200) | relative 16 | 15 |" in (out / "context_ceiling.md").read_text()


def test_context_ceiling_refuses_relative_without_medians(import_benchmark, pretrained, tmp_path):
    benchmark = import_benchmark("context_ceiling")
    with pytest.raises(SystemExit, match="no gene medians"):
        benchmark.main(["--out", str(tmp_path), "--pretrained", str(pretrained), "--recipe-overrides", *CELLBENCH_ONLY])
