"""Inference on an AnnData in a notebook: cell embeddings, cell-type annotation, imputation, prediction of a second
modality, and kNN label transfer.

``embed``, ``annotate``, ``impute`` and ``predict_modality`` tokenize the counts on the fly with the model's own
tokenizer (no corpus store), one chunk of cells at a time, and run the model in eval mode under
``torch.inference_mode()``, in bf16 autocast on CUDA and in fp32 on CPUs (:func:`inference_precision` says why);
``precision`` chooses either. bf16 keeps each cell's embedding within cosine 0.999 of fp32 (tests/test_inference.py
measures it).

Within a chunk the cells are sorted by length before they are cut into batches, which cuts padding; since the
model's output for a cell does not depend on the padding or on the other cells of its batch, the result does not
depend on ``batch_size`` or on which cells are embedded together.

Cells with no counts in any vocabulary gene have no tokens and cannot be embedded: they get NaN rows (and no label)
and a warning with their number, rather than an error, so that one empty droplet does not stop a whole dataset. Drop
them before ``sc.pp.neighbors``, which refuses NaNs (the warning says how).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from sc_foundation.data.io import counts_from_anndata
from sc_foundation.data.tokenization import GeneMatch, GeneTokenizer, TokenizedCells, cell_keys, pad_cells
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.modeling import (
    ScFoundationForCellClassification,
    ScFoundationForImputation,
    ScFoundationForMultimodal,
    ScFoundationPreTrainedModel,
)
from sc_foundation.models.novelty import NOVELTY_FILE

__all__ = ["UNKNOWN", "annotate", "call_classes", "embed", "impute", "predict_modality", "transfer_labels"]

logger = logging.getLogger(__name__)

UNKNOWN = -1
"""Predicted class id of a cell called "unknown" (its top probability fell below the threshold)."""
UNKNOWN_LABEL = "unknown"
"""The label :func:`annotate` writes for such a cell."""

_CHUNK_SIZE = 4096  # cells tokenized (and length-sorted) at a time: bounds memory, not the result
_MEMORY_SHARE = 0.25
"""Share of the memory available when inference starts that one batch's tensors may use (the rest stays for the
AnnData, the outputs and other processes): long contexts get fewer cells per batch, never more memory."""
_PROGRESS_MIN_CELLS = 5000  # progress=None shows a bar from this many cells on
PRECISIONS = ("auto", "bf16", "fp32")


def inference_precision(device: torch.device, precision: str = "auto") -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` means on ``device``. ``auto`` is bf16 on CUDA and fp32 on CPUs.

    Why not bf16 on CPUs with native bf16 (AMX, AVX512-BF16): there a bf16 embedding of a cell moves with the other
    cells of its batch (padding changes the blocking of the matmuls), so the same cell embedded twice in different
    company differs by about 1e-4; in fp32 it does not move at the contexts of the recipes (a few hundred tokens), and
    by rounding only (7e-7 measured) for cells of over 10,000 tokens. ``precision="bf16"`` asks for it anyway.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


def call_classes(logits: np.ndarray, threshold: float | None) -> np.ndarray:
    """(n,) predicted class ids from logits (n, C); :data:`UNKNOWN` where the top probability is below
    ``threshold`` (None calls every cell)."""
    probabilities = torch.from_numpy(logits).softmax(-1).numpy()
    predicted = probabilities.argmax(-1)
    if threshold is not None:
        predicted = np.where(probabilities.max(-1) < threshold, UNKNOWN, predicted)
    return predicted


def embed(
    adata: anndata.AnnData,
    model: str | os.PathLike | ScFoundationPreTrainedModel,
    *,
    key_added: str = "X_sc_foundation",
    layer: str | None = None,
    gene_key: str | None = None,
    use_raw: bool = False,
    species: str = "auto",
    batch_size: int | None = None,
    copy: bool = False,
    progress: bool | None = None,
    precision: str = "auto",
) -> anndata.AnnData | None:
    """Write the model's cell embedding of every cell into ``adata.obsm[key_added]``.

    Args:
        adata: (n_obs, n_vars) with raw counts in ``X``, ``layers[layer]`` or ``raw.X``.
        model: an exported model directory (loaded with :func:`~sc_foundation.models.export.load_pretrained`) or a model
            it returned (carrying ``gene_tokenizer``). Any head works: its backbone is run.
        key_added: the ``obsm`` key; ``sc.pp.neighbors(adata, use_rep=key_added)`` reads it.
        layer, use_raw, gene_key: where the counts and gene identifiers are, as in
            :func:`~sc_foundation.data.io.counts_from_anndata`.
        species: see :func:`sc_foundation.data.genes.resolve_genes`.
        batch_size: cells per forward pass at most; default 256 on CUDA, 64 on CPU (on the CPU, fewer for long cells:
            the memory plan). Does not change the result beyond fp32 rounding.
        copy: work on and return a copy of ``adata``, leaving it untouched.
        progress: show a tqdm bar; None shows one from 5000 cells on, when stderr is a terminal.
        precision: ``"auto"`` (bf16 on CUDA, fp32 on CPUs), ``"bf16"`` or ``"fp32"``;
            ``uns["sc_foundation"]["precision"]`` records the one used.

    Returns:
        The copy when ``copy``, else None. ``obsm[key_added]`` is (n_obs, h) float32 in ``adata``'s cell order, NaN
        rows for cells without matched counts; ``uns["sc_foundation"]`` holds the gene match (rate and summary).

    Raises:
        InvalidInputError: the matrix does not hold raw counts (the message says which ``layer=`` to use).
        GeneMatchError: too few genes match the model's vocabulary.
    """
    adata = adata.copy() if copy else adata
    outputs, _ = _run(
        adata,
        _load(model),
        ("cell_embedding",),
        layer,
        gene_key,
        use_raw,
        species,
        batch_size,
        progress,
        precision=precision,
    )
    adata.obsm[key_added] = outputs["cell_embedding"]
    adata.uns["sc_foundation"]["embedding_key"] = key_added
    return adata if copy else None


def annotate(
    adata: anndata.AnnData,
    model: str | os.PathLike | ScFoundationForCellClassification,
    *,
    key_added: str = "sc_foundation",
    unknown_threshold: float | None = None,
    refuse_novel: bool = False,
    layer: str | None = None,
    gene_key: str | None = None,
    use_raw: bool = False,
    species: str = "auto",
    batch_size: int | None = None,
    copy: bool = False,
    progress: bool | None = None,
    precision: str = "auto",
) -> anndata.AnnData | None:
    """Label every cell with a fine-tuned annotation model (``finetune.py task=annotation``).

    Writes ``obs[f"{key_added}_label"]`` (categorical over ``config.id2label`` plus ``"unknown"``; missing for cells
    without matched counts), ``obs[f"{key_added}_probability"]`` (the top class probability, in [0, 1]) and the
    cell embedding into ``obsm[f"X_{key_added}"]`` from the same forward pass. When the export holds a novelty
    reference (fine-tuning stores one), ``obs[f"{key_added}_novelty"]`` is each cell's distance to its k-th nearest
    training cell and ``uns["sc_foundation"]["novelty_threshold"]`` the distance that the validation cells stayed
    within, all but ``1 - coverage`` of them (5% by default; :mod:`sc_foundation.models.novelty`), measured in the
    embedding the reference was fitted in: the classifier's, or the pretrained backbone's, which then reads the cells
    a second time (``uns["sc_foundation"]["novelty_space"]`` says which).

    Args:
        model: an exported :class:`~sc_foundation.models.modeling.ScFoundationForCellClassification` directory or model.
        unknown_threshold: cells whose top probability is below it are labelled ``"unknown"``; None labels all.
        refuse_novel: label cells beyond the novelty threshold ``"unknown"``: the way to refuse a cell type the model
            never saw, which the top probability often calls confidently as the nearest known type. For queries
            measured like the training cells: across protocols known cells lie far too (half refused on CellBench).
        Others: as for :func:`embed`.

    Raises:
        TypeError: the model is not a cell classifier.
        ValueError: ``refuse_novel`` with a model that holds no novelty reference (fine-tuned before references
            existed, or loaded with config overrides).
        Others: as for :func:`embed`.
    """
    need = (
        "annotate needs a ScFoundationForCellClassification model (fine-tuned with finetune.py task=annotation; "
        "embed() gives any model's cell embedding)"
    )
    model = _load(model, ScFoundationForCellClassification, need)
    reference = getattr(model, "novelty_reference", None)
    if refuse_novel and reference is None:
        raise ValueError(
            "refuse_novel=True needs the novelty reference that annotation fine-tuning stores in its export "
            f"({NOVELTY_FILE}); this model has none: re-run finetune.py task=annotation, or load the export without "
            "config overrides"
        )
    adata = adata.copy() if copy else adata
    fields = ("logits", "cell_embedding")
    outputs, _ = _run(
        adata, model, fields, layer, gene_key, use_raw, species, batch_size, progress, precision=precision
    )
    logits = outputs["logits"]
    embedded = ~np.isnan(logits).any(axis=1)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    codes = np.full(adata.n_obs, -1)  # -1: a missing category
    probability = np.full(adata.n_obs, np.nan, dtype=np.float32)
    if embedded.any():
        predicted = call_classes(logits[embedded], unknown_threshold)
        codes[embedded] = np.where(predicted == UNKNOWN, len(names), predicted)
        probability[embedded] = torch.from_numpy(logits[embedded]).softmax(-1).max(-1).values.numpy()
    if reference is not None:
        embedding = outputs["cell_embedding"]
        encoder = reference.encoder(model)  # the pretrained backbone, for a reference measured in its embedding
        if encoder is not None:
            # The same cells read again by that backbone; their gene match is the classifier's, already recorded.
            args = (layer, gene_key, use_raw, species, batch_size, progress)
            again, _ = _run(adata, encoder, ("cell_embedding",), *args, record=anndata.AnnData(), precision=precision)
            embedding = again["cell_embedding"]
        novelty = reference.scores(embedding)  # (n_obs,), NaN for cells without an embedding
        if refuse_novel:
            codes[novelty > reference.threshold] = len(names)
        adata.obs[f"{key_added}_novelty"] = novelty.astype(np.float32)
        adata.uns["sc_foundation"]["novelty_threshold"] = reference.threshold
        adata.uns["sc_foundation"]["novelty_space"] = reference.space
    adata.obs[f"{key_added}_label"] = pd.Categorical.from_codes(codes, categories=[*names, UNKNOWN_LABEL])
    adata.obs[f"{key_added}_probability"] = probability
    adata.obsm[f"X_{key_added}"] = outputs["cell_embedding"]
    adata.uns["sc_foundation"]["embedding_key"] = f"X_{key_added}"
    return adata if copy else None


def impute(
    adata: anndata.AnnData,
    model: str | os.PathLike | ScFoundationForImputation,
    *,
    layer_added: str = "sc_foundation_imputed",
    batch_key: str | None = None,
    layer: str | None = None,
    gene_key: str | None = None,
    use_raw: bool = False,
    species: str = "auto",
    batch_size: int | None = None,
    copy: bool = False,
    progress: bool | None = None,
    precision: str = "auto",
) -> anndata.AnnData | None:
    """Impute expression with a fine-tuned imputation model (``finetune.py task=imputation``).

    The model predicts each cell's expected shares of its counts over its gene panel (``config.decoder_gene_ids``);
    the imputed counts are those shares times the cell's observed total over the same genes. Only the panel genes
    present in ``adata`` are imputed (the shares renormalised over them); the other genes keep their observed counts.

    Writes ``layers[layer_added]`` (n_obs, n_vars) float32 CSR (dense within the imputed genes), ``var[layer_added]``
    (bool: the gene was imputed), and the cell embedding into ``obsm[f"X_{layer_added}"]``. Cells without matched
    counts keep their observed values.

    Args:
        model: an exported :class:`~sc_foundation.models.modeling.ScFoundationForImputation` (or integration) model.
        batch_key: for a batch-conditioned model (``config.batch_names``), the obs column with each cell's batch,
            which must be one of the model's batches.
        Others: as for :func:`embed`.

    Raises:
        TypeError: the model has no expression decoder.
        ValueError: no panel gene is in ``adata``; the batches are missing or unknown to the model.
        Others: as for :func:`embed`.
    """
    need = "impute needs a model with an expression decoder (finetune.py task=imputation or task=integration)"
    model = _load(model, ScFoundationForImputation, need)
    per_cell = _batch_ids(adata, model, batch_key)
    adata = adata.copy() if copy else adata
    fields = ("logits", "cell_embedding")
    outputs, match = _run(
        adata, model, fields, layer, gene_key, use_raw, species, batch_size, progress, per_cell, precision=precision
    )
    counts = _read_counts(adata, layer, gene_key, use_raw)  # (n_obs, n_vars) CSR
    # The vocabulary id of each var (-1 unmatched), and its position in the panel (-1 outside it).
    var_token = np.full(adata.n_vars, -1, dtype=np.int64)
    rows, cols = match.aggregate.nonzero()
    var_token[rows] = match.token_ids[cols]
    panel = pd.Index(model.config.decoder_gene_ids)
    position = np.where(var_token >= 0, panel.get_indexer(var_token), -1)
    imputed_vars = np.flatnonzero(position >= 0)
    if not len(imputed_vars):
        raise ValueError(
            f"none of the model's {len(panel)} panel genes is among adata's genes ({match.summary()}): "
            "nothing to impute."
        )
    present, first = np.unique(position[imputed_vars], return_index=True)  # panel positions present in adata
    shares = torch.from_numpy(outputs["logits"][:, present]).softmax(-1).numpy()  # (n_obs, G_present); NaN rows stay
    # The observed total over the present panel genes, each counted once even when several vars map to it.
    library = np.asarray(counts[:, imputed_vars[first]].sum(axis=1), dtype=np.float32)  # (n_obs, 1)
    predicted = shares[:, np.searchsorted(present, position[imputed_vars])] * library  # (n_obs, n_imputed)
    embedded = ~np.isnan(predicted).any(axis=1)
    predicted[~embedded] = counts[~embedded][:, imputed_vars].toarray()  # nothing to impute from: keep observed
    # The observed counts outside the imputed columns, plus the imputed columns (dense within the panel).
    keep = np.ones(adata.n_vars, dtype=np.float32)
    keep[imputed_vars] = 0
    imputed_part = sp.csr_matrix(
        (predicted.ravel(), (np.repeat(np.arange(adata.n_obs), len(imputed_vars)), np.tile(imputed_vars, adata.n_obs))),
        shape=counts.shape,
    )
    result = (counts @ sp.diags(keep) + imputed_part).tocsr()
    adata.layers[layer_added] = result
    adata.var[layer_added] = position >= 0
    adata.obsm[f"X_{layer_added}"] = outputs["cell_embedding"]
    adata.uns["sc_foundation"]["imputed_genes"] = len(imputed_vars)
    return adata if copy else None


def predict_modality(
    adata: anndata.AnnData,
    model: str | os.PathLike | ScFoundationForMultimodal,
    *,
    layer: str | None = None,
    gene_key: str | None = None,
    use_raw: bool = False,
    species: str = "auto",
    batch_size: int | None = None,
    progress: bool | None = None,
    precision: str = "auto",
) -> anndata.AnnData:
    """Predict a second modality (protein or ATAC) from the RNA counts, with a fine-tuned multimodal model
    (``finetune.py task=multimodal``).

    Returns:
        AnnData (n_obs, F) aligned to ``adata``'s cells (``obs`` copied), ``var_names`` the model's features
        (``config.modality_features``): CLR-normalised protein values, or open probabilities of the ATAC peaks.
        ``obsm["X_sc_foundation"]`` holds the RNA cell embedding, ``uns["sc_foundation"]`` the gene match and the
        modality. Cells without matched counts get NaN rows.

    Raises:
        TypeError: the model is not multimodal.
        Others: as for :func:`embed`.
    """
    model = _load(
        model,
        ScFoundationForMultimodal,
        "predict_modality needs a ScFoundationForMultimodal model (finetune.py task=multimodal)",
    )
    fields = ("predictions", "cell_embedding")
    probe = anndata.AnnData(obs=adata.obs[[]])  # records the match without writing into the caller's adata
    outputs, _ = _run(
        adata, model, fields, layer, gene_key, use_raw, species, batch_size, progress, record=probe, precision=precision
    )
    result = anndata.AnnData(outputs["predictions"], obs=adata.obs.copy())
    result.var_names = list(model.config.modality_features)
    result.obsm["X_sc_foundation"] = outputs["cell_embedding"]
    values = "CLR-normalised counts" if model.config.modality == "protein" else "open probability"
    result.uns["sc_foundation"] = {**probe.uns["sc_foundation"], "modality": model.config.modality, "values": values}
    return result


def _batch_ids(adata: anndata.AnnData, model: ScFoundationPreTrainedModel, batch_key: str | None) -> dict:
    """``{"batch_ids": (n_obs,) int64}`` for a batch-conditioned model, else ``{}``; refuses missing or unknown
    batches, naming them."""
    names = model.config.batch_names
    if names is None:
        return {}
    if batch_key is None or batch_key not in adata.obs:
        raise ValueError(
            f"this model decodes per batch {names}: pass batch_key=, the obs column with each cell's batch "
            f"(obs columns: {list(adata.obs.columns)})"
        )
    ids = pd.Index(names).get_indexer(adata.obs[batch_key].astype(str))
    if (ids < 0).any():
        unknown = sorted(set(adata.obs[batch_key].astype(str)[ids < 0]))
        raise ValueError(
            f"obs[{batch_key!r}] holds batches the model was not trained on: {unknown[:10]}; it knows {names}"
        )
    return {"batch_ids": ids.astype(np.int64)}


def _read_counts(adata: anndata.AnnData, layer: str | None, gene_key: str | None, use_raw: bool) -> sp.csr_matrix:
    """(n_obs, n_vars) float32 CSR raw counts, as the tokenizer read them."""
    source = counts_from_anndata(adata, layer=layer, use_raw=use_raw, gene_key=gene_key)
    return sp.vstack([chunk for _, chunk in source.iter_chunks(_CHUNK_SIZE)]).tocsr().astype(np.float32)


def transfer_labels(
    reference: anndata.AnnData,
    query: anndata.AnnData,
    *,
    label_key: str,
    use_rep: str = "X_sc_foundation",
    n_neighbors: int = 15,
    key_added: str | None = None,
) -> None:
    """Predict ``query`` cells' labels from their nearest ``reference`` cells in an embedding (distance-weighted kNN).

    Both AnnData need ``obsm[use_rep]`` from the same model (e.g. :func:`embed` on each). Reference cells with a
    missing label or a NaN embedding are left out; query cells with a NaN embedding get no label.

    Args:
        reference: (n_ref, ...) with ``obs[label_key]`` and ``obsm[use_rep]`` (n_ref, h).
        query: (n_query, ...) with ``obsm[use_rep]`` (n_query, h); written to.
        label_key: the reference's ``obs`` column of labels.
        n_neighbors: reference neighbours that vote (fewer if the reference has fewer usable cells).
        key_added: the query's ``obs`` column for the label; default ``f"{label_key}_transferred"``. Its vote share
            (distance-weighted, in [0, 1]) goes to ``f"{key_added}_probability"``.

    Raises:
        KeyError: ``use_rep`` or ``label_key`` is missing.
        ValueError: the embeddings differ in width, or no reference cell is usable.
    """
    from sklearn.neighbors import KNeighborsClassifier

    for name, data in (("reference", reference), ("query", query)):
        if use_rep not in data.obsm:
            raise KeyError(
                f"{name} has no obsm[{use_rep!r}] (it has {list(data.obsm)}). Run "
                f"sc_foundation.embed({name}, model, key_added={use_rep!r}) first, with the same model for both."
            )
    if label_key not in reference.obs:
        raise KeyError(f"reference has no obs[{label_key!r}]; its obs columns: {list(reference.obs.columns)}.")
    ref_x = np.asarray(reference.obsm[use_rep], dtype=np.float32)  # (n_ref, h)
    query_x = np.asarray(query.obsm[use_rep], dtype=np.float32)  # (n_query, h)
    if ref_x.shape[1] != query_x.shape[1]:
        raise ValueError(
            f"obsm[{use_rep!r}] is {ref_x.shape[1]} wide in the reference but {query_x.shape[1]} in the query: embed "
            "both with the same model."
        )
    labels = reference.obs[label_key]
    usable = labels.notna().to_numpy() & ~np.isnan(ref_x).any(axis=1)
    if not usable.any():
        raise ValueError(f"no reference cell has both a {label_key!r} label and a finite obsm[{use_rep!r}] row.")
    knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, int(usable.sum())), weights="distance")
    knn.fit(ref_x[usable], labels[usable].astype(str).to_numpy())
    embedded = ~np.isnan(query_x).any(axis=1)
    codes = np.full(query.n_obs, -1)
    share = np.full(query.n_obs, np.nan, dtype=np.float32)
    if embedded.any():
        votes = knn.predict_proba(query_x[embedded])  # (n_embedded, n_classes), columns in knn.classes_ order
        codes[embedded] = votes.argmax(axis=1)
        share[embedded] = votes.max(axis=1)
    key = key_added or f"{label_key}_transferred"
    query.obs[key] = pd.Categorical.from_codes(codes, categories=knn.classes_)
    query.obs[f"{key}_probability"] = share


def _load(
    model: str | os.PathLike | ScFoundationPreTrainedModel,
    head: type[ScFoundationPreTrainedModel] = ScFoundationPreTrainedModel,
    need: str = "",
) -> ScFoundationPreTrainedModel:
    """The model itself, or the export at a path loaded with its tokenizer; a ``TypeError`` starting with ``need``
    (which head the caller needs, and how to get one) when it is not a ``head``."""
    if isinstance(model, str | os.PathLike):
        model = load_pretrained(model)
    elif not isinstance(getattr(model, "gene_tokenizer", None), GeneTokenizer):
        raise TypeError(
            "the model carries no gene_tokenizer: pass an exported model directory or the model that "
            "sc_foundation.load_pretrained returned."
        )
    if not isinstance(model, head):
        raise TypeError(f"{need}; this one is a {type(model).__name__}.")
    return model


def _run(
    adata: anndata.AnnData,
    model: ScFoundationPreTrainedModel,
    fields: tuple[str, ...],
    layer: str | None,
    gene_key: str | None,
    use_raw: bool,
    species: str,
    batch_size: int | None,
    progress: bool | None,
    per_cell: dict[str, np.ndarray] | None = None,
    record: anndata.AnnData | None = None,
    precision: str = "auto",
) -> tuple[dict[str, np.ndarray], GeneMatch]:
    """Run ``model`` over every cell of ``adata``; record the gene match in ``record.uns["sc_foundation"]``
    (``adata``'s by default).

    ``fields`` are output attributes of ``model``'s forward, except ``cell_embedding`` alone, which runs only the
    backbone (a pretraining head's forward wants masks and targets). ``per_cell`` maps forward arguments to
    (n_obs, ...) arrays in ``adata`` order (e.g. batch ids); each batch gets its cells' rows.

    Returns:
        field -> (n_obs, ...) float32 in ``adata``'s cell order, NaN rows for cells without matched counts; and
        the gene match.
    """
    if model.config.condition_vocab_sizes:
        raise ValueError(
            f"this model's backbone is conditioned on {sorted(model.config.condition_vocab_sizes)}, which inference "
            "does not supply; use a model without condition embeddings."
        )
    # The backbone's pooled embedding, unless the head makes its own (a variational latent's mean).
    own_embedding = getattr(model, "latent", None) is not None
    module = model.base_model if fields == ("cell_embedding",) and not own_embedding else model
    device = next(model.parameters()).device
    dtype = inference_precision(device, precision)
    batch_size = batch_size or (256 if device.type == "cuda" else 64)
    tokenizer: GeneTokenizer = model.gene_tokenizer
    source = counts_from_anndata(adata, layer=layer, use_raw=use_raw, gene_key=gene_key)
    match, chunks = tokenizer.match_source(source, chunk_size=_CHUNK_SIZE, species=species)
    logger.info(match.summary())
    record = adata if record is None else record
    record.uns["sc_foundation"] = {
        "match_rate": match.match_rate,
        "match_summary": match.summary(),
        "n_genes_matched": match.n_matched,
        "precision": dtype,
    }
    keys = cell_keys(adata.obs_names)
    outputs: dict[str, np.ndarray] = {}
    # None: a bar for long runs on a terminal only; a log file or pipe would get every refresh as a line.
    show = adata.n_obs >= _PROGRESS_MIN_CELLS and sys.stderr.isatty() if progress is None else progress
    was_training = model.training
    model.eval()  # dropout off: the same cell always gets the same embedding
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"),
            tqdm(total=adata.n_obs, unit="cells", disable=not show) as bar,
        ):
            token_limit = None
            for start, counts in chunks:
                cells = tokenizer.encode(counts, match, keys[start : start + counts.shape[0]])
                if token_limit is None and len(cells.lengths):
                    token_limit = _token_limit(module, cells, tokenizer, device, dtype == "bf16")
                for rows, batch in _padded_batches(cells, tokenizer.vocab.pad_id, batch_size, token_limit):
                    for name, array in (per_cell or {}).items():
                        batch[name] = torch.from_numpy(array[start + rows])
                    result = module(**{name: tensor.to(device) for name, tensor in batch.items()})
                    for name in fields:
                        value = getattr(result, name).float().cpu().numpy()  # (B, ...)
                        if name not in outputs:
                            outputs[name] = np.full((adata.n_obs, *value.shape[1:]), np.nan, dtype=np.float32)
                        outputs[name][start + rows] = value
                bar.update(counts.shape[0])
    finally:
        model.train(was_training)
    if not outputs:
        raise ValueError(f"none of the {adata.n_obs} cells has counts in a vocabulary gene: nothing to embed.")
    empty = int(np.isnan(outputs[fields[0]]).any(axis=1).sum())
    record.uns["sc_foundation"]["n_cells_empty"] = empty
    if empty:
        warnings.warn(
            f"{empty} of {adata.n_obs} cells have no counts in any of the model's genes and cannot be embedded: their "
            "rows are NaN. Drop them before sc.pp.neighbors, e.g. adata = adata[~np.isnan(adata.obsm[key]).any(1)].",
            stacklevel=3,
        )
    return outputs, match


def _memory_budget() -> int:
    """Bytes one inference batch's tensors may use: :data:`_MEMORY_SHARE` of what this process may grow to now."""
    from sc_foundation.training.memory import available_memory

    return int(_MEMORY_SHARE * available_memory())


def _token_limit(module, cells: TokenizedCells, tokenizer: GeneTokenizer, device, bf16: bool) -> int | None:
    """Padded tokens per batch within :data:`_MEMORY_SHARE` of the memory available now, planned from a fake-tensor
    forward at the tokenizer's full context (:func:`~sc_foundation.training.memory.inference_token_limit`); None
    (no limit but ``batch_size``) on CUDA, whose memory the caller sizes, or for a forward fake tensors cannot
    trace."""
    from sc_foundation.training.memory import inference_token_limit

    if device.type != "cpu":
        return None
    sample = {
        name: torch.from_numpy(array) for name, array in pad_cells([cells.cell(0)], tokenizer.vocab.pad_id).items()
    }
    budget = _memory_budget()
    try:
        limit = inference_token_limit(module, sample, tokenizer.config.context_length, bf16, budget)
    except RuntimeError as error:  # a data-dependent forward: fake tensors cannot follow it
        logger.info("no memory plan for inference (%s); batches are capped by batch_size alone", error)
        return None
    logger.info("inference batches hold at most %d padded tokens (%.1f GiB budget)", limit, budget / 2**30)
    return limit


def _padded_batches(
    cells: TokenizedCells, pad_id: int, batch_size: int, token_limit: int | None = None
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Cut a tokenized chunk into padded batches of similar-length cells: at most ``batch_size`` cells, and at most
    ``token_limit`` padded tokens (cells x the batch's longest cell), so that long cells come in smaller batches.

    Yields:
        ``rows`` (B,) int64, the chunk rows of the batch's cells (``cells.rows``), and the batch laid out by
        :func:`~sc_foundation.data.tokenization.pad_cells`, as tensors.
    """
    order = np.argsort(cells.lengths, kind="stable")  # similar lengths share a batch: less padding
    lo = 0
    while lo < len(order):
        n = min(batch_size, len(order) - lo)
        if token_limit is not None:  # ascending lengths: the first k cells pad to k x the k-th length, which grows
            padded = np.arange(1, n + 1) * cells.lengths[order[lo : lo + n]]
            n = max(1, int((padded <= token_limit).sum()))
        index = order[lo : lo + n]
        batch = pad_cells([cells.cell(i) for i in index], pad_id)
        yield cells.rows[index], {name: torch.from_numpy(array) for name, array in batch.items()}
        lo += n
