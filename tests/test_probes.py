"""Representation probes: the scores, the PCA baseline, the embedding scored, and the pretraining callback."""

import json

import numpy as np
import pandas as pd
import pytest

from sc_foundation.inference import embed
from sc_foundation.probes import (
    ProbeSet,
    RepresentationProbe,
    flatten_results,
    load_probe_set,
    pca_embedding,
    score_embedding,
)


def clustered(n_per_class=60, n_classes=3, dim=8, spread=0.1, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    labels = np.repeat(np.arange(n_classes), n_per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), dim)), labels


def test_scores_separate_a_clustered_embedding_from_noise():
    x, labels = clustered()
    good = score_embedding(x, labels)
    noise = score_embedding(np.random.default_rng(1).normal(size=x.shape), labels)
    assert good["knn_accuracy"] == 1.0 and good["ari"] > 0.95 and good["avg_bio"] > 0.9
    assert noise["knn_accuracy"] < 0.6 and noise["avg_bio"] < 0.4
    assert good["avg_bio"] == pytest.approx(np.mean([good["nmi"], good["ari"], good["asw_label"]]))


def test_depth_correlation_finds_an_embedding_that_encodes_depth():
    x, labels = clustered()
    depth = np.random.default_rng(2).integers(200, 5000, len(x))
    clean = score_embedding(x, labels, depth)["depth_correlation"]
    leaky = np.column_stack([x, 20 * np.log1p(depth)])  # depth becomes the leading axis
    assert clean < 0.3 < 0.95 < score_embedding(leaky, labels, depth)["depth_correlation"]


def test_score_refuses_nan_rows():
    x, labels = clustered()
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        score_embedding(x, labels)


def test_probe_sets_load_labelled_seeded_subsamples(shared_data):
    probe = ProbeSet(name="cellbench", dataset="cellbench_3cl", max_cells=200, seed=3)
    first, again = load_probe_set(probe), load_probe_set(probe)
    assert first.n_obs == 200 and list(first.obs_names) == list(again.obs_names)
    assert set(first.obs["label"]) == {"H1975", "H2228", "HCC827"}
    assert first.uns["probe"]["species"] == "auto"
    with pytest.raises(ValueError, match="label_key"):
        load_probe_set(ProbeSet(name="x", dataset="cellbench_3cl", label_key="no_such_column"))
    with pytest.raises(ValueError, match="exactly one"):
        ProbeSet(name="x")


def test_pca_separates_the_cell_lines(shared_data):
    adata = load_probe_set(ProbeSet(name="cellbench", dataset="cellbench_3cl", max_cells=None))
    x = pca_embedding(adata)
    assert x.shape == (adata.n_obs, 50)
    assert score_embedding(x, adata.obs["label"])["knn_accuracy"] > 0.95


def test_the_probe_scores_exactly_what_embed_returns(pretrained, shared_data):
    from sc_foundation.export import load_pretrained

    model = load_pretrained(pretrained)
    probe = RepresentationProbe([ProbeSet(name="cellbench", dataset="cellbench_3cl", max_cells=150)])
    results = probe.evaluate(model)["cellbench"]
    cells = probe.sets["cellbench"].copy()
    embed(cells, model, progress=False)
    expected = score_embedding(cells.obsm["X_sc_foundation"], cells.obs["label"], np.diff(cells.X.indptr))
    assert results["ours"] == pytest.approx(expected)
    assert results["ratio"]["knn_accuracy"] == pytest.approx(expected["knn_accuracy"] / results["pca"]["knn_accuracy"])
    flat = flatten_results({"cellbench": results})
    assert flat["probe/cellbench/knn_accuracy"] == results["ours"]["knn_accuracy"]
    assert flat["probe/cellbench/pca_avg_bio"] == results["pca"]["avg_bio"]


def test_a_short_pretraining_run_learns_cells_and_logs_its_probes(tmp_path, shared_data):
    """Cell-level objectives on cellbench: the probe's kNN accuracy of the cell lines rises from the untrained
    model's, the scores land in the CSV log and in the export's model card."""
    from test_train import compose_pretrain

    import train

    cfg = compose_pretrain(
        [
            "data.datasets=[cellbench_3cl]",
            f"paths.cache={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'run'}",
            "data.build_workers=1",
            "data.tokenizer.encoding=continuous",
            "data.tokenizer.context_length=128",
            "data.tokenizer.add_cls=false",
            "data.tokenizer.min_match_rate=0.05",
            "data.panel={n_top_genes:300,max_cells:1000}",
            "data.loader.batch_size=32",
            "data.loader.view_keep=[0.4,0.8]",
            "model.pooling=mean",
            "model.reconstruction_weight=1.0",
            "model.contrastive_weight=1.0",
            "trainer.max_steps=60",
            "trainer.val_check_interval=30",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "optim.warmup_steps=5",
            "optim.learning_rate=3e-3",
            "probes.every_n_validations=1",
            "probes.sets=[{name: cellbench, dataset: cellbench_3cl, max_cells: 300}]",
        ]
    )
    probes = train.probe_callback(cfg, None)
    result = train.run(cfg, callbacks=[])
    history = result["probes"].history
    assert [h["step"] for h in history] == [30, 60]
    # The untrained model of the same seed, probed the same way, is the floor the run must rise from.
    untrained = train.build_model(cfg, result["datamodule"].store)
    untrained.gene_tokenizer = result["datamodule"].store.tokenizer
    start = probes_for(probes, untrained)["cellbench"]["ours"]["knn_accuracy"]
    end = history[-1]["results"]["cellbench"]["ours"]["knn_accuracy"]
    assert end > start + 0.1, (start, end)
    metrics = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    assert metrics["probe/cellbench/knn_accuracy"].dropna().iloc[-1] == pytest.approx(end)
    export = result["export"]
    card = (export / "README.md").read_text()
    assert "| cellbench |" in card and "Representation probes" in card
    assert json.loads((export / "metrics.json").read_text())["probes"]["cellbench"]["ours"]["knn_accuracy"] == end


def probes_for(callback, model):
    from sc_foundation.probes import RepresentationProbe

    return RepresentationProbe(callback.probe_sets, **callback.settings).evaluate(model)
