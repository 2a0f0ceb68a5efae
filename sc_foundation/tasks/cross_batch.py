"""Cross-batch neighbour attraction for ``task=integration``: each training cell is pulled towards the cells of other
batches that are its mutual nearest neighbours (MNN, Haghverdi et al. 2018) in the model's own current embedding.

Why mutual neighbours: a cell type present in one batch only has no mutual neighbour in the others (its nearest
cells there are another type, whose nearest cells are not it), so it gets no target and is not pulled into a type
it does not belong to. A global correction (centring each batch) has no such guard: on CellBench with one cell line
thinned to 15% in each protocol, centring the fine-tuned embedding per batch lowered scIB total (0.773 to 0.753),
while the mutual neighbours in it still matched cell lines for 90-96% of pairs (BENCHMARKS.md, "Integration across
protocols").

The targets are recomputed at the start of every training epoch from an eval-mode pass over all cells, so they follow
the embedding as it mixes; the model's loss term (``config.cross_batch_weight``) reads them as the per-cell batch key
``cross_batch_targets``.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.neighbors import NearestNeighbors

from .common import predict


def mutual_neighbour_targets(embedding: np.ndarray, batches: np.ndarray, neighbours: int) -> np.ndarray:
    """Each cell's target: the mean embedding of its mutual nearest neighbours in the other batches.

    Neighbours are by cosine distance (MNN's convention: a batch that scales a cell's profile does not move it), found
    for every pair of batches; a cell's partners from all other batches are averaged.

    Args:
        embedding: (n, d) float, the cells to pair (for example the training cells).
        batches: (n,) the batch of each cell (ids or names); two or more distinct values.
        neighbours: k, the neighbours searched on each side.
    Returns:
        (n, d) float32 targets; NaN rows for cells without a mutual neighbour.
    Raises:
        ValueError: ``neighbours`` below 1, or fewer than two batches.
    """
    if neighbours < 1:
        raise ValueError(f"cross_batch_neighbors must be at least 1, got {neighbours}")
    if len(np.unique(batches)) < 2:
        raise ValueError("mutual neighbours across batches need two or more batches")
    x = np.asarray(embedding, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    batches = np.asarray(batches)
    sums = np.zeros_like(x)
    counts = np.zeros(len(x))
    groups = [np.flatnonzero(batches == value) for value in np.unique(batches)]
    for i, first in enumerate(groups):
        for second in groups[i + 1 :]:
            pairs = _mutual_pairs(x[first], x[second], neighbours)  # (m, 2) rows into first, second
            a, b = first[pairs[:, 0]], second[pairs[:, 1]]
            np.add.at(sums, a, embedding[b])
            np.add.at(sums, b, embedding[a])
            np.add.at(counts, a, 1)
            np.add.at(counts, b, 1)
    targets = np.full_like(x, np.nan)
    paired = counts > 0
    targets[paired] = sums[paired] / counts[paired, None]
    return targets


def _mutual_pairs(first: np.ndarray, second: np.ndarray, neighbours: int) -> np.ndarray:
    """(m, 2) index pairs (row of ``first``, row of ``second``) that are among each other's ``neighbours`` nearest;
    both (n, d) unit vectors, so Euclidean order is cosine order."""
    k_second, k_first = min(neighbours, len(second)), min(neighbours, len(first))
    into_second = NearestNeighbors(n_neighbors=k_second).fit(second).kneighbors(first, return_distance=False)
    into_first = NearestNeighbors(n_neighbors=k_first).fit(first).kneighbors(second, return_distance=False)
    n_second = len(second)
    # Each pair as one code, i * n_second + j: the mutual pairs are the codes found from both sides.
    forward = np.arange(len(first))[:, None] * n_second + into_second  # (n_first, k_second)
    backward = into_first * n_second + np.arange(n_second)[:, None]  # (n_second, k_first)
    mutual = np.intersect1d(forward, backward)
    return np.stack([mutual // n_second, mutual % n_second], axis=1)


class CrossBatchTargets(pl.Callback):
    """Refreshes ``targets`` (the per-cell array that the datamodule hands to the model as ``cross_batch_targets``) at
    the start of every training epoch: the training cells' mutual-neighbour targets in the current embedding, NaN
    elsewhere.

    Args:
        targets: (n_store_cells, d) float32, shared with the datamodule (in shared memory, so that loader worker
            processes see each refresh).
        batch_ids: (n_store_cells,) each cell's batch.
        train_rows: store rows of the training cells; only they get targets and serve as partners.
        neighbours: k of the mutual-neighbour search.
        start_epoch: the first epoch with targets; before it every target is NaN (no pull), so that the pairs are
            first sought in an embedding the decoder and the discriminator have already made less batch-bound.
    """

    def __init__(
        self,
        targets: np.ndarray,
        batch_ids: np.ndarray,
        train_rows: np.ndarray,
        neighbours: int,
        start_epoch: int = 0,
    ):
        self.targets = targets
        self.batch_ids = np.asarray(batch_ids)
        self.train_rows = np.sort(np.asarray(train_rows))
        self.neighbours = neighbours
        self.start_epoch = start_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.start_epoch:
            return
        model = pl_module.model
        was_training = model.training
        try:
            with torch.no_grad():
                loader = trainer.datamodule.cells_dataloader(self.train_rows)
                embedding, cells = predict(model, loader, "cell_embedding")
        finally:
            model.train(was_training)
        embedding = embedding[np.argsort(cells)]  # (n_train, d), in the order of the sorted train_rows
        self.targets[:] = np.nan
        self.targets[self.train_rows] = mutual_neighbour_targets(
            embedding, self.batch_ids[self.train_rows], self.neighbours
        )


def shared_targets(n_cells: int, width: int) -> np.ndarray:
    """A (n_cells, width) float32 NaN array in shared memory: written by :class:`CrossBatchTargets` in the main
    process, read by loader workers forked from it."""
    return torch.full((n_cells, width), float("nan")).share_memory_().numpy()
