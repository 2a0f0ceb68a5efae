"""Published checkpoints: scGPT and Geneformer stand-ins in their exact published layouts load through
``load_pretrained`` and match the reference forward passes to 1e-5 in fp32, tokenize as the sources do on real
cells, load strictly and refuse code hidden in their files."""

import dataclasses
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sc_foundation
from sc_foundation.data.tokenization import cell_keys, pad_cells
from sc_foundation.models.convert import ConversionError, convert, load_gene_dictionary, main
from sc_foundation.models.modeling import ScFoundationForMaskedGeneModeling, ScFoundationModel
from tests import published as stand_ins
from tests.conftest import CELLBENCH

TOLERANCE = 1e-5  # max abs difference, fp32
PBMC68K = "pbmc68k_reduced/pbmc68k_reduced_counts.h5ad"


def tokenize(model, adata, gene_names=None):
    """The model's tokenizer on raw counts: the padded batch (tensors) and the tokenized cells."""
    tokenizer = model.gene_tokenizer
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    match = tokenizer.match_genes(list(adata.var_names if gene_names is None else gene_names))
    cells = tokenizer.encode(counts, match, cell_keys(adata.obs_names))
    batch = pad_cells([cells.cell(i) for i in range(len(cells))], tokenizer.vocab.pad_id)
    return {name: torch.from_numpy(array) for name, array in batch.items()}, cells


def max_difference(ours: torch.Tensor, theirs: torch.Tensor, real: torch.Tensor) -> float:
    """Max abs difference at the real tokens, (B, L, h) each with a (B, L) mask."""
    return float((ours[real] - theirs[real]).abs().max())


# ------------------------------------------------------------------------------------------------ scGPT
@pytest.mark.parametrize("naming", ["Wqkv", "in_proj"])
def test_scgpt_matches_its_reference_on_real_cells(naming, published, real_slice, tmp_path):
    folder = tmp_path / naming
    genes = json.loads((published["scgpt"][0] / "vocab.json").read_text())
    reference = stand_ins.write_scgpt_folder(folder, list(genes)[:-3], attention_naming=naming, seed=3)
    model = sc_foundation.load_pretrained(folder, device="cpu")
    assert isinstance(model, ScFoundationModel) and model.config.norm_placement == "post"
    adata = real_slice("pbmc3k/pbmc3k.h5ad", np.arange(0, 2700, 225))
    batch, _ = tokenize(model, adata)
    real = batch["attention_mask"]
    with torch.no_grad():
        ours = model(**batch, output_hidden_states=True)
        theirs = reference(batch["input_ids"], batch["values"], ~real)
    assert len(ours.hidden_states) == len(theirs) == 3
    for layer, (a, b) in enumerate(zip(ours.hidden_states, theirs, strict=True)):
        assert max_difference(a, b, real) <= TOLERANCE, layer
    cls = torch.nn.functional.normalize(theirs[-1][:, 0], dim=-1)  # scGPT's embed_data: <cls> of the last layer
    assert float((ours.cell_embedding - cls).abs().max()) <= TOLERANCE


def scgpt_bin_bounds(values: np.ndarray, n_bins: int = 51) -> tuple[np.ndarray, np.ndarray]:
    """scGPT's ``binning`` of a cell's non-zero values, by hand: the lowest and highest bin its ``_digitize``
    (random among the bins a value equal to edges borders) can give each value."""
    edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
    left, right = np.digitize(values, edges), np.digitize(values, edges, right=True)
    return np.where(left > right, right + 1, left), left


def test_scgpt_tokenizes_like_scgpt(published, real_slice):
    folder, _ = published["scgpt"]
    model = sc_foundation.load_pretrained(folder, device="cpu")
    vocab = json.loads((folder / "vocab.json").read_text())
    adata = real_slice("pbmc3k/pbmc3k.h5ad", np.arange(5, 2700, 300))
    _, cells = tokenize(model, adata)
    counts = sp.csr_matrix(adata.X)
    in_vocab = np.array([name in vocab for name in adata.var_names])
    for i in range(len(cells)):
        ids, values = cells.cell(i)
        assert ids[0] == vocab["<cls>"] and values[0] == -2  # scGPT: <cls> first, valued pad_value
        row = counts[cells.rows[i]].toarray().ravel()
        expressed = np.flatnonzero((row > 0) & in_vocab)
        assert len(ids) == min(len(expressed), 1199) + 1  # max_seq_len 1200 tokens, <cls> included
        by_gene = dict(zip(adata.var_names[expressed].map(vocab), row[expressed], strict=True))
        low, high = scgpt_bin_bounds(row[expressed])
        bounds = dict(zip(adata.var_names[expressed].map(vocab), zip(low, high, strict=True), strict=True))
        assert set(ids[1:].tolist()) <= set(by_gene)
        for gene, value in zip(ids[1:].tolist(), values[1:].tolist(), strict=True):
            assert bounds[gene][0] <= value <= bounds[gene][1], (gene, value, bounds[gene])


