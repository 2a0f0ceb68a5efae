"""Calibrated annotation with a refusal: per-cell probabilities whose confidence matches their accuracy, and an
"unknown" call for cells the classifier should not name (for instance a cell type it never saw).

- Calibration: one temperature ``T`` divides the logits before the softmax (temperature scaling, Guo et al. 2017),
  fitted on the validation cells by their negative log-likelihood; it changes no prediction, only the confidence.
  The expected calibration error (ECE) of the test cells is reported before and after.
- Refusal: a cell whose calibrated top probability is below a threshold is called unknown. The threshold is chosen
  on the validation cells alone: the top probability that accepts ``coverage`` of them (0.95: 5% of known cells are
  refused by design). Nothing about the unseen type is used to choose it.
- A held-out type (``holdout_label``): its cells are removed from training and validation and kept in the test
  split, where they carry the label :data:`IGNORE`; the report says how many of them are refused, how many known
  test cells are wrongly refused, and the AUROC of the top probability at telling the two apart.

- Refusal by novelty (:func:`novelty_report`): a cell farther from the training cells than the validation cells'
  ``coverage`` quantile, in the classifier's own feature space, is called unknown (:mod:`sc_foundation.models.novelty`:
  it tells a type the classifier never saw from the known ones far better than the top probability does).

The same reports are made for the logistic regression baseline on the same cells: its probabilities
(log-probabilities serve as its logits), and novelty in its PCA space, so the two are compared like for like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import roc_auc_score

from sc_foundation.models.novelty import NoveltyReference
from sc_foundation.tasks.evaluation import class_log_probabilities

# Label of a test cell whose type was held out of training (PyTorch's ignore_index: the loss skips it).
IGNORE = -100


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the cells binned by top probability into ``n_bins`` equal-width bins; the mean over cells of
    ``|accuracy of the bin - mean confidence of the bin|``.

    Args:
        probabilities: (n, C) rows summing to 1; labels: (n,) true class ids.
    """
    if len(labels) == 0:
        return float("nan")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)  # (n,) bin of each cell
    error = 0.0
    for b in np.unique(bins):
        chosen = bins == b
        error += chosen.sum() * abs(correct[chosen].mean() - confidence[chosen].mean())
    return float(error / len(labels))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T in [0.05, 20] minimising the negative log-likelihood of ``softmax(logits / T)``.

    Args:
        logits: (n, C); labels: (n,) class ids.
    """
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def refusal_threshold(probabilities: np.ndarray, coverage: float) -> float:
    """The top probability below which a cell is refused, so that ``coverage`` of these (n, C) cells are accepted."""
    if not 0 < coverage <= 1:
        raise ValueError(f"calibration.coverage must lie in (0, 1], got {coverage}")
    return float(np.quantile(probabilities.max(axis=1), 1 - coverage))


def calibration_report(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    coverage: float = 0.95,
) -> dict:
    """Temperature, ECE and refusal of one classifier (see the module docstring).

    Args:
        val_logits, test_logits: (n_val, C), (n_test, C) logits (or log-probabilities).
        val_labels: (n_val,) class ids; test_labels: (n_test,) class ids, :data:`IGNORE` for cells of a held-out type.
        coverage: share of validation cells the refusal threshold accepts.
    Returns:
        ``temperature``, ``ece_uncalibrated`` and ``ece`` (calibrated) of the known test cells, ``threshold``,
        ``known_refused`` (share of known test cells called unknown) and, when the test split holds held-out cells,
        ``n_unseen``, ``unseen_refused`` (share of them called unknown) and ``auroc_unseen`` (minus the top probability
        as a score of being unseen).
    """
    temperature = fit_temperature(val_logits, val_labels)
    threshold = refusal_threshold(softmax(val_logits / temperature, axis=1), coverage)
    probabilities = softmax(test_logits / temperature, axis=1)  # (n_test, C)
    known = test_labels != IGNORE
    report = {
        "temperature": temperature,
        "coverage": coverage,
        "threshold": threshold,
        "ece_uncalibrated": expected_calibration_error(softmax(test_logits[known], axis=1), test_labels[known]),
        "ece": expected_calibration_error(probabilities[known], test_labels[known]),
    }
    return report | refusal_scores(-probabilities.max(axis=1), -threshold, known)  # refused: below the threshold


def refusal_scores(score: np.ndarray, threshold: float, known: np.ndarray) -> dict:
    """How a refusal of the (n,) test cells whose ``score`` exceeds ``threshold`` treats the (n,) bool ``known``
    cells and the others (a held-out type's): ``known_refused`` and ``n_known``, and when there are unseen cells
    ``n_unseen``, ``unseen_refused`` and ``auroc_unseen`` (the score's AUROC at telling unseen from known)."""
    refused = score > threshold
    report = {
        "known_refused": float(refused[known].mean()) if known.any() else float("nan"),
        "n_known": int(known.sum()),
    }
    if (~known).any():
        report["n_unseen"] = int((~known).sum())
        report["unseen_refused"] = float(refused[~known].mean())
        if known.any():
            report["auroc_unseen"] = float(roc_auc_score(~known, score))
    return report


def novelty_report(reference: NoveltyReference, test_features: np.ndarray, test_labels: np.ndarray) -> dict:
    """The refusal by novelty (:mod:`sc_foundation.models.novelty`) of the (n_test, h) test cells, whose
    (n_test,) ``test_labels`` are :data:`IGNORE` for a held-out type: :func:`refusal_scores` plus the reference's
    ``threshold``, ``neighbors``, ``coverage`` and ``n_reference`` cells."""
    settings = {
        "threshold": reference.threshold,
        "neighbors": reference.neighbors,
        "coverage": reference.coverage,
        "n_reference": len(reference.embeddings),
    }
    return settings | refusal_scores(reference.scores(test_features), reference.threshold, test_labels != IGNORE)


def hold_out_label(
    names: Sequence[str], labels: np.ndarray, splits: Mapping[str, np.ndarray], holdout: str | None
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """Remove one type from training: its cells leave the train and validation splits, stay in the test split with
    the label :data:`IGNORE`, and the class list loses it.

    Args:
        names: (C,) sorted class names; labels: (n_cells,) ids into them; splits: ``train``/``val``/``test`` rows.
        holdout: the class to hold out, or None (everything returned unchanged).
    Returns:
        the C - 1 known names, (n_cells,) ids into them (:data:`IGNORE` for the held-out type), the new splits.
    Raises:
        ValueError: ``holdout`` is not one of the names (they are listed), or no test cell has it.
    """
    if holdout is None:
        return list(names), labels, dict(splits)
    if holdout not in names:
        raise ValueError(f"holdout_label={holdout!r} is not one of the labels {list(names)}")
    removed = names.index(holdout)
    if not (labels[splits["test"]] == removed).any():
        raise ValueError(f"holdout_label={holdout!r}: no test cell has it, so its refusal cannot be scored")
    if len(names) < 3:
        raise ValueError(f"holdout_label={holdout!r} leaves {len(names) - 1} class: a classifier needs two or more")
    known = [name for name in names if name != holdout]
    remapped = np.where(labels == removed, IGNORE, labels - (labels > removed)).astype(np.int64)
    kept = {name: rows[remapped[rows] != IGNORE] if name != "test" else rows for name, rows in splits.items()}
    return known, remapped, kept


def baseline_calibration(
    model, x: np.ndarray, labels: np.ndarray, splits: Mapping[str, np.ndarray], n_classes: int, coverage: float
) -> dict:
    """:func:`calibration_report` of a fitted scikit-learn classifier (e.g. the HVG logistic regression) on the same
    validation and test rows as the model, its log-probabilities serving as logits.

    Args:
        x: (n_cells, n_features) the features it reads; labels: (n_cells,) as from :func:`hold_out_label`.
    """
    val, test = splits["val"], splits["test"]
    return calibration_report(
        class_log_probabilities(model, x[val], n_classes),
        labels[val],
        class_log_probabilities(model, x[test], n_classes),
        labels[test],
        coverage,
    )
