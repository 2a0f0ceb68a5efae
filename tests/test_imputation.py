"""Imputation: the scVI protocol's pieces, finetune.py task=imputation on real cells, and sc_foundation.impute."""

import json

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from sc_foundation import impute, load_pretrained, tasks
from sc_foundation.models.modeling import ScFoundationForImputation
from sc_foundation.tasks.imputation_protocol import (
    gene_mean_shares,
    hide_entries,
    imputation_metrics,
    knn_smoothing_shares,
)
from tests.conftest import CELLBENCH
from tests.test_finetune import compose_finetune, overrides

LAYER = "sc_foundation_imputed"


@pytest.fixture(scope="module")
def imputation(pretrained, cellbench, tmp_path_factory):
    out = tmp_path_factory.mktemp("imputation")
    extra = ("task=imputation", "decoder_genes=500", "trainer.max_epochs=2")
    extra += ("baselines.scvi=false",)  # scVI has its own tests (tests/test_scvi_baselines.py); it takes minutes here
    return tasks.run(compose_finetune(overrides(pretrained, f"[{cellbench}]", out, *extra)))


def test_hide_entries_hides_a_seeded_tenth_of_the_non_zero_counts():
    rng = np.random.default_rng(0)
    counts = sp.random(300, 200, density=0.2, format="csr", random_state=1, data_rvs=lambda n: rng.integers(1, 9, n))
    corrupted, hidden = hide_entries(counts, 0.1, seed=3)
    assert abs(len(hidden["value"]) / counts.nnz - 0.1) < 0.02
    assert corrupted.nnz + len(hidden["value"]) == counts.nnz
    restored = corrupted + sp.csr_matrix((hidden["value"], (hidden["row"], hidden["col"])), shape=counts.shape)
    assert (restored != counts).nnz == 0  # every hidden entry was a non-zero count, and nothing else changed
    again, hidden_again = hide_entries(counts, 0.1, seed=3)
    assert (again != corrupted).nnz == 0 and np.array_equal(hidden_again["row"], hidden["row"])
    _, other = hide_entries(counts, 0.1, seed=4)
    assert not np.array_equal(other["row"], hidden["row"])


def test_imputation_metrics_score_what_they_claim():
    true = np.array([1.0, 2.0, 3.0, 10.0])
    assert imputation_metrics(true, true) == pytest.approx(
        {"median_l1": 0.0, "mean_l1": 0.0, "pearson": 1.0, "pearson_log1p": 1.0, "n_entries": 4}
    )
    scores = imputation_metrics(true, true + np.array([1.0, -1.0, 3.0, 0.0]))
    assert scores["median_l1"] == 1.0 and scores["mean_l1"] == 1.25
    with pytest.raises(ValueError, match="finite"):
        imputation_metrics(true, np.array([1.0, np.nan, 2.0, 3.0]))


def test_baseline_shares_are_distributions():
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, size=(60, 30)).astype(np.float32))
    for shares in (knn_smoothing_shares(counts, n_pcs=5), gene_mean_shares(counts)):
        assert shares.shape == (60, 30)
        np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-5)


def test_imputes_cellbench_and_scores_the_hidden_entries(imputation):
    out, metrics = imputation["output_dir"], imputation["metrics"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["panel_genes"] == 500 and metrics["n_cells"]["all"] == 499
    hidden = metrics["n_hidden_entries"]
    assert 0 < hidden["scored"] <= hidden["panel"] < hidden["all_genes"]
    assert set(metrics["baselines"]) == {"knn_smoothing", "gene_mean"} and "scvi" in metrics["skipped_baselines"]
    for name, scores in {"model": metrics["model"], **metrics["baselines"]}.items():
        assert scores["n_entries"] == hidden["scored"], name
        assert scores["median_l1"] >= 0 and -1 <= scores["pearson"] <= 1, (name, scores)
    # Cells differ: smoothing over similar cells must beat one profile for all, or the protocol is broken.
    assert metrics["baselines"]["knn_smoothing"]["pearson"] > metrics["baselines"]["gene_mean"]["pearson"]
    imputed = anndata.read_h5ad(out / "imputed.h5ad")
    assert imputed.shape == (499, 500) and imputed.layers[LAYER].shape == imputed.shape
    assert imputed.var[LAYER].all()


def test_impute_api_on_real_cells(imputation, real_slice):
    model = load_pretrained(imputation["export"], device="cpu")
    assert isinstance(model, ScFoundationForImputation) and len(model.config.decoder_gene_ids) == 500
    cells = real_slice(CELLBENCH, np.arange(0, 499, 5))
    result = impute(cells, model, copy=True)
    assert LAYER not in cells.layers
    layer = result.layers[LAYER].toarray()
    imputed_genes = result.var[LAYER].to_numpy()
    assert layer.shape == cells.shape and np.isfinite(layer).all() and (layer >= 0).all()
    assert 0 < imputed_genes.sum() <= 500
    observed = cells.X.toarray()
    np.testing.assert_array_equal(layer[:, ~imputed_genes], observed[:, ~imputed_genes])  # the rest as observed
    # The imputed genes keep each cell's total over them: the decoder redistributes counts, it does not invent them.
    np.testing.assert_allclose(layer[:, imputed_genes].sum(1), observed[:, imputed_genes].sum(1), rtol=1e-4)
    # Deterministic, and independent of gene order.
    np.testing.assert_array_equal(impute(cells, model, copy=True).layers[LAYER].toarray(), layer)
    order = np.random.default_rng(0).permutation(cells.n_vars)
    shuffled = impute(cells[:, order].copy(), model, copy=True)
    np.testing.assert_allclose(shuffled.layers[LAYER].toarray(), layer[:, order], rtol=1e-5, atol=1e-5)


def test_impute_refuses_a_model_without_a_decoder(pretrained, real_slice):
    with pytest.raises(TypeError, match="impute needs a model with an expression decoder"):
        impute(real_slice(CELLBENCH, 20), pretrained)