def test_scgpt_matches_genes_by_ensembl_id_too(published, real_slice):
    """pbmc3k's Ensembl ids (var gene_ids) reach its own symbols (the stand-in's vocabulary) through our GENCODE v44
    resolution. pbmc3k is annotated on hg19, so symbols renamed since (GNB2L1, now RACK1) cannot be reached: about
    a tenth of a cell's genes."""
    model = sc_foundation.load_pretrained(published["scgpt"][0], device="cpu")
    adata = real_slice("pbmc3k/pbmc3k.h5ad", 20)
    _, by_symbol = tokenize(model, adata)
    _, by_ensembl = tokenize(model, adata, gene_names=adata.var["gene_ids"])
    found = [
        len(set(by_ensembl.cell(i)[0]) & set(by_symbol.cell(i)[0])) / len(by_symbol.cell(i)[0])
        for i in range(len(by_symbol))
    ]
    assert min(found) > 0.85, found


def test_scgpt_embed_gives_its_convention_and_overrides_choose_another(published, real_slice):
    folder, _ = published["scgpt"]
    adata = real_slice("pbmc3k/pbmc3k.h5ad", 16)
    sc_foundation.embed(adata, sc_foundation.load_pretrained(folder, device="cpu"))
    norms = np.linalg.norm(adata.obsm["X_sc_foundation"], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    mean_model = sc_foundation.load_pretrained(folder, device="cpu", pooling="mean", normalize_cell_embedding=False)
    sc_foundation.embed(adata, mean_model, key_added="X_mean")
    batch, _ = tokenize(mean_model, adata)
    with torch.no_grad():
        hidden = mean_model(**batch).last_hidden_state
    genes = batch["attention_mask"].clone()
    genes[:, 0] = False  # <cls>
    expected = (hidden * genes[..., None]).sum(1) / genes.sum(1, keepdim=True)
    np.testing.assert_allclose(adata.obsm["X_mean"], expected.numpy(), atol=TOLERANCE)


# ------------------------------------------------------------------------------------------- Geneformer
def geneformer_ranking(row: np.ndarray, genes: list[str], tokens: dict, medians: dict) -> dict[int, float]:
    """Geneformer's published tokenization of one cell, by hand, in float64: the genes with a median,
    counts / total * 10,000 / median; returns token id -> that value for the non-zero ones."""
    known = np.array([gene in medians for gene in genes])
    names = np.asarray(genes)[known]
    x = row[known].astype(np.float64) / row.sum() * 10_000 / np.array([medians[g] for g in names])
    nonzero = np.nonzero(x)[0]
    return {tokens[g]: value for g, value in zip(names[nonzero], x[nonzero], strict=True)}


@pytest.mark.parametrize("version", ["geneformer_v1", "geneformer_v2"])
def test_geneformer_token_ids_match_the_published_tokenization(version, published, real_slice):
    """Geneformer ranks by ``np.argsort(-x)`` and cuts to the context (V2: ``<cls>`` ... ``<eos>`` around). Genes
    whose values tie exactly (same count, same median) have no defined order there (an unstable sort over the
    file's gene order); ours keeps vocabulary order. So the value at every rank must be Geneformer's, to the bit."""
    folder, _, medians = published[version]
    tokens = load_gene_dictionary(next(folder.glob("token_dictionary*.pkl")), int)
    model = sc_foundation.load_pretrained(folder, device="cpu")
    adata = real_slice(CELLBENCH, np.arange(0, 499, 25))
    _, cells = tokenize(model, adata)
    assert len(cells) == adata.n_obs
    counts = sp.csr_matrix(adata.X).toarray()
    special = version.endswith("2")
    genes_per_cell = model.gene_tokenizer.config.context_length - 2 * special
    ties = 0
    for i in range(len(cells)):
        value_of = geneformer_ranking(counts[i], list(adata.var_names), tokens, medians)
        ranked = np.array(list(value_of))[np.argsort(-np.array(list(value_of.values())))][:genes_per_cell]
        ours = cells.cell(i)[0]
        if special:
            assert ours[0] == tokens["<cls>"] and ours[-1] == tokens["<eos>"]
            ours = ours[1:-1]
        assert len(ours) == len(ranked) == min(len(value_of), genes_per_cell)
        assert len(set(ours.tolist())) == len(ours) and set(ours.tolist()) <= set(value_of)
        np.testing.assert_array_equal([value_of[t] for t in ours], [value_of[t] for t in ranked])
        ties += int((ours != ranked).sum())
    assert ties < 0.001 * cells.offsets[-1]  # exact ties are rare: most ranks hold Geneformer's very gene


@pytest.mark.parametrize("version", ["geneformer_v1", "geneformer_v2"])
def test_geneformer_matches_bert_on_real_cells(version, published, real_slice):
    folder, bert, _ = published[version]
    model = sc_foundation.load_pretrained(folder, device="cpu")
    assert isinstance(model, ScFoundationForMaskedGeneModeling)
    batch, _ = tokenize(model, real_slice(CELLBENCH, np.arange(3, 499, 80)))
    real = batch["attention_mask"]
    with torch.no_grad():
        ours = model.sc_foundation(**batch, output_hidden_states=True)
        theirs = bert(input_ids=batch["input_ids"], attention_mask=real.long(), output_hidden_states=True)
        # The MLM head too, on the first 64 tokens of two cells: (B, L, V) logits of whole cells take gigabytes.
        short = {name: tensor[:2, :64] for name, tensor in batch.items()}
        logits = model(**short).logits
        their_logits = bert(input_ids=short["input_ids"], attention_mask=short["attention_mask"].long()).logits
    for layer, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states, strict=True)):
        assert max_difference(a, b, real) <= TOLERANCE, layer
    assert max_difference(logits[..., : bert.config.vocab_size], their_logits, short["attention_mask"]) <= TOLERANCE
    # Geneformer's EmbExtractor: the mean of the second-to-last layer over the gene tokens (no <cls>/<eos>).
    genes = real & (batch["input_ids"] != model.config.cls_token_id)
    if model.config.eos_token_id is not None:
        genes &= batch["input_ids"] != model.config.eos_token_id
    second_to_last = theirs.hidden_states[-2]
    expected = (second_to_last * genes[..., None]).sum(1) / genes.sum(1, keepdim=True)
    assert float((ours.cell_embedding - expected).abs().max()) <= TOLERANCE


