"""Views of a cell that differ as two technical batches of it would: in sequencing depth and in per-gene capture.

The contrastive objective pulls two views of each cell together. When the views differ only in which genes they
show, nothing asks the embedding to ignore what really separates plates and protocols: a plate sequenced less deeply
loses its cells' weakest genes and moves every value (log1p of counts per 10k is not depth-invariant at low counts),
and a plate's chemistry captures some genes better than others (scVI models this as a per-gene factor of each batch).
:class:`TechnicalViews` gives each view its own such batch, from the counts the store's values encode:

* ``depth=(low, high)``: each view keeps a share ``p`` of each cell's molecules, ``p`` drawn per cell and view
  uniformly in ``[low, high]``; each gene's count is binomially thinned (``Binomial(count, p)``), as sequencing fewer
  reads would, and genes left at zero leave the view;
* ``gene_scale=sigma``: each view multiplies every gene's expression by ``exp(N(0, sigma^2))``, one factor per gene
  shared by all cells of that view in the batch (a synthetic batch: the batch's other cells, the contrastive
  negatives, carry the same factors, so only the cell's own identity can match its two views).

The values are then normalised again (counts per ``target_sum`` of the thinned, scaled cell) and log1p-transformed, so
a view is what the tokenizer would have made of that cell in that batch. Needs the ``continuous`` encoding (the counts
are recovered exactly from its values and each cell's stored total).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class TechnicalViews:
    """Per-view values and kept tokens of a padded pretraining batch (see the module docstring).

    Args:
        n_counts: (n_store_cells,) each cell's total counts, the library its values were normalised by.
        target_sum: counts per cell of the normalisation (the tokenizer's ``target_sum``).
        depth: ``(low, high)`` share of molecules each view keeps, ``0 < low <= high <= 1``; None keeps all.
        gene_scale: standard deviation of each gene's log capture factor per view; 0 for none.
        seed: with the epoch and the batch's cells, fixes every draw (same seed, same views).
    """

    n_counts: np.ndarray
    target_sum: float
    depth: Sequence[float] | None = None
    gene_scale: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.depth is not None:
            low, high = self.depth
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"view_depth must be (low, high) with 0 < low <= high <= 1, got {self.depth}.")
        if self.gene_scale < 0:
            raise ValueError(f"view_gene_scale must be >= 0, got {self.gene_scale}.")
        self.n_counts = np.asarray(self.n_counts, dtype=np.float64)

    def __call__(
        self,
        input_ids: np.ndarray,
        values: np.ndarray,
        genes: np.ndarray,
        mask: np.ndarray,
        view_masks: np.ndarray,
        cell_index: np.ndarray,
        epoch: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The views' values and kept tokens.

        Args:
            input_ids, values, genes, mask: (B, L) token ids, true values (before masking), gene-token flags (real
                tokens that are not special, such as ``<cls>``, which keep their value) and masked-token flags of a
                padded batch.
            view_masks: (2, B, L) bool, the tokens each view keeps before this augmentation.
            cell_index: (B,) store index of each cell.
            epoch: the sampler's epoch.

        Returns:
            ``view_values`` (2, B, L) float32, each view's log1p values (0 at its masked and dropped tokens), and
            ``view_masks`` (2, B, L) bool, without the genes a view thinned to zero. A masked token stays (its value is
            hidden anyway and it is scored in both views); every cell keeps at least one gene token.
        """
        counts, outside = recover_counts(values, genes, self.n_counts[cell_index], self.target_sum)
        out_values = np.zeros((2, *values.shape), dtype=np.float32)
        out_masks = view_masks.copy()
        for view in (0, 1):
            rng = np.random.default_rng([self.seed, 11 + view, epoch, *cell_index.astype(np.uint64).tolist()])
            kept, rest = counts, outside
            if self.depth is not None:
                share = rng.uniform(*self.depth, size=len(counts))  # (B,)
                kept, rest = thin_counts(counts, outside, share, rng)
            total = kept.sum(1) + rest  # (B,) molecules of the thinned cell
            expression = kept
            if self.gene_scale > 0:
                factors = np.exp(rng.normal(0.0, self.gene_scale, size=int(input_ids.max()) + 1))
                expression = kept * factors[input_ids]
                # The cell's library grows or shrinks with its context genes' factors; the rest keeps factor 1.
                total = expression.sum(1) + rest
            present = genes & (kept > 0)
            logged = np.where(present & ~mask, log_normalise(expression, total, self.target_sum), 0.0)
            out_values[view] = np.where(genes, logged, values)
            keep = view_masks[view] & (present | mask | ~genes)
            # A cell whose view lost every gene token keeps the tokens and values it had before thinning.
            empty = ~(keep & genes).any(1)
            keep[empty] = view_masks[view][empty]
            out_values[view][empty] = np.where(mask[empty], 0.0, values[empty])
            out_masks[view] = keep
        return out_values, out_masks


def recover_counts(
    values: np.ndarray, genes: np.ndarray, library: np.ndarray, target_sum: float
) -> tuple[np.ndarray, np.ndarray]:
    """The counts behind continuous values: ``(B, L)`` float64 counts of the gene tokens (0 elsewhere), exact for
    integer counts, and ``(B,)`` each cell's molecules outside its tokens (genes beyond its context).

    Args:
        values: (B, L) log1p(counts per ``target_sum``) values; genes: (B, L) bool, the gene tokens among them;
        library: (B,) the totals the cells were normalised by (the store's ``n_counts``).
    """
    counts = np.where(genes, np.rint(np.expm1(values.astype(np.float64)) * library[:, None] / target_sum), 0)
    outside = np.maximum(np.rint(library) - counts.sum(1), 0)
    return counts, outside


def thin_counts(
    counts: np.ndarray, outside: np.ndarray, share: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's molecules kept with probability ``share`` (B,), as sequencing fewer reads would: every gene's
    count (B, L) and the molecules outside the tokens (B,) binomially thinned."""
    kept = rng.binomial(counts.astype(np.int64), share[:, None]).astype(np.float64)
    rest = rng.binomial(outside.astype(np.int64), share).astype(np.float64)
    return kept, rest


def log_normalise(expression: np.ndarray, total: np.ndarray, target_sum: float) -> np.ndarray:
    """log1p of ``expression`` (B, L) per ``target_sum`` of each cell's ``total`` (B,) (0 for an empty cell)."""
    scale = np.divide(target_sum, total, out=np.zeros_like(total), where=total > 0)
    return np.log1p(expression * scale[:, None])
