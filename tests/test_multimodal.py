"""finetune.py task=multimodal on real paired cells (ECCITE-seq RNA + protein, SNARE-seq RNA + ATAC), and
sc_foundation.predict_modality."""

import json

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from sc_foundation import load_pretrained, predict_modality, tasks
from sc_foundation.data.io import InvalidInputError
from sc_foundation.models.modeling import ScFoundationForMultimodal
from sc_foundation.tasks.modalities import normalise_modality, prediction_metrics
from tests.test_finetune import compose_finetune, overrides

ECCITE_RNA, ECCITE_ADT = "eccite_pbmc/eccite_rna.h5ad", "eccite_pbmc/eccite_adt.h5ad"
SNARE_RNA, SNARE_ATAC = "snare_mop/snare_mop_rna.h5ad", "snare_mop/snare_mop_atac.h5ad"
SHORT = ("trainer.max_epochs=2", "baselines.n_top_genes=500")


def multimodal_overrides(pretrained, rna, other, out, kind, *extra):
    files = f"[{rna}]"
    return overrides(
        pretrained, files, out, "task=multimodal", f"modality.kind={kind}", f"modality.files=[{other}]", *SHORT, *extra
    )


@pytest.fixture(scope="module")
def protein(pretrained, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("protein")
    cfg = compose_finetune(
        multimodal_overrides(pretrained, shared_data / ECCITE_RNA, shared_data / ECCITE_ADT, out, "protein")
    )
    return tasks.run(cfg)


@pytest.fixture(scope="module")
def snare_slice(real_slice, tmp_path_factory):
    """600 SNARE-seq cells (every 17th), RNA and ATAC files with the same cells."""
    rows = np.arange(0, 10309, 17)[:600]
    folder = tmp_path_factory.mktemp("snare")
    paths = []
    for name in (SNARE_RNA, SNARE_ATAC):
        path = folder / name.split("/")[1]
        real_slice(name, rows).write_h5ad(path)
        paths.append(path)
    return paths


def test_normalisation_and_metrics():
    counts = np.array([[0.0, 3.0, 7.0], [2.0, 0.0, 0.0]])
    clr = normalise_modality(counts, "protein")
    np.testing.assert_allclose(clr.sum(1), 0.0, atol=1e-6)  # centred within each cell
    np.testing.assert_allclose(clr[0, 2] - clr[0, 1], np.log(8 / 4), rtol=1e-6)
    np.testing.assert_array_equal(normalise_modality(counts, "atac"), counts > 0)
    true = np.array([[1.0, 2.0], [2.0, 1.0], [3.0, 5.0]])
    scores = prediction_metrics(true, 2 * true + 1, ["a", "b"])
    assert scores["pearson_feature_mean"] == pytest.approx(1.0) and scores["pearson_cell_mean"] == pytest.approx(1.0)
    flat = prediction_metrics(true, np.ones_like(true), ["a", "b"])  # a constant prediction has no correlation
    assert flat["n_features_scored"] == 0 and np.isnan(flat["per_feature"]["a"])


def test_predicts_protein_from_rna(protein):
    out, metrics = protein["output_dir"], protein["metrics"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["modality"] == "protein" and metrics["features"] == 49 and "embedding" not in metrics
    for name, scores in {"model": metrics["prediction"]["model"], **metrics["prediction"]["baselines"]}.items():
        assert scores["n_cells"] == metrics["n_cells"]["test"] and scores["n_features_scored"] > 40, name
        assert -1 <= scores["pearson_feature_mean"] <= 1 and -1 <= scores["pearson_cell_mean"] <= 1, name
    # Per cell, the CLR profile (which antibodies a cell shows most) is largely shared: both must get it.
    assert metrics["prediction"]["baselines"]["ridge_rna_pca"]["pearson_cell_mean"] > 0.5
    assert metrics["prediction"]["model"]["pearson_cell_mean"] > 0.5


def test_protein_loss_weighs_every_antibody_alike(protein):
    """The exported protein head divides each antibody's error by its training spread: the loss is the mean squared
    standardised error, so scaling one antibody's values and its scale together leaves the loss unchanged."""
    model = load_pretrained(protein["export"], device="cpu")
    scale = np.asarray(model.config.modality_feature_scale)
    assert scale.shape == (49,) and (scale > 0).all()
    batch = next(iter(protein["datamodule"].test_dataloader()))
    with torch.no_grad():
        output = model(batch["input_ids"], batch["values"], batch["attention_mask"], batch["modality_values"])
    target = batch["modality_values"].float()
    expected = (((output.predictions - target) / torch.tensor(scale, dtype=torch.float32)) ** 2).mean()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(StrictDataclassError, match="modality_feature_scale"):
        type(model.config)(**{**model.config.to_dict(), "modality_feature_scale": [1.0] * 3})


def test_predict_modality_api(protein, pretrained, real_slice):
    model = load_pretrained(protein["export"], device="cpu")
    assert isinstance(model, ScFoundationForMultimodal) and model.config.modality == "protein"
    cells = real_slice(ECCITE_RNA, np.arange(0, 500, 4))
    predicted = predict_modality(cells, model)
    assert predicted.shape == (cells.n_obs, 49) and list(predicted.obs_names) == list(cells.obs_names)
    assert list(predicted.var_names) == model.config.modality_features
    assert np.isfinite(predicted.X).all() and predicted.uns["sc_foundation"]["match_rate"] > 0.5
    assert "sc_foundation" not in cells.uns  # the input is left as it was
    np.testing.assert_array_equal(predict_modality(cells, model).X, predicted.X)
    alone = predict_modality(cells[7:9].copy(), model, batch_size=1)
    np.testing.assert_allclose(alone.X, predicted.X[7:9], rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="predict_modality needs a ScFoundationForMultimodal"):
        predict_modality(cells, pretrained)  # a pretraining export has no modality head


def test_atac_joint_embedding_is_scored_on_cell_types(pretrained, snare_slice, tmp_path):
    rna, atac = snare_slice
    extra = ("label_key=cell_type", "modality.n_features=500")
    result = tasks.run(compose_finetune(multimodal_overrides(pretrained, rna, atac, tmp_path, "atac", *extra)))
    metrics = result["metrics"]
    assert metrics["features"] == 500 and result["values"].max() == 1.0
    embedding = metrics["embedding"]
    assert set(embedding["model"]) == {"joint", "rna_only"}
    assert set(embedding["baselines"]) == {"rna_pca", "rna_modality_pca"}
    for group in ("model", "baselines"):
        for name, scores in embedding[group].items():
            assert all(np.isfinite(v) for v in scores.values()), (name, scores)
            assert 0 <= scores["nmi"] <= 1 and 0 <= scores["avg_bio"] <= 1, (name, scores)
    saved = np.load(tmp_path / "embeddings.npz")
    assert saved["joint"].shape == saved["rna_only"].shape == (600, 32)
    assert not np.allclose(saved["joint"], saved["rna_only"])


def test_missing_or_mismatched_modality_is_refused(pretrained, shared_data, real_slice, tmp_path):
    rna = shared_data / ECCITE_RNA
    cfg = compose_finetune(
        overrides(
            pretrained, f"[{rna}]", tmp_path / "a", "task=multimodal", "modality.kind=protein", "modality.files=[]"
        )
    )
    with pytest.raises(ValueError, match=r"modality.files needs one protein file per RNA file in data.files \(1\)"):
        tasks.run(cfg)
    partial = tmp_path / "adt_first_100.h5ad"
    real_slice(ECCITE_ADT, 100).write_h5ad(partial)  # the protein of 100 of the 500 cells
    cfg = compose_finetune(multimodal_overrides(pretrained, rna, partial, tmp_path / "b", "protein"))
    with pytest.raises(InvalidInputError, match=r"adt_first_100.h5ad: 400 of 500 RNA cells have no row here, e.g."):
        tasks.run(cfg)
    cfg = compose_finetune(multimodal_overrides(pretrained, rna, rna, tmp_path / "c", "rna"))
    with pytest.raises(ValueError, match="modality kind must be one of"):
        tasks.run(cfg)