def genecorpus_batch(shared_data, rows: int) -> dict:
    frame = pd.read_parquet(shared_data / "genecorpus_tokenized/genecorpus_500_samples.parquet").head(rows)
    cells = [(np.asarray(ids, dtype=np.int64), np.zeros(len(ids), np.float32)) for ids in frame["input_ids"]]
    return {name: torch.from_numpy(array) for name, array in pad_cells(cells, pad_id=0).items()}


def test_genecorpus_sample_runs_with_the_v1_vocabulary(published, shared_data):
    folder, bert, _ = published["geneformer_v1"]
    model = sc_foundation.load_pretrained(folder, device="cpu")
    source = stand_ins.geneformer_v1_tokens(shared_data)
    assert len(source) == 25_426
    assert model.gene_tokenizer.vocab.tokens[: len(source)] == source  # the sample's token ids mean the same genes
    batch = genecorpus_batch(shared_data, 3)
    assert int(batch["input_ids"].max()) < len(source)
    real = batch["attention_mask"]
    with torch.no_grad():
        ours = model.sc_foundation(**batch, output_hidden_states=True)
        theirs = bert(input_ids=batch["input_ids"], attention_mask=real.long(), output_hidden_states=True)
    assert max_difference(ours.hidden_states[-1], theirs.hidden_states[-1], real) <= TOLERANCE


def test_geneformer_v1_at_published_width(shared_data, tmp_path):
    """V1's real shape: 6 layers, 256 wide, 4 heads, 512 FFN, 25,426 tokens, 2,048 positions."""
    tokens = stand_ins.geneformer_v1_tokens(shared_data)
    bert, _ = stand_ins.write_geneformer_folder(
        tmp_path, tokens, hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512, seed=2
    )
    model = sc_foundation.load_pretrained(tmp_path, device="cpu")
    assert model.config.pooling_layer == -2 and model.config.hidden_size == 256
    batch = genecorpus_batch(shared_data, 2)
    real = batch["attention_mask"]
    with torch.no_grad():
        ours = model.sc_foundation(**batch, output_hidden_states=True)
        theirs = bert(input_ids=batch["input_ids"], attention_mask=real.long(), output_hidden_states=True)
    for layer, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states, strict=True)):
        assert max_difference(a, b, real) <= TOLERANCE, layer


