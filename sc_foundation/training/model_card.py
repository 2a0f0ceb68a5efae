"""The model card of a pretraining export: ``README.md`` (data, recipe, steps, probe table) and ``metrics.json``.

Whoever loads an export should see, without rerunning anything, what it was trained on, how, and whether its cell
embedding beats PCA on the probe sets (:mod:`sc_foundation.training.probes`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping


def probe_table(results: Mapping[str, dict]) -> str:
    """A markdown table of probe results (``RepresentationProbe.evaluate``): per set, ours and each reference (PCA,
    scVI when scored), bio (kNN accuracy, AvgBIO) and batch mixing (``batch_score``, where the set has batches)."""
    lines = [
        "| probe set | cells | embedding | kNN acc. | AvgBIO | batch score | batch ASW | iLISI | graph conn. "
        "| depth r |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def number(scores: Mapping[str, float], metric: str, digits: int = 3) -> str:
        return f"{scores[metric]:.{digits}f}" if metric in scores else "-"

    for name, r in results.items():
        for method in ("ours", "pca", "scvi"):
            if method not in r:
                continue
            scores = r[method]
            columns = [number(scores, m) for m in ("knn_accuracy", "avg_bio", "batch_score", "batch_asw", "ilisi")]
            columns += [number(scores, "graph_connectivity"), number(scores, "depth_correlation", 2)]
            label = {"ours": "**ours**", "pca": "PCA", "scvi": "scVI"}[method]
            lines.append(f"| {name} | {r['n_cells']} | {label} | " + " | ".join(columns) + " |")
        for method, reason in r.get("skipped", {}).items():
            lines.append(f"| {name} | {r['n_cells']} | {method}: skipped ({reason}) |" + " |" * 7)
    return "\n".join(lines)


def render_model_card(
    title: str,
    data: Mapping[str, object],
    recipe: Mapping[str, object],
    training: Mapping[str, object],
    probes: Mapping[str, dict] | None,
) -> str:
    """The ``README.md`` of an export.

    Args:
        title: the heading, e.g. the experiment name.
        data: corpus facts (inputs, cells, vocabulary size, tokenizer settings).
        recipe: the model and objective settings.
        training: steps, cells seen, wall time, precision, final losses.
        probes: the last probe results, or None when the run had no probes.
    """

    def listing(items: Mapping[str, object]) -> str:
        return "\n".join(f"- **{key}**: {value}" for key, value in items.items())

    sections = [
        f"# {title}",
        "A pretrained sc_foundation encoder. Load it with `sc_foundation.load_pretrained(path)`; "
        "`sc_foundation.embed(adata, path)` writes its cell embedding to `adata.obsm['X_sc_foundation']`.",
        "## Data\n\n" + listing(data),
        "## Recipe\n\n" + listing(recipe),
        "## Training\n\n" + listing(training),
    ]
    if probes:
        sections.append(
            "## Representation probes\n\n"
            "The embedding `embed` returns, scored against the cell-type labels of each probe set, next to PCA-50 of "
            "log-normalised, scaled HVGs of the same cells (and scVI's latent trained on them, when scored): kNN "
            "accuracy (5-fold), AvgBIO = mean(NMI, ARI, label ASW); on sets with a technical batch, the batch score "
            "= mean(batch ASW, iLISI, graph connectivity) (scib-metrics, higher: better mixed); and the largest |r| "
            "between log(detected genes) and the embedding's first two principal components (lower: less "
            "sequencing depth in the embedding).\n\n" + probe_table(probes)
        )
    else:
        sections.append("## Representation probes\n\nThis run had no probe sets.")
    return "\n\n".join(sections) + "\n"


def metrics_json(training: Mapping[str, object], probes: Mapping[str, dict] | None) -> str:
    """``metrics.json`` of an export: the training summary and the probe results."""
    return json.dumps({"training": dict(training), "probes": probes}, indent=1, default=str)
