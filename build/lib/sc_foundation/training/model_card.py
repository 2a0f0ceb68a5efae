"""The model card of a pretraining export: ``README.md`` (data, recipe, steps, probe table) and ``metrics.json``.

Whoever loads an export should see, without rerunning anything, what it was trained on, how, and whether its cell
embedding beats PCA on the probe sets (:mod:`sc_foundation.training.probes`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping


def probe_table(results: Mapping[str, dict]) -> str:
    """A markdown table of probe results (``RepresentationProbe.evaluate``): ours against PCA per set."""
    lines = [
        "| probe set | cells | kNN acc. ours | kNN acc. PCA | ratio | AvgBIO ours | AvgBIO PCA | ratio "
        "| depth r ours | depth r PCA |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        ours, pca, ratio = r["ours"], r["pca"], r["ratio"]
        lines.append(
            f"| {name} | {r['n_cells']} | {ours['knn_accuracy']:.3f} | {pca['knn_accuracy']:.3f} "
            f"| {ratio['knn_accuracy']:.3f} | {ours['avg_bio']:.3f} | {pca['avg_bio']:.3f} | {ratio['avg_bio']:.3f} "
            f"| {ours.get('depth_correlation', float('nan')):.2f} | {pca.get('depth_correlation', float('nan')):.2f} |"
        )
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
            "log-normalised, scaled HVGs of the same cells: kNN accuracy (5-fold), AvgBIO = mean(NMI, ARI, label "
            "ASW), and the largest |r| between log(detected genes) and the embedding's first two principal "
            "components (lower: less sequencing depth in the embedding). A ratio >= 1 means at least PCA's score.\n\n"
            + probe_table(probes)
        )
    else:
        sections.append("## Representation probes\n\nThis run had no probe sets.")
    return "\n\n".join(sections) + "\n"


def metrics_json(training: Mapping[str, object], probes: Mapping[str, dict] | None) -> str:
    """``metrics.json`` of an export: the training summary and the probe results."""
    return json.dumps({"training": dict(training), "probes": probes}, indent=1, default=str)
