"""Novelty: how far a cell lies from the cells a classifier was trained on, and the refusal it backs.

A classifier's top probability is a poor judge of a cell type it never saw: the softmax spreads its mass over the
known types only, and the cells of an unseen type often land confidently in the nearest one. Their distance to the
training cells in the fine-tuned cell embedding tells them apart far better (the deep nearest-neighbour score of
Sun et al., ICML 2022). The AUROC of telling a held-out type's test cells from the known ones, mean of three seeds
(BENCHMARKS.md): B cells of pbmc68k_reduced 0.718 for the top probability, 0.979 for the distance to the 5th nearest
training cell; astrocytes of SNARE-seq 0.721 and 0.939.

A :class:`NoveltyReference` holds the cell embeddings of (up to ``max_cells``) training cells, the number of
neighbours ``k`` and a distance threshold chosen on validation cells alone: the one that accepts ``coverage`` of
them. The embedding is the classifier's own, or (``calibration.novelty_space=pretrained``) the pretrained backbone's,
whose weights the reference then carries (``encoder_state``): full fine-tuning on a few hundred cells pulls an unseen
type towards the known ones, where the pretrained embedding still sets it apart (held-out B cells of pbmc68k, 3
seeds: AUROC 0.953 in the fully fine-tuned embedding, 0.997 in the pretrained one; BENCHMARKS.md). Annotation
fine-tuning stores it in its export (:data:`NOVELTY_FILE`, covered by the checksums);
:func:`~sc_foundation.models.export.load_pretrained` attaches it to the model as ``model.novelty_reference`` and
:func:`~sc_foundation.inference.annotate` reads it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from sklearn.neighbors import NearestNeighbors

NOVELTY_FILE = "novelty_reference.safetensors"
# backbone_with_weights' source for a task's own backbone_state taken before fine-tuning (annotation, integration).
PRETRAINED_WEIGHTS = "the backbone's own weights before fine-tuning"
_ENCODER_PREFIX = "encoder."
"""Prefix of the encoder's tensors in :data:`NOVELTY_FILE` (beside ``embeddings``)."""


