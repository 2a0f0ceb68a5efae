"""``task=imputation``: expected expression of a gene panel (the scVI protocol), scored on hidden counts against kNN
smoothing, the gene means and scVI."""

from __future__ import annotations

import json
from collections.abc import Sequence

import anndata
import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig

from sc_foundation.data.genes import _atomic_write_text
from sc_foundation.data.io import write_h5ad_atomic, write_h5ad_once
from sc_foundation.data.store import CorpusInput, CorpusStore
from sc_foundation.data.tokenization import GeneTokenizer
from sc_foundation.inference import impute
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.modeling import (
    ScFoundationForImputation,
)
from sc_foundation.tasks.evaluation import (
    read_counts,
)
from sc_foundation.tasks.imputation_protocol import (
    choose_panel,
    gene_mean_shares,
    hide_entries,
    imputation_metrics,
    knn_smoothing_shares,
    vocabulary_counts,
)
from sc_foundation.tasks.scvi_baselines import scvi_normalized_expression
from sc_foundation.training.console import announce
from sc_foundation.training.runs import output_dir

from .common import (
    architecture_overrides,
    fit,
    init_panel_decoder,
    other_rank_result,
    read_inputs,
    run_scvi,
    skipped_baselines,
    task_datamodule,
    tokenize_inputs,
    training_record,
    two_way_split,
)


def run_imputation(cfg: DictConfig, callbacks: Sequence[pl.Callback] = ()) -> dict:
    """``task=imputation``: see the module docstring.

    The scVI protocol: a seeded ``hidden_fraction`` of the non-zero counts (over the vocabulary genes) is hidden
    before anything else happens; the store, the model, the baselines and the panel all see only the corrupted
    matrix, and every method is scored on the hidden entries that fall in the panel, in all cells. The validation
    cells serve early stopping only.
    """
    out = output_dir(cfg)
    split = cfg.split
    inputs = read_inputs(cfg)
    tokenizer = GeneTokenizer.from_pretrained(cfg.pretrained)
    vocab = vocabulary_counts(read_counts(inputs), tokenizer, inputs[0].species)
    corrupted, hidden = hide_entries(vocab.X, cfg.hidden_fraction, cfg.hidden_seed)
    corrupted = anndata.AnnData(corrupted, obs=vocab.obs[["source", "cell_id"]], var=vocab.var)
    # Every DDP rank derives the same corrupted cells; the first writes them, the store built from them stays valid.
    corrupted_path = write_h5ad_once(corrupted, out / "corrupted.h5ad")
    _, store_path = tokenize_inputs(cfg, out, [CorpusInput(path=str(corrupted_path))], [split.split_by])

    store = CorpusStore(store_path)
    rows = corrupted.obs_names.get_indexer(store.obs["cell_id"])  # store cell -> corrupted row
    panel = choose_panel(corrupted, cfg.decoder_genes)
    targets = corrupted.X[rows][:, panel].toarray()  # (n_store_cells, G) in store order
    splits = two_way_split(cfg, out, store)
    datamodule = task_datamodule(cfg, store_path, {"counts": targets}, splits)

    pl.seed_everything(cfg.seed, workers=True)
    model = ScFoundationForImputation.from_pretrained(
        cfg.pretrained,
        new_heads=["decoder"],
        decoder_gene_ids=corrupted.var["token_id"].iloc[panel].tolist(),
        **architecture_overrides(cfg),
    )
    init_panel_decoder(model.decoder, targets[splits["train"]])
    trainer, module, best = fit(cfg, out, model, tokenizer, datamodule, callbacks)
    if not trainer.is_global_zero:
        return other_rank_result(out, trainer, module, best)

    # Impute through the public API, with the export: what users run is what the numbers describe.
    imputed = corrupted[:, panel].copy()
    impute(imputed, load_pretrained(best), layer_added="sc_foundation_imputed")
    in_panel = np.isin(hidden["col"], panel)
    entries = {"row": hidden["row"][in_panel], "col": np.searchsorted(panel, hidden["col"][in_panel])}
    true = hidden["value"][in_panel]
    library = np.asarray(imputed.X.sum(axis=1)).ravel()  # (n_cells,) corrupted panel totals, one for all methods
    tokenized = np.zeros(imputed.n_obs, dtype=bool)
    tokenized[rows] = True  # cells without tokens have no model prediction: score every method without them
    scored = tokenized[entries["row"]]

    def score(predicted_counts: np.ndarray) -> dict:
        values = np.asarray(predicted_counts[entries["row"], entries["col"]]).ravel()
        return imputation_metrics(true[scored], values[scored])

    baseline_shares = {
        "knn_smoothing": knn_smoothing_shares(imputed.X, n_pcs=cfg.baselines.n_pcs, seed=cfg.seed),
        "gene_mean": gene_mean_shares(imputed.X),
    }
    if run_scvi(cfg):
        baseline_shares["scvi"] = scvi_normalized_expression(imputed.X, seed=cfg.seed)
    baselines = {name: score(shares * library[:, None]) for name, shares in baseline_shares.items()}
    metrics = {
        "task": "imputation",
        "hidden_fraction": cfg.hidden_fraction,
        "panel_genes": len(panel),
        "finetune_mode": cfg.finetune.mode,
        "scored_cells": "all",
        "n_cells": {"all": imputed.n_obs, **{name: len(rows) for name, rows in splits.items()}},
        "n_hidden_entries": {
            "all_genes": len(hidden["value"]),
            "panel": int(in_panel.sum()),
            "scored": int(scored.sum()),
        },
        **training_record(trainer),
        "model": score(imputed.layers["sc_foundation_imputed"].toarray()),
        "baselines": baselines,
        "skipped_baselines": skipped_baselines(cfg),
    }
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    write_h5ad_atomic(imputed, out / "imputed.h5ad")
    summary = ", ".join(f"{name} {result['median_l1']:.3f}" for name, result in baselines.items())
    announce(f"median L1 {metrics['model']['median_l1']:.3f} ({summary}); {out / 'metrics.json'}")
    return {
        "output_dir": out,
        "store": store_path,
        "splits": splits,
        "metrics": metrics,
        "export": best,
        "imputed": imputed,
        "trainer": trainer,
        "module": module,
        "datamodule": datamodule,
    }