# --------------------------------------------------------------------------------------- strict and safe
class _Payload:
    """What a malicious pickle smuggles in: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_dictionary_pickle_is_refused(published, tmp_path):
    folder, *_ = published["geneformer_v1"]
    marker = tmp_path / "code_ran"
    evil = tmp_path / "token_dictionary_evil.pkl"
    evil.write_bytes(pickle.dumps({"<pad>": 0, "ENSG00000000003": _Payload(marker)}))
    with pytest.raises(ConversionError, match="refused global"):
        convert(folder, token_dictionary=evil)
    with pytest.raises(ConversionError, match="refused global"):
        load_gene_dictionary(evil, int)
    assert not marker.exists()
    # Numbers pickled as numpy scalars are data, and pass.
    plain = tmp_path / "medians.pkl"
    plain.write_bytes(pickle.dumps({"ENSG00000000003": np.float64(1.5), "ENSG00000000419": np.float32(2.0)}))
    assert load_gene_dictionary(plain, float) == {"ENSG00000000003": 1.5, "ENSG00000000419": 2.0}


def test_checkpoint_with_code_is_refused(published, tmp_path):
    folder, _ = published["scgpt"]
    for name in ("args.json", "vocab.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    marker = tmp_path / "code_ran"
    state = torch.load(folder / "best_model.pt", weights_only=True)
    torch.save(state | {"payload": _Payload(marker)}, tmp_path / "best_model.pt")
    with pytest.raises(ConversionError, match="weights_only"):
        convert(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_scgpt_loading_is_strict(change, published, tmp_path):
    folder, _ = published["scgpt"]
    for name in ("args.json", "vocab.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    state = torch.load(folder / "best_model.pt", weights_only=True)
    if change == "extra":
        state["transformer_encoder.layers.0.adapter.weight"] = torch.zeros(2, 2)
        key = "transformer_encoder.layers.0.adapter.weight"
    else:
        key = "encoder.enc_norm.bias"
        del state[key]
    torch.save(state, tmp_path / "best_model.pt")
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        convert(tmp_path)


def test_scgpt_pretraining_heads_are_reported(published):
    with pytest.warns(UserWarning, match="mvc_decoder"):
        converted = convert(published["scgpt"][0])
    assert converted.dropped and all(key.startswith(("decoder.", "mvc_decoder.")) for key in converted.dropped)


def test_convert_command_writes_our_export(published, real_slice, tmp_path):
    folder, *_ = published["geneformer_v2"]
    out = main([str(folder), str(tmp_path / "export")])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.pkl")) and not list(out.glob("*.bin"))
    adata = real_slice(CELLBENCH, 6)
    direct, exported = adata.copy(), adata.copy()
    sc_foundation.embed(direct, sc_foundation.load_pretrained(folder, device="cpu"))
    sc_foundation.embed(exported, sc_foundation.load_pretrained(out, device="cpu"))
    np.testing.assert_allclose(exported.obsm["X_sc_foundation"], direct.obsm["X_sc_foundation"], atol=1e-6)


def test_finetune_annotation_on_a_published_folder(published, shared_data, tmp_path):
    """``finetune.py task=annotation pretrained=<published scGPT folder>``: converted once, fine-tuned, scored,
    exported. On pbmc68k_reduced (short cells). The Geneformer stand-in is fine-tuned by notebooks/05, in
    tests/test_notebooks.py."""
    from sc_foundation import tasks
    from tests.test_finetune import QUIET, compose_finetune

    folder = published["scgpt"][0]
    cfg = compose_finetune(
        [
            f"pretrained={folder}",
            f"data.files=[{shared_data / PBMC68K}]",
            f"output_dir={tmp_path}",
            *QUIET,
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=6",
            "baselines.n_top_genes=500",
            "baselines.n_pcs=20",
        ]
    )
    result = tasks.run(cfg)
    assert (tmp_path / "converted" / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 6 and 0.0 <= metrics["model"]["macro_f1"] <= 1.0
    model = sc_foundation.load_pretrained(result["export"], device="cpu")
    # The published tokenizer, read through the task's gene panel (data.panel_genes, library size over it) and
    # otherwise unchanged.
    published, tuned = sc_foundation.load_pretrained(folder).gene_tokenizer, model.gene_tokenizer
    assert model.config.id2label and tuned.vocab == published.vocab and tuned.config.gene_panel
    assert tuned.config.library_size == "panel"
    unpanelled = dataclasses.replace(
        tuned.config,
        gene_panel=None,
        include_zeros=published.config.include_zeros,
        context_length=published.config.context_length,
        truncation=published.config.truncation,
        library_size=published.config.library_size,
    )
    assert unpanelled == published.config