@dataclass(frozen=True)
class NoveltyReference:
    """Reference cells and the refusal threshold of a fine-tuned classifier (see the module docstring).

    Attributes:
        embeddings: (n_ref, h) float32 cell embeddings of training cells.
        neighbors: a cell's novelty is its Euclidean distance to its ``neighbors``-th nearest reference cell.
        threshold: cells whose novelty exceeds it are refused.
        coverage: share of the validation cells the threshold accepts.
        encoder_state: the state dict (name -> array) of the backbone whose cell embedding the reference lives in,
            when that is not the classifier's own backbone (the pretrained weights, before fine-tuning); None: the
            classifier's own embedding.
    """

    embeddings: np.ndarray
    neighbors: int
    threshold: float
    coverage: float
    encoder_state: Mapping[str, np.ndarray] | None = None

    @property
    def space(self) -> str:
        """``"pretrained"`` when the reference carries its own encoder, else ``"classifier"`` (the classifier's own)."""
        return "classifier" if self.encoder_state is None else "pretrained"

    def __post_init__(self):
        if self.embeddings.ndim != 2 or not 1 <= self.neighbors <= len(self.embeddings):
            raise ValueError(
                f"a novelty reference needs (n_ref, h) embeddings and 1 <= neighbors <= n_ref; got shape "
                f"{self.embeddings.shape} and neighbors={self.neighbors}"
            )

    @classmethod
    def fit(
        cls,
        train_embedding: np.ndarray,
        val_embedding: np.ndarray,
        *,
        neighbors: int = 5,
        coverage: float = 0.95,
        encoder_state: Mapping[str, np.ndarray] | None = None,
    ) -> NoveltyReference:
        """The reference of a classifier from the (n_ref, h) embeddings of the training cells it keeps (chosen with
        :func:`reference_choice`) and its (n_val, h) validation cells, both read by the backbone of
        ``encoder_state`` (None: the classifier's own). The threshold is the ``coverage`` quantile of the validation
        cells' novelty; no validation cell is a reference cell, so it measures how far new cells of the known types
        lie.

        Raises:
            ValueError: ``coverage`` outside (0, 1], fewer training cells than ``neighbors``, no validation cells, or
                non-finite embeddings.
        """
        if not 0 < coverage <= 1:
            raise ValueError(f"calibration.coverage must lie in (0, 1], got {coverage}")
        if len(val_embedding) == 0:
            raise ValueError("a novelty threshold needs validation cells; the validation split is empty")
        if not (np.isfinite(train_embedding).all() and np.isfinite(val_embedding).all()):
            raise ValueError("the cell embeddings of the novelty reference hold NaN or infinite values")
        unset = cls(np.ascontiguousarray(train_embedding, dtype=np.float32), neighbors, np.inf, coverage, encoder_state)
        return replace(unset, threshold=float(np.quantile(unset.scores(val_embedding), coverage)))

    def encoder(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The backbone that reads the cells whose novelty :meth:`scores` judges, for the classifier ``model``: None
        for the classifier's own embedding, else :func:`backbone_with_weights` of :attr:`encoder_state`."""
        if self.encoder_state is None:
            return None
        source = f"the novelty reference's encoder: re-run the fine-tuning that wrote {NOVELTY_FILE}"
        return backbone_with_weights(model, self.encoder_state, source)

    def scores(self, embedding: np.ndarray) -> np.ndarray:
        """(n,) novelty of (n, h) cell embeddings: the distance to the ``neighbors``-th nearest reference cell; NaN
        for rows holding NaN (cells that could not be embedded)."""
        embedding = np.asarray(embedding, dtype=np.float32)
        if embedding.ndim != 2 or embedding.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"cell embeddings of shape {embedding.shape} do not match the novelty reference's width "
                f"{self.embeddings.shape[1]}"
            )
        scores = np.full(len(embedding), np.nan)
        finite = np.isfinite(embedding).all(axis=1)
        if finite.any():
            index = NearestNeighbors(n_neighbors=self.neighbors).fit(self.embeddings)
            distances, _ = index.kneighbors(embedding[finite])  # (n_finite, neighbors), ascending
            scores[finite] = distances[:, -1]
        return scores

    def save(self, path: str | os.PathLike) -> Path:
        """Write the reference to the safetensors file ``path`` (settings in its metadata)."""
        path = Path(path)
        metadata = {
            "neighbors": str(self.neighbors),
            "threshold": repr(self.threshold),
            "coverage": repr(self.coverage),
            "space": self.space,
        }
        encoder = {_ENCODER_PREFIX + name: np.ascontiguousarray(a) for name, a in (self.encoder_state or {}).items()}
        save_file({"embeddings": self.embeddings, **encoder}, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> NoveltyReference | None:
        """The reference stored in an export folder, or None when it holds none (a model that is not an annotation
        model, or one fine-tuned before references existed)."""
        path = Path(directory) / NOVELTY_FILE
        if not path.is_file():
            return None
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
        try:
            neighbors, threshold, coverage = (metadata[key] for key in ("neighbors", "threshold", "coverage"))
        except KeyError as missing:
            raise ValueError(f"{path} lacks the setting {missing} in its metadata: re-run the fine-tuning") from None
        tensors = load_file(str(path))
        encoder = {name[len(_ENCODER_PREFIX) :]: a for name, a in tensors.items() if name.startswith(_ENCODER_PREFIX)}
        if (metadata.get("space", "classifier") == "pretrained") != bool(encoder):
            raise ValueError(f"{path}: its space and its encoder weights disagree: re-run the fine-tuning")
        return cls(tensors["embeddings"], int(neighbors), float(threshold), float(coverage), encoder or None)


def reference_choice(n_cells: int, max_cells: int, seed: int) -> np.ndarray:
    """The sorted rows of ``n_cells`` training cells a reference keeps: all of them, or a seeded random
    ``max_cells`` of them (the reference travels in the export, and a query's cost grows with it)."""
    if max_cells < 1:
        raise ValueError(f"calibration.novelty_reference_cells must be at least 1, got {max_cells}")
    if n_cells <= max_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, max_cells, replace=False))


def backbone_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """A CPU copy of ``model``'s backbone weights (name -> array, as ``model.base_model.state_dict()`` names them;
    floats as float32, so half-precision weights convert too), for :func:`backbone_with_weights`."""
    state = model.base_model.state_dict()
    return {
        name: (t.float() if t.is_floating_point() else t).detach().cpu().numpy().copy() for name, t in state.items()
    }


def backbone_with_weights(
    model: torch.nn.Module,
    state: Mapping[str, np.ndarray],
    source: str,
) -> torch.nn.Module:
    """A new backbone of ``model``'s architecture (its config) holding the weights ``state`` (name -> array, as
    ``model.base_model.state_dict()`` names them), in eval mode, on ``model``'s device, with ``model``'s tokenizer.
    ``source`` names where the weights came from and what to do when they do not fit, for the error.

    Raises:
        ValueError: the weights do not fit the architecture (names the mismatching tensors and ``source``).
    """
    from sc_foundation.models.modeling import ScFoundationModel

    encoder = ScFoundationModel(model.config)
    missing, unexpected = encoder.load_state_dict(
        {name: torch.from_numpy(np.asarray(array)) for name, array in state.items()}, strict=False
    )
    if missing or unexpected:
        raise ValueError(
            f"weights that do not fit this model (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}) "
            f"from {source}"
        )
    encoder.gene_tokenizer = getattr(model, "gene_tokenizer", None)
    return encoder.to(next(model.parameters()).device).eval()
