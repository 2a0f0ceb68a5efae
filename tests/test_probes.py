"""Representation probes: the scores, the PCA baseline, the embedding scored, and the pretraining callback."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sc_foundation.inference import embed
from sc_foundation.training.probes import (
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


def batched_cells(offset: float, seed=0):
    """Three cell types in two batches; the second batch's cells shifted by ``offset`` along a new axis."""
    x, labels = clustered(n_per_class=80, seed=seed)
    batches = np.tile([0, 1], len(x) // 2)
    return np.column_stack([x, offset * batches]), labels, batches


def test_batch_scores_tell_a_batch_split_embedding_from_a_mixed_one():
    mixed, labels, batches = batched_cells(offset=0.0)
    split, _, _ = batched_cells(offset=10.0)
    good, bad = score_embedding(mixed, labels, batches=batches), score_embedding(split, labels, batches=batches)
    for metric in ("batch_asw", "ilisi", "graph_connectivity", "batch_score"):
        assert 0 <= bad[metric] <= 1 and 0 <= good[metric] <= 1
    assert good["batch_asw"] > 0.9 > 0.6 > bad["batch_asw"]
    # scaled iLISI of two random-mixed batches among 15 neighbours is about 0.55, not 1 (finite neighbourhoods)
    assert good["ilisi"] > 0.4 > 0.1 > bad["ilisi"]  # a split embedding's neighbours are all of its own batch
    assert good["graph_connectivity"] > 0.95
    assert bad["graph_connectivity"] < 0.8  # each type falls apart into its two batches
    assert good["batch_score"] == pytest.approx(
        np.mean([good[m] for m in ("batch_asw", "ilisi", "graph_connectivity")])
    )
    assert "batch_score" not in score_embedding(mixed, labels)
    with pytest.raises(ValueError, match="two or more batches"):
        score_embedding(mixed, labels, batches=np.zeros(len(labels)))


def test_probe_sets_with_a_batch_key_carry_their_batches(shared_data):
    cells = load_probe_set(ProbeSet(name="cellbench", dataset="cellbench_3cl", batch_key="batch", max_cells=200))
    assert set(cells.obs["batch"]) == {"sc_celseq2", "sc_dropseq"}
    with pytest.raises(ValueError, match="batch_key"):
        load_probe_set(ProbeSet(name="x", dataset="cellbench_3cl", batch_key="plate"))


def test_the_scvi_reference_is_skipped_with_its_reason_when_scvi_tools_is_missing(shared_data, monkeypatch):
    from sc_foundation.tasks import scvi_baselines

    monkeypatch.setattr(scvi_baselines, "scvi_available", lambda: False)
    probe = RepresentationProbe(
        [ProbeSet(name="cellbench", dataset="cellbench_3cl", batch_key="batch", max_cells=150)], scvi=True
    )
    assert "scvi-tools is not installed" in probe.skipped["scvi"]
    assert set(probe.references["cellbench"]) == {"pca"}
    assert "batch_score" in probe.references["cellbench"]["pca"]


def test_reference_embeddings_are_cached_on_disk(shared_data, tmp_path, monkeypatch):
    from sc_foundation.training import probes

    sets = [ProbeSet(name="cellbench", dataset="cellbench_3cl", max_cells=120, seed=5)]
    first = RepresentationProbe(sets, cache_dir=tmp_path).references
    (cached,) = tmp_path.glob("pca-*.npy")
    monkeypatch.setattr(probes, "_REFERENCE_CACHE", {})  # a new process: only the disk remembers
    monkeypatch.setattr(probes, "pca_embedding", lambda *a, **k: pytest.fail("recomputed a cached reference"))
    assert RepresentationProbe(sets, cache_dir=tmp_path).references == first
    assert cached.stat().st_size > 0


@pytest.mark.slow
def test_scvi_reference_is_scored_beside_pca(shared_data):
    pytest.importorskip("scvi")
    probe = RepresentationProbe(
        [ProbeSet(name="cellbench", dataset="cellbench_3cl", batch_key="batch", max_cells=200)], scvi=True
    )
    scvi = probe.references["cellbench"]["scvi"]
    assert scvi["knn_accuracy"] > 0.9 and 0 < scvi["batch_score"] <= 1


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
    from sc_foundation.models.export import load_pretrained

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
    """The recipe's objectives on pbmc68k_reduced for a few epochs: the probe's kNN accuracy of the cell types rises
    above the untrained model's, and the scores land in the CSV log and in the export's model card."""
    from sc_foundation.training import pretrain
    from tests.test_train import compose_pretrain

    cfg = compose_pretrain(
        [
            "experiment=cpu_pretrain",
            "data.datasets=[pbmc68k_reduced]",
            f"paths.cache={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'run'}",
            "data.build_workers=1",
            "data.panel.n_top_genes=300",
            "data.tokenizer.context_length=64",
            "data.tokenizer.truncation=random",
            "data.loader.batch_size=32",
            "trainer.max_steps=80",
            "trainer.val_check_interval=40",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "optim.warmup_steps=5",
            "probes.sets=[{name: pbmc68k, dataset: pbmc68k_reduced, max_cells: 700}]",
        ]
    )
    result = pretrain.run(cfg)
    history = result["probes"].history
    assert [h["step"] for h in history] == [40, 80]
    # The untrained model of the same seed, probed the same way, is the floor the run must rise from.
    torch.manual_seed(cfg.seed)
    untrained = pretrain.build_model(cfg, result["datamodule"].store)
    untrained.gene_tokenizer = result["datamodule"].store.tokenizer
    probe = RepresentationProbe(result["probes"].probe_sets, **result["probes"].settings)
    start = probe.evaluate(untrained)["pbmc68k"]["ours"]["knn_accuracy"]
    end = history[-1]["results"]["pbmc68k"]["ours"]["knn_accuracy"]
    assert end > start + 0.05, (start, end)
    metrics = pd.read_csv(next((tmp_path / "run").rglob("metrics.csv")))
    assert metrics["probe/pbmc68k/knn_accuracy"].dropna().iloc[-1] == pytest.approx(end)
    export = result["export"]
    card = (export / "README.md").read_text()
    assert "| pbmc68k |" in card and "Representation probes" in card
    assert json.loads((export / "metrics.json").read_text())["probes"]["pbmc68k"]["ours"]["knn_accuracy"] == end


@pytest.mark.slow
def test_the_batch_robust_switches_raise_the_batch_score_of_a_short_run(tmp_path, shared_data):
    """CellBench alone, its two protocols as the corpus batches (data.batch_column=batch): the same short run with the
    adversary and the batch-conditioned decoder on mixes the protocols better in the probe than with them off. The
    best probe round is exported when asked."""
    off = short_cellbench_run(tmp_path, "off", "data.batch_column=batch")
    on = short_cellbench_run(
        tmp_path,
        "on",
        "data.batch_column=batch",
        "model.adversarial_batch_weight=1.0",
        "model.reconstruction_batch_conditioned=true",
    )
    assert on["batch_score"] > off["batch_score"], (on, off)


@pytest.mark.slow
def test_technical_views_make_a_short_runs_embedding_blind_to_depth(tmp_path, shared_data):
    """The same short CellBench run with each contrastive view thinned to 20-100% of the cell's molecules, no batch
    told: a cell read at a quarter of its molecules lands nearer its full-depth self, relative to how far apart the
    cell lines lie, than without the thinned views (60 steps: 0.587 against 0.618 when written; on the whole corpus
    at 1,500 steps 0.409 against 0.543, BENCHMARKS.md)."""
    import anndata
    import scipy.sparse as sp

    cells = anndata.read_h5ad(shared_data / "cellbench_3cl" / "cellbench_3cl.h5ad")
    counts = sp.csr_matrix(cells.X).astype(np.int64)
    counts.data = np.random.default_rng(0).binomial(counts.data, 0.25)
    thinned = anndata.AnnData(counts, obs=cells.obs, var=cells.var)
    lines = cells.obs["cell_type"].astype(str).to_numpy()

    def depth_shift(name: str, *switches: str) -> float:
        """Mean distance of a cell to its thinned self over the mean distance between cell-line centroids."""
        short_cellbench_run(tmp_path, name, *switches)
        export = tmp_path / name / "export" / "final"
        full, thin = (embed(a, export, copy=True, progress=False).obsm["X_sc_foundation"] for a in (cells, thinned))
        centroids = np.stack([full[lines == line].mean(0) for line in np.unique(lines)])
        between = np.mean([np.linalg.norm(a - b) for i, a in enumerate(centroids) for b in centroids[i + 1 :]])
        return float(np.linalg.norm(full - thin, axis=1).mean() / between)

    off = depth_shift("off")
    on = depth_shift("on", "data.loader.view_depth=[0.2,1.0]")
    assert on < off, (on, off)


def short_cellbench_run(tmp_path, name: str, *switches: str) -> dict:
    """``experiment=cpu_pretrain`` on CellBench alone for 60 steps with ``switches``; its last probe round's scores of
    CellBench (our embedding). The best probe round is exported too (``probes.select_best``)."""
    from sc_foundation.training import pretrain
    from tests.test_train import compose_pretrain

    cfg = compose_pretrain(
        [
            "experiment=cpu_pretrain",
            "data.datasets=[cellbench_3cl]",
            f"paths.cache={tmp_path / 'cache'}",
            f"output_dir={tmp_path / name}",
            "data.build_workers=1",
            "data.panel.n_top_genes=500",
            "data.tokenizer.min_match_rate=0.01",  # 500 panel genes of CellBench's 28,000
            "data.tokenizer.context_length=64",
            "data.loader.batch_size=32",
            "trainer.max_steps=60",
            "trainer.val_check_interval=30",
            "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "optim.warmup_steps=5",
            "probes.select_best=true",
            "probes.sets=[{name: cellbench, dataset: cellbench_3cl, batch_key: batch, max_cells: 499}]",
            *switches,
        ]
    )
    result = pretrain.run(cfg)
    assert (result["best_probe_export"] / "config.json").is_file()
    return result["probes"].history[-1]["results"]["cellbench"]["ours"]
