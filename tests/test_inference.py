"""Notebook inference on real cells with a tiny untrained export: embed, annotate, transfer_labels."""

import anndata
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch

from sc_foundation import GeneMatchError, InvalidInputError, annotate, embed, load_pretrained, transfer_labels
from sc_foundation.data.tokenization import GeneTokenizer
from sc_foundation.models.export import export_pretrained
from sc_foundation.models.modeling import ScFoundationForCellClassification
from sc_foundation.models.novelty import NoveltyReference, backbone_with_weights

from .conftest import CELLBENCH

KEY = "X_sc_foundation"
ROWS = np.arange(0, 499, 2)[:200]  # both protocols, all three cell lines


@pytest.fixture
def cells(real_slice):
    """200 cellbench cells, raw counts in X; a fresh copy for every test, which may write to it."""
    return real_slice(CELLBENCH, ROWS)


@pytest.fixture(scope="module")
def model(pretrained):
    return load_pretrained(pretrained, device="cpu")


@pytest.fixture(scope="module")
def embedded(real_slice, model):
    """(n_obs, h) embedding of ``cells``."""
    return embed(real_slice(CELLBENCH, ROWS), model, copy=True).obsm[KEY]


@pytest.fixture(scope="module")
def classifier(pretrained, tmp_path_factory):
    """The pretrained export with a fresh three-class head, exported and loaded back."""
    names = ["H1975", "H2228", "HCC827"]
    head = ScFoundationForCellClassification.from_pretrained(
        pretrained,
        new_heads=["classifier"],
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    path = export_pretrained(head, GeneTokenizer.from_pretrained(pretrained), tmp_path_factory.mktemp("cls") / "m")
    return load_pretrained(path, device="cpu")


def test_embed_is_deterministic_and_independent_of_other_cells(cells, model, embedded):
    assert embedded.shape == (cells.n_obs, model.config.hidden_size) and embedded.dtype == np.float32
    assert np.isfinite(embedded).all()
    np.testing.assert_array_equal(embed(cells, model, copy=True).obsm[KEY], embedded)
    subset = np.arange(3, cells.n_obs, 7)  # other batch neighbours, other batch widths
    alone = embed(cells[subset].copy(), model, batch_size=5, copy=True).obsm[KEY]
    np.testing.assert_allclose(alone, embedded[subset], atol=1e-5)


def test_gene_order_does_not_matter(cells, model, embedded):
    order = np.random.default_rng(0).permutation(cells.n_vars)
    shuffled = embed(cells[:, order].copy(), model, copy=True).obsm[KEY]
    np.testing.assert_allclose(shuffled, embedded, atol=1e-5)


def test_model_as_path_or_object_and_copy(cells, pretrained):
    before = cells.copy()
    result = embed(cells, pretrained, copy=True)  # both on the default device: CUDA (bf16) where there is one
    assert result is not cells and KEY not in cells.obsm and "sc_foundation" not in cells.uns
    assert (cells.X != before.X).nnz == 0 and cells.obs.equals(before.obs)
    np.testing.assert_allclose(result.obsm[KEY], embed(cells, load_pretrained(pretrained), copy=True).obsm[KEY])
    assert embed(cells, pretrained) is None and KEY in cells.obsm  # in place by default


def test_unknown_genes_report_match_rate(cells, model):
    fake = anndata.AnnData(
        sp.csr_matrix(np.ones((cells.n_obs, 500), dtype=np.float32)),
        obs=cells.obs,
        var={"gene": [f"FAKEGENE{i}" for i in range(500)]},
    )
    fake.var_names = fake.var["gene"]
    mixed = anndata.concat([cells, fake], axis=1, merge="first")
    embed(mixed, model)
    info = mixed.uns["sc_foundation"]
    assert 0.5 < info["match_rate"] < 1.0
    assert "FAKEGENE" in info["match_summary"]


def test_refuses_normalised_counts_and_foreign_genes(cells, model):
    normalised = cells.copy()
    normalised.layers["counts"] = normalised.X.copy()
    sc.pp.normalize_total(normalised)
    sc.pp.log1p(normalised)
    with pytest.raises(InvalidInputError, match="layer='counts'"):
        embed(normalised, model)
    embed(normalised, model, layer="counts")  # the fix the message names works

    foreign = cells.copy()
    foreign.var_names = [f"NOTAGENE{i}" for i in range(foreign.n_vars)]
    with pytest.raises(GeneMatchError):
        embed(foreign, model)


def test_cells_without_matched_counts_get_nan_rows(cells, model, embedded):
    counts = cells.X.tolil()
    counts[[0, 5]] = 0
    emptied = cells.copy()
    emptied.X = counts.tocsr()
    with pytest.warns(UserWarning, match="2 of 200 cells"):
        embed(emptied, model)
    result = emptied.obsm[KEY]
    assert np.isnan(result[[0, 5]]).all()
    np.testing.assert_allclose(np.delete(result, [0, 5], axis=0), np.delete(embedded, [0, 5], axis=0), atol=1e-5)


def test_neighbors_run_on_the_embedding(cells, model):
    embed(cells, model)
    sc.pp.neighbors(cells, use_rep=KEY, n_neighbors=10)
    assert cells.obsp["connectivities"].shape == (cells.n_obs, cells.n_obs)


def test_annotate(cells, classifier, model):
    annotate(cells, classifier)
    labels = cells.obs["sc_foundation_label"]
    assert set(labels.cat.categories) == {"H1975", "H2228", "HCC827", "unknown"}
    assert labels.notna().all() and (labels != "unknown").all()
    probability = cells.obs["sc_foundation_probability"].to_numpy()
    assert ((probability >= 1 / 3) & (probability <= 1)).all()
    assert cells.obsm["X_sc_foundation"].shape == (cells.n_obs, classifier.config.hidden_size)

    annotate(cells, classifier, unknown_threshold=1.0, key_added="strict")
    assert (cells.obs["strict_label"] == "unknown").all()
    with pytest.raises(TypeError, match="ScFoundationForCellClassification"):
        annotate(cells, model)


def test_annotate_refuses_novel_cells(cells, classifier):
    """The export's novelty reference (here the first 100 cells, the threshold at the other cells' median distance)
    scores every cell, and ``refuse_novel`` labels unknown exactly the cells beyond the threshold."""
    assert (
        classifier.novelty_reference is None
        and "sc_foundation_novelty" not in annotate(cells, classifier, copy=True).obs
    )
    with pytest.raises(ValueError, match="needs the novelty reference"):
        annotate(cells, classifier, refuse_novel=True)
    embedding = embed(cells, classifier, copy=True).obsm[KEY]
    first = NoveltyReference(embedding[:100], 3, np.inf, 0.5)
    threshold = float(np.median(first.scores(embedding[100:])))
    classifier.novelty_reference = NoveltyReference(embedding[:100], 3, threshold, 0.5)
    try:
        annotate(cells, classifier, refuse_novel=True)
    finally:
        classifier.novelty_reference = None
    novelty = cells.obs["sc_foundation_novelty"].to_numpy()
    assert novelty == pytest.approx(first.scores(embedding), abs=1e-4)
    refused = (cells.obs["sc_foundation_label"] == "unknown").to_numpy()
    assert np.array_equal(refused, novelty > threshold) and refused[100:].sum() == 50  # above the median
    assert cells.uns["sc_foundation"]["novelty_threshold"] == threshold


def test_annotate_measures_novelty_in_the_embedding_of_the_reference_s_own_backbone(cells, classifier):
    """A reference fitted in the pretrained embedding carries that backbone's weights: annotate reads the cells a
    second time with them, so the novelty is the distance in that embedding, not in the classifier's (here another
    backbone: the classifier's weights, perturbed)."""
    rng = np.random.default_rng(0)
    state = {
        name: (t.numpy() + rng.normal(0, 0.5, t.shape).astype(np.float32)) if t.is_floating_point() else t.numpy()
        for name, t in classifier.base_model.state_dict().items()
    }
    own_space = embed(cells, classifier, copy=True).obsm[KEY]
    other_space = embed(cells, backbone_with_weights(classifier, state, "the classifier's backbone"), copy=True).obsm[
        KEY
    ]
    assert not np.allclose(own_space, other_space, atol=1e-2)
    reference = NoveltyReference(other_space[:100], 3, 1.0, 0.5, state)
    classifier.novelty_reference = reference
    try:
        annotated = annotate(cells, classifier, copy=True)
    finally:
        classifier.novelty_reference = None
    assert annotated.obs["sc_foundation_novelty"].to_numpy() == pytest.approx(reference.scores(other_space), abs=1e-4)
    assert annotated.uns["sc_foundation"]["novelty_space"] == "pretrained"
    np.testing.assert_allclose(annotated.obsm[KEY], own_space, atol=1e-5)  # the labels' embedding is still its own
    assert annotated.uns["sc_foundation"]["match_rate"] > 0.5  # the classifier's gene match, kept


def test_transfer_labels_recovers_cell_lines(cells):
    """Across protocols, on a constructed embedding (PCA of log-normalised counts): an untrained tiny model does not
    separate the cell lines, so this tests the transfer, not the model."""
    cells = cells.copy()
    sc.pp.normalize_total(cells)
    sc.pp.log1p(cells)
    sc.pp.pca(cells, n_comps=10, key_added=KEY)
    batches = cells.obs["batch"].astype(str).to_numpy()
    reference, query = cells[batches == batches[0]].copy(), cells[batches != batches[0]].copy()
    transfer_labels(reference, query, label_key="cell_type")
    predicted = query.obs["cell_type_transferred"].astype(str).to_numpy()
    accuracy = np.mean(predicted == query.obs["cell_type"].astype(str).to_numpy())
    assert accuracy > 0.9, accuracy
    share = query.obs["cell_type_transferred_probability"].to_numpy()
    assert ((share > 0) & (share <= 1)).all()


def test_transfer_labels_refuses_missing_inputs(cells):
    reference = cells.copy()
    reference.obsm[KEY] = np.zeros((cells.n_obs, 4), dtype=np.float32)
    with pytest.raises(KeyError, match="embed"):
        transfer_labels(reference, cells.copy(), label_key="cell_type")
    with pytest.raises(KeyError, match="no obs\\['celltype'\\]"):
        transfer_labels(reference, reference.copy(), label_key="celltype")


def test_cpu_inference_is_fp32_by_default_and_bf16_stays_close(cells, model, embedded):
    """auto is fp32 on every CPU (batch-independent); bf16, asked for, stays within cosine 0.999 of it."""
    fp32 = embed(cells, model, copy=True)
    assert fp32.uns["sc_foundation"]["precision"] == "fp32"
    np.testing.assert_array_equal(fp32.obsm[KEY], embedded)
    fast = embed(cells, model, copy=True, precision="bf16")
    assert fast.uns["sc_foundation"]["precision"] == "bf16"
    bf16, exact = fast.obsm[KEY], fp32.obsm[KEY]
    assert not np.array_equal(bf16, exact), "bf16 really ran"
    cosine = (bf16 * exact).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(exact, axis=1)
    assert cosine.min() >= 0.999, cosine.min()
    with pytest.raises(ValueError, match="precision must be one of"):
        embed(cells, model, precision="fp16")


def test_inference_batches_are_planned_within_a_memory_budget(cells, model, embedded, monkeypatch):
    """The token limit comes from a fake-tensor forward at the full context and shrinks with the budget; under a
    budget that admits a few cells per batch, every batch stays within it and the embedding is unchanged."""
    from sc_foundation import inference
    from sc_foundation.data.tokenization import pad_cells
    from sc_foundation.training.memory import inference_token_limit, trace_inference

    tokenizer = model.gene_tokenizer
    one = {k: torch.from_numpy(v) for k, v in pad_cells([(np.array([5, 6, 7]), None)], tokenizer.vocab.pad_id).items()}
    length = tokenizer.config.context_length
    assert trace_inference(model.base_model, one, bf16=False) > 0
    large, small = (inference_token_limit(model.base_model, one, length, False, budget=b) for b in (2**30, 2**24))
    assert large > 32 * small  # proportional to the budget
    seen = []
    batches = inference._padded_batches

    def recording(cells_, pad_id, batch_size, token_limit=None):
        for rows, batch in batches(cells_, pad_id, batch_size, token_limit):
            seen.append((token_limit, *batch["input_ids"].shape))
            yield rows, batch

    monkeypatch.setattr(inference, "_padded_batches", recording)
    monkeypatch.setattr(inference, "_memory_budget", lambda: 2**19)
    planned = embed(cells, model, copy=True).obsm[KEY]
    np.testing.assert_array_equal(planned, embedded)  # batch composition never changes a cell's embedding
    limit = seen[0][0]
    assert limit == inference_token_limit(model.base_model, one, length, False, budget=2**19)
    assert len(seen) > 2 * -(-cells.n_obs // 64), "the budget split the default batches of 64 cells"
    # padded to a multiple of 8: at most 7 tokens per cell beyond the longest cell that the limit counts
    assert all(n == 1 or n * (padded - 7) <= limit for _, n, padded in seen)
