"""From a corpus store to training batches: splits, length-grouped DDP-aware batch sampling, masking, DataModule.

Batches are assembled whole: the sampler yields ``(epoch, cell indices)`` and the dataset turns that into a dict of
ready tensors in one call (slice copies out of the memory-mapped store), so no per-cell Python collation runs.
Everything random is a function of the seed, the epoch and the cell, never of worker scheduling: the same seed gives
the same batches and the same masks, with or without workers, on any number of ranks.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler

from sc_foundation.data.lifetime import die_with_parent
from sc_foundation.data.store import CorpusStore
from sc_foundation.data.technical_views import TechnicalViews, log_normalise, recover_counts, thin_counts
from sc_foundation.data.tokenization import hash_uniform


def _group_codes(store: CorpusStore, column: str) -> np.ndarray:
    """(n_cells,) int64 group code of each cell from an obs column."""
    if column not in store.obs.columns:
        raise ValueError(
            f"split by {column!r}: not a column of the store's obs; columns: {list(store.obs.columns)}. "
            "Add it with build_store(obs_keys=[...])."
        )
    return np.unique(store.obs[column].astype(str).to_numpy(), return_inverse=True)[1]


def _hold_out_groups(codes: np.ndarray, fraction: float, rng: np.random.Generator, column: str) -> np.ndarray:
    """(n,) bool: whole groups of ``codes`` (n,) held out, drawn at random until they hold about ``fraction`` of the
    cells (at most twice that, or the smallest group when every group is larger)."""
    sizes = np.bincount(codes)
    target = fraction * len(codes)
    chosen, total = [], 0
    # Random groups until the target is reached, skipping any that would overshoot it more than twofold; if
    # every group is that large, the smallest one.
    for g in rng.permutation(len(sizes)):
        if total >= target:
            break
        if sizes[g] > 0 and total + sizes[g] <= 2 * target:
            chosen.append(g)
            total += sizes[g]
    if fraction > 0 and not chosen:
        present = np.flatnonzero(sizes)
        chosen = [int(present[np.argmin(sizes[present])])]
    if len(chosen) == np.count_nonzero(sizes):
        raise ValueError(
            f"split by {column!r}: {np.count_nonzero(sizes)} group(s), too few to hold out {fraction:.0%} of the "
            "cells and keep any for training. Split by another column or by cell."
        )
    return np.isin(codes, chosen)


def split_cells(
    store: CorpusStore, val_fraction: float, seed: int = 0, group_by: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of a store's cells.

    Args:
        val_fraction: share of cells for validation (0 gives an empty validation split).
        group_by: obs column (``source``, ``batch``, a donor column...): whole groups go to one side, drawn at random
            until the validation side holds about ``val_fraction`` of the cells (at most twice that, or the smallest
            group when every group is larger).
    Returns:
        (n_train,) and (n_val,) sorted int64 cell indices.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}.")
    n = len(store)
    rng = np.random.default_rng(seed)
    is_val = np.zeros(n, dtype=bool)
    if group_by is None:
        is_val[rng.permutation(n)[: round(val_fraction * n)]] = True
    else:
        is_val = _hold_out_groups(_group_codes(store, group_by), val_fraction, rng, group_by)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def split_train_val_test(
    store: CorpusStore,
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    *,
    labels: np.ndarray | None = None,
    group_by: str | None = None,
    test_groups: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded three-way split of a store's cells, for fine-tuning and evaluating on held-out cells.

    Args:
        val_fraction, test_fraction: shares of all cells for validation and test (each > 0).
        labels: (n_cells,) class of each cell; with it a split by cell is stratified (every split keeps the class
            proportions; scikit-learn's ``train_test_split``). Classes too rare to reach every split (fewer than 3
            cells) are pooled into one stratum, since scikit-learn refuses to stratify a class of one cell.
        group_by: obs column whose groups go whole to one split (the test groups first, then the validation groups
            from the rest, as in :func:`split_cells`); excludes stratification.
        test_groups: with ``group_by``, the values of that column whose cells form the test split (a shift split:
            train on one protocol, library or study, test on another); the other cells are split into train and
            validation by cell (stratified by ``labels`` when given, ``val_fraction`` of those cells), so model
            selection never sees the shifted cells. ``test_fraction`` is then unused.
    Returns:
        ``{"train", "val", "test"}`` -> sorted int64 store indices.
    """
    if test_groups is not None:
        return _shift_split(store, val_fraction, seed, labels, group_by, test_groups)
    if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
        raise ValueError(f"need val_fraction, test_fraction > 0 summing below 1, got {val_fraction}, {test_fraction}")
    cells = np.arange(len(store))
    if group_by is not None:
        rng = np.random.default_rng(seed)
        codes = _group_codes(store, group_by)
        is_test = _hold_out_groups(codes, test_fraction, rng, group_by)
        rest = cells[~is_test]
        is_val = _hold_out_groups(codes[rest], val_fraction / (1 - test_fraction), rng, group_by)
        return {"train": rest[~is_val], "val": rest[is_val], "test": cells[is_test]}
    strata = None if labels is None else _strata(labels, 3)
    rest, test = train_test_split(cells, test_size=test_fraction, random_state=seed, stratify=strata)
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        random_state=seed,
        stratify=None if labels is None else _strata(labels[rest], 2),
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _shift_split(
    store: CorpusStore,
    val_fraction: float,
    seed: int,
    labels: np.ndarray | None,
    group_by: str | None,
    test_groups: Sequence[str],
) -> dict[str, np.ndarray]:
    """:func:`split_train_val_test` with named test groups: the cells of ``test_groups`` (values of ``group_by``) are
    the test split; the rest are split into train and validation by cell."""
    if group_by is None:
        raise ValueError("test_groups needs split_by (the obs column whose values they name), e.g. split_by=batch")
    if not 0 < val_fraction < 1:
        raise ValueError(f"need 0 < val_fraction < 1, got {val_fraction}")
    _group_codes(store, group_by)  # refuses a missing column with the columns listed
    values = store.obs[group_by].astype(str).to_numpy()
    test_groups = [str(group) for group in test_groups]
    present = sorted(set(values))
    unknown = sorted(set(test_groups) - set(present))
    if unknown:
        raise ValueError(f"test_groups {unknown} are not values of {group_by!r}; its values: {present}")
    is_test = np.isin(values, test_groups)
    if is_test.all():
        raise ValueError(f"test_groups {test_groups} hold every cell: keep at least one {group_by!r} for training")
    cells = np.arange(len(store))
    rest = cells[~is_test]
    train, val = train_test_split(
        rest,
        test_size=val_fraction,
        random_state=seed,
        stratify=None if labels is None else _strata(labels[rest], 2),
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": cells[is_test]}


def _strata(labels: np.ndarray, minimum: int) -> np.ndarray:
    """(n,) stratum of each cell: its class, or one pooled stratum for the classes of fewer than ``minimum`` cells
    (joined to the largest class when the pool itself is that small)."""
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rare = counts[codes] < minimum
    strata = np.where(rare, -1, codes)
    if 0 < rare.sum() < minimum:
        strata[rare] = np.argmax(counts)
    return strata


class CellBatchSampler(Sampler):
    """Yields ``(epoch, cell indices)`` batches, shuffled per epoch, grouped by length, disjoint across ranks.

    Length grouping: the epoch's shuffled cells are cut into mega-batches of ``batch_size * mega_batch_factor``,
    each sorted by length and cut into batches, and the batch order is shuffled. Cells of similar length share a
    batch (little padding) while batches stay random. Each rank takes every ``num_replicas``-th batch; trailing
    batches that cannot be shared out evenly are dropped for the epoch, so all ranks run the same number of steps
    and no cell is seen by two ranks.

    With ``weights``, an epoch is instead ``n`` cells drawn with replacement, each with probability proportional to
    its weight (seeded by the seed and the epoch, the same on every rank), then grouped and cut the same way:
    balanced sampling across inputs of very different sizes (:func:`source_balance_weights`).

    Args:
        indices: (n,) cell indices of this split.
        lengths: (n_store_cells,) tokens per cell of the whole store.
        weights: (n_store_cells,) non-negative sampling weight of every store cell, or None to take each cell of the
            split once per epoch.
        num_replicas, rank: DDP world size and rank; by default read from ``torch.distributed`` when initialised.
    """

    def __init__(
        self,
        indices: np.ndarray,
        lengths: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = True,
        group_by_length: bool = True,
        mega_batch_factor: int = 50,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        weights: np.ndarray | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.lengths = np.asarray(lengths)
        self.probabilities = None
        if weights is not None:
            chosen = np.asarray(weights, dtype=np.float64)[self.indices]
            if (chosen < 0).any() or not np.isfinite(chosen).all() or chosen.sum() <= 0:
                raise ValueError("sampling weights must be finite, non-negative and not all zero")
            self.probabilities = chosen / chosen.sum()
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.mega_batch_factor = mega_batch_factor
        self.drop_last = drop_last
        self.seed = seed
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        self.skip_batches = 0

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        dist = torch.distributed
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch: a new shuffle and new masks, the same on every rank."""
        self.epoch = epoch

    def batches(self) -> list[np.ndarray]:
        """All batches of the current epoch, every rank's, in order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.probabilities is not None:
            order = rng.choice(self.indices, size=len(self.indices), replace=True, p=self.probabilities)
        else:
            order = rng.permutation(self.indices) if self.shuffle else self.indices
        if self.group_by_length:
            size = self.batch_size * self.mega_batch_factor
            mega = [order[i : i + size] for i in range(0, len(order), size)]
            order = np.concatenate([m[np.argsort(-self.lengths[m], kind="stable")] for m in mega] or [order])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        batches = self.batches()
        usable = len(batches) // self.num_replicas * self.num_replicas
        # A run resumed mid-epoch skips the batches it already trained on (once; see CorpusDataModule).
        skip, self.skip_batches = self.skip_batches, 0
        for batch in batches[self.rank : usable : self.num_replicas][skip:]:
            yield self.epoch, batch

    def __len__(self) -> int:
        n = len(self.indices) // self.batch_size if self.drop_last else math.ceil(len(self.indices) / self.batch_size)
        return n // self.num_replicas

    def padding_fraction(self) -> float:
        """Share of padded token slots over the current epoch's batches (padding to the longest cell)."""
        real = padded = 0
        for batch in self.batches():
            lengths = self.lengths[batch]
            real += int(lengths.sum())
            padded += int(lengths.max()) * len(batch)
        return 1.0 - real / max(padded, 1)


def source_balance_weights(sources: Sequence, power: float) -> np.ndarray:
    """(n_cells,) sampling weight of each cell, ``n_s ** -power`` for a cell of an input (source) of ``n_s`` cells.

    ``power`` 0 samples every cell alike (an input's share of the batches is its share of the cells); 1 gives every
    input the same share, however small; in between (0.5: shares proportional to ``sqrt(n_s)``) the large inputs
    still lead without drowning the small ones.
    """
    if not 0 <= power <= 1:
        raise ValueError(f"source_balance must be in [0, 1], got {power}")
    _, codes, counts = np.unique(np.asarray(sources).astype(str), return_inverse=True, return_counts=True)
    return counts[codes].astype(np.float64) ** -power


@dataclass
class MaskingCollator:
    """Chooses the masked positions of a pretraining batch, reproducibly.

    Each real gene token (not ``<cls>``, not padding) is masked with probability ``mask_ratio``, decided by a hash of
    (seed, epoch, cell index, position), and every cell gets at least one masked token.

    * ``objective="value"`` (binned, continuous): ``labels`` (B, L) float32 holds the true value at masked positions
      and the value there is zeroed in ``values``; the model swaps in its mask-value embedding where ``mask``.
    * ``objective="gene"`` (rank, Geneformer): ``labels`` (B, L) int64 holds the true gene id at masked positions and
      -100 elsewhere; of the masked tokens 80% become ``<mask>``, 10% a random gene and 10% stay (BERT).

    With ``view_keep=(low, high)`` it also draws two views of each cell for the contrastive objective:
    ``view_masks`` (2, B, L) bool, True at the tokens a view keeps. Each view keeps each gene token with a
    probability drawn per cell and view uniformly in [low, high], from the same kind of hash, so views differ in how
    many genes they show as well as which; special tokens are always kept, and so is at least one gene token per
    cell. With ``technical`` (a :class:`~sc_foundation.data.technical_views.TechnicalViews`) each view is moreover
    read as another technical batch would have measured the cell (thinner, with other per-gene capture):
    ``view_values`` (2, B, L) float32 then holds each view's values.
    """

    mask_ratio: float
    objective: str
    mask_id: int
    special_ids: Sequence[int]
    vocab_size: int
    seed: int = 0
    view_keep: tuple[float, float] | None = None
    technical: TechnicalViews | None = None

    def __post_init__(self) -> None:
        if self.technical is not None and self.view_keep is None:
            raise ValueError(
                "technical views (data.loader.view_depth, view_gene_scale) change the contrastive views, and there are "
                "none: set data.loader.view_keep, or view_depth=null and view_gene_scale=0"
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}.")
        if self.view_keep is not None:
            low, high = self.view_keep
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"view_keep must be (low, high) with 0 < low <= high <= 1, got {self.view_keep}.")
        if self.objective not in ("value", "gene"):
            raise ValueError(f"objective must be 'value' or 'gene', got {self.objective!r}.")
        self._special = np.asarray(sorted(self.special_ids), dtype=np.int64)
        is_gene = np.ones(self.vocab_size, dtype=bool)
        is_gene[self._special] = False
        self._gene_ids = np.flatnonzero(is_gene)

    def __call__(self, batch: dict[str, np.ndarray], epoch: int) -> dict[str, np.ndarray]:
        """Add ``mask`` and ``labels`` to a padded (B, L) or packed (1, T) batch; same shapes as ``input_ids``."""
        ids = batch["input_ids"]
        segment, position, real, starts = _token_layout(batch)
        flat_ids = ids.ravel()
        maskable = real & ~np.isin(flat_ids, self._special)
        cells = batch["cell_index"].astype(np.uint64)[segment]
        positions = position.astype(np.uint64)
        u = np.where(maskable, hash_uniform(np.uint64(self.seed), np.uint64(epoch), cells, positions), 2.0)
        mask = u < self.mask_ratio
        # At least one masked token per cell that has any gene token: its first token with the smallest draw.
        smallest = np.minimum.reduceat(u, starts)
        hits = np.flatnonzero((u == smallest[segment]) & maskable)
        mask[hits[np.r_[True, np.diff(segment[hits]) != 0]]] = True
        out = dict(batch)
        out["mask"] = mask.reshape(ids.shape)
        if self.objective == "value":
            values = batch["values"].ravel()
            out["labels"] = np.where(mask, values, 0.0).astype(np.float32).reshape(ids.shape)
            out["values"] = np.where(mask, 0.0, values).astype(np.float32).reshape(ids.shape)
        else:
            out["labels"] = np.where(mask, flat_ids, -100).reshape(ids.shape)
            # Two more draws from the same hash decide mask / random / keep and which random gene.
            action = hash_uniform(np.uint64(self.seed + 1), np.uint64(epoch), cells, positions)
            pick = hash_uniform(np.uint64(self.seed + 2), np.uint64(epoch), cells, positions)
            random_gene = self._gene_ids[(pick * len(self._gene_ids)).astype(np.int64)]
            new_ids = np.where(action < 0.8, self.mask_id, np.where(action < 0.9, random_gene, flat_ids))
            out["input_ids"] = np.where(mask, new_ids, flat_ids).reshape(ids.shape)
        if self.view_keep is not None:
            if "cu_seqlens" in batch:
                raise ValueError("views of cells need padded batches: set data.loader.pack=false")
            out["view_masks"] = np.stack(
                [self._view(view, epoch, cells, positions, maskable, segment, starts) for view in (0, 1)]
            ).reshape(2, *ids.shape)
            if self.technical is not None:
                out["view_values"], out["view_masks"] = self.technical(
                    ids,
                    batch["values"],
                    maskable.reshape(ids.shape),
                    out["mask"],
                    out["view_masks"],
                    batch["cell_index"],
                    epoch,
                )
        return out

    def _view(self, view, epoch, cells, positions, maskable, segment, starts) -> np.ndarray:
        """(n_tokens,) bool, the flattened tokens that view number ``view`` keeps (see the class docstring)."""
        low, high = self.view_keep
        salt = np.uint64(self.seed + 3 + view)
        cell_draw = hash_uniform(salt, np.uint64(epoch), cells[starts])  # one keep-probability per cell
        keep_probability = low + (high - low) * cell_draw[segment]
        u = np.where(maskable, hash_uniform(salt, np.uint64(epoch), cells, positions), 2.0)
        keep = (u < keep_probability) | ~maskable
        # At least one gene token per cell: its token with the smallest draw.
        smallest = np.minimum.reduceat(u, starts)
        hits = np.flatnonzero((u == smallest[segment]) & maskable)
        keep[hits[np.r_[True, np.diff(segment[hits]) != 0]]] = True
        return keep


@dataclass
class TokenDropout:
    """Training augmentation for fine-tuning: each cell shows a random subset of its gene tokens, anew each epoch.

    Each gene token (not a special token such as ``<cls>``) is dropped with probability ``rate``, decided by a hash
    of (seed, epoch, cell index, position) as :class:`MaskingCollator` does; every cell keeps at least one gene token.
    The kept tokens move to the front of their row and the batch is cut to its new longest cell, so a dropped gene is
    absent, as if the cell had been sequenced less deeply, not masked. A model fine-tuned on a few hundred cells
    otherwise learns those cells' exact gene sets by heart (training loss near zero within 20 epochs on pbmc68k).

    Works on padded batches (``input_ids``, ``values``, ``attention_mask`` (B, L)); per-cell keys pass unchanged.
    """

    rate: float
    special_ids: Sequence[int]
    pad_id: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.rate < 1.0:
            raise ValueError(f"token_dropout must lie in (0, 1), got {self.rate}.")
        self._special = np.asarray(sorted(self.special_ids), dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray], epoch: int) -> dict[str, np.ndarray]:
        """The batch with each row's kept tokens first, (B, L') with L' <= L."""
        _refuse_packed(batch, "token dropout")
        ids, real = batch["input_ids"], batch["attention_mask"]
        width = ids.shape[1]
        droppable = real & ~np.isin(ids, self._special)
        cells = np.repeat(batch["cell_index"].astype(np.uint64), width).reshape(ids.shape)
        positions = np.broadcast_to(np.arange(width, dtype=np.uint64), ids.shape)
        u = np.where(droppable, hash_uniform(np.uint64(self.seed + 5), np.uint64(epoch), cells, positions), -1.0)
        keep = (u >= self.rate) | (real & ~droppable)  # special tokens are always kept, padding never
        # At least one gene token per cell: the one with the largest draw (a cell of special tokens only keeps those).
        best = u.argmax(axis=1)
        has_gene = droppable.any(axis=1)
        keep[np.flatnonzero(has_gene), best[has_gene]] = True
        return kept_tokens_first(batch, keep, self.pad_id)


@dataclass
class DepthThinning:
    """Training augmentation for fine-tuning: each cell as a shallower sequencing run of it would have measured it.

    Each epoch, each training cell keeps a share ``p`` of its molecules, drawn uniformly in ``depth = (low, high)``
    per cell: every gene's count is binomially thinned (the counts are recovered from the continuous values and the
    store's library sizes, :func:`~sc_foundation.data.technical_views.recover_counts`), the values are normalised
    again, and the genes left at zero leave the cell (the batch is compacted as :class:`TokenDropout` does). The
    same cell then reaches the model at many depths with one label, so a query sequenced less deeply than the
    training cells (another protocol or study) is not a new kind of cell to it. A cell thinned to nothing keeps its
    own tokens. Seeded by (seed, epoch, the batch's cells).

    Args:
        library: (n_store_cells,) the totals the store's values were normalised by (its ``n_counts``).
        target_sum: the tokenizer's ``target_sum``.
        depth: ``(low, high)``, ``0 < low <= high <= 1``.
    """

    library: np.ndarray
    target_sum: float
    depth: Sequence[float]
    special_ids: Sequence[int]
    pad_id: int
    seed: int = 0

    def __post_init__(self) -> None:
        low, high = self.depth
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"thin_depth must be (low, high) with 0 < low <= high <= 1, got {tuple(self.depth)}.")
        self.library = np.asarray(self.library, dtype=np.float64)
        self._special = np.asarray(sorted(self.special_ids), dtype=np.int64)

    def __call__(self, batch: dict[str, np.ndarray], epoch: int) -> dict[str, np.ndarray]:
        """The batch with thinned values and without the genes thinned to zero, (B, L') with L' <= L."""
        _refuse_packed(batch, "depth thinning")
        ids, real, cells = batch["input_ids"], batch["attention_mask"], batch["cell_index"]
        genes = real & ~np.isin(ids, self._special)
        counts, outside = recover_counts(batch["values"], genes, self.library[cells], self.target_sum)
        rng = np.random.default_rng([self.seed, 23, epoch, *cells.astype(np.uint64).tolist()])
        kept, rest = thin_counts(counts, outside, rng.uniform(*self.depth, size=len(cells)), rng)
        present = genes & (kept > 0)
        empty = ~present.any(axis=1) & genes.any(axis=1)
        logged = log_normalise(kept, kept.sum(1) + rest, self.target_sum)
        values = np.where(present & ~empty[:, None], logged, batch["values"]).astype(batch["values"].dtype)
        keep = np.where(empty[:, None], real, present | (real & ~genes))
        return kept_tokens_first({**batch, "values": values}, keep, self.pad_id)


def _refuse_packed(batch: dict[str, np.ndarray], what: str) -> None:
    if "cu_seqlens" in batch:
        raise ValueError(f"{what} needs padded batches: set data.loader.pack=false")


def kept_tokens_first(batch: dict[str, np.ndarray], keep: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """A padded batch with each row's ``keep`` (B, L) tokens first, in their order, and cut to its longest row:
    ``input_ids``, ``values`` and ``attention_mask`` (B, L') with L' <= L; the other keys unchanged."""
    order = np.argsort(~keep, axis=1, kind="stable")
    lengths = keep.sum(axis=1)
    new_width = int(lengths.max())
    out = dict(batch)
    for key in ("input_ids", "values"):
        if key in batch:
            out[key] = np.take_along_axis(batch[key], order, axis=1)[:, :new_width]
    out["attention_mask"] = real_now = np.arange(new_width)[None, :] < lengths[:, None]
    out["input_ids"] = np.where(real_now, out["input_ids"], pad_id)
    if "values" in out:
        out["values"] = np.where(real_now, out["values"], 0).astype(batch["values"].dtype)
    return out


def _token_layout(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per flattened token: its cell's row in the batch, its position in the cell, whether it is real (not
    padding); and the first flattened token of each cell. Padded (B, L) and packed (1, T) batches alike."""
    ids = batch["input_ids"]
    if "cu_seqlens" in batch:
        bounds = batch["cu_seqlens"].astype(np.int64)
        lengths = np.diff(bounds)
        segment = np.repeat(np.arange(len(lengths)), lengths)
        position = np.arange(bounds[-1]) - bounds[:-1][segment]
        return segment, position, np.ones(len(segment), dtype=bool), bounds[:-1]
    n_cells, width = ids.shape
    segment = np.repeat(np.arange(n_cells), width)
    position = np.tile(np.arange(width), n_cells)
    return segment, position, batch["attention_mask"].ravel(), np.arange(n_cells) * width


class SharedBatch:
    """Batches packed into one shared-memory buffer, so a worker process hands them over in one transfer.

    DataLoader workers send each tensor of a batch through its own shared-memory segment: a new segment, a file
    descriptor passed over a socket and a mapping in the main process, per tensor and per batch. Here the worker
    copies its batches once into one shared buffer; the main process receives that one segment and takes zero-copy
    views of it (:meth:`batches`). Receiving still costs the main process about 1.5 ms per transfer (unpickling, the
    descriptor handshake, the mapping), whatever its size, so a worker hands over several batches at once
    (:class:`GroupedBatches`).

    Attributes:
        buffer: (n_bytes,) uint8 tensor in shared memory holding every array, each at an 8-byte aligned offset.
        layout: per batch, the (key, numpy dtype string, shape, byte offset) of each of its arrays.
    """

    def __init__(self, batches: Sequence[Mapping[str, np.ndarray]]):
        layout, offset = [], 0
        for arrays in batches:
            entries = []
            for key, array in arrays.items():
                offset = -(-offset // 8) * 8  # aligned, so that int64 and float32 views of the bytes are valid
                entries.append((key, array.dtype.str, array.shape, offset))
                offset += array.nbytes
            layout.append(entries)
        self.buffer = torch.empty(offset, dtype=torch.uint8).share_memory_()
        for entries, arrays in zip(layout, batches, strict=True):
            for (_, dtype, shape, start), array in zip(entries, arrays.values(), strict=True):
                self._view(start, dtype, shape)[...] = array
        self.layout = layout

    def _view(self, start: int, dtype: str, shape: tuple) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        return self.buffer.numpy()[start:].view(np.uint8)[: count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """The batches as dicts of tensors: views of the one buffer (no copy)."""
        return [
            {key: torch.from_numpy(self._view(start, dtype, shape)) for key, dtype, shape, start in entries}
            for entries in self.layout
        ]

    def pin_memory(self) -> SharedBatch:
        """Called by the DataLoader's pinning thread (``pin_memory=True``): the same layout in pinned memory."""
        pinned = object.__new__(SharedBatch)
        pinned.buffer, pinned.layout = self.buffer.pin_memory(), self.layout
        return pinned


class GroupedBatches(Sampler):
    """A :class:`CellBatchSampler`'s batches in groups of ``size`` consecutive ones: the items of a DataLoader with
    workers, each of which assembles a whole group and hands it over at once (:class:`SharedBatch`).

    The batches and their order are the inner sampler's; ``len`` counts groups. Sampling settings (``seed``,
    ``indices``, ``batch_size``, ``skip_batches``, ``set_epoch``) are the inner sampler's.
    """

    def __init__(self, inner: CellBatchSampler, size: int):
        if size < 1:
            raise ValueError(f"worker_batches must be positive, got {size}.")
        self.inner, self.size = inner, size

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (a copy being built): no recursion into the missing attribute
            raise AttributeError(name)
        return getattr(self.inner, name)  # seed, indices, batch_size, set_epoch, ...

    def __iter__(self) -> Iterator[list[tuple[int, np.ndarray]]]:
        group = []
        for item in self.inner:
            group.append(item)
            if len(group) == self.size:
                yield group
                group = []
        if group:
            yield group

    def __len__(self) -> int:
        return math.ceil(len(self.inner) / self.size)


class StoreBatchDataset(Dataset):
    """Map-style dataset whose items are whole batches: ``dataset[(epoch, indices)]`` -> dict of tensors (in a
    DataLoader worker process, a :class:`SharedBatch`, which the module's loaders unpack into that dict).

    Padded batches (default) hold ``input_ids`` (B, L) int64, ``values`` (B, L) float32, ``attention_mask`` (B, L)
    bool and ``cell_index`` (B,); packed batches hold ``input_ids``/``values`` (1, T), ``cu_seqlens`` (B + 1,) int32
    and ``max_seqlen``. With a :class:`MaskingCollator`, ``mask`` and ``labels`` are added. ``per_cell`` maps batch
    keys to (n_store_cells,) arrays of per-cell targets (``labels``: class ids for annotation; ``batch_ids`` for
    integration); each key then holds the batch's cells' entries, (B,), looked up by ``cell_index``. Per-cell
    ``labels`` and the collator's token labels exclude each other. ``augment`` (training loaders only: e.g.
    :class:`DepthThinning`, then :class:`TokenDropout`) changes each batch before masking, in its order.
    """

    def __init__(
        self,
        store: CorpusStore,
        *,
        collator: MaskingCollator | None = None,
        pack: bool = False,
        per_cell: Mapping[str, np.ndarray] | None = None,
        augment: Sequence[Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]] = (),
    ):
        per_cell = dict(per_cell or {})
        if collator is not None and "labels" in per_cell:
            raise ValueError("per-cell labels and a MaskingCollator (which makes token labels) exclude each other")
        for key, array in per_cell.items():
            if len(array) != len(store):
                raise ValueError(f"per-cell {key!r} has {len(array)} entries for a store of {len(store)} cells")
        self.store = store
        self.collator = collator
        self.pack = pack
        self.per_cell = per_cell
        self.augment = tuple(augment)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item: tuple[int, np.ndarray] | list[tuple[int, np.ndarray]]):
        if isinstance(item, list):  # a group of batches (GroupedBatches), assembled in a worker process
            return SharedBatch([self._arrays(epoch, indices) for epoch, indices in item])
        batch = self._arrays(*item)
        if torch.utils.data.get_worker_info() is not None:
            return SharedBatch([batch])  # in a worker process: one buffer to hand over (see SharedBatch)
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    def _arrays(self, epoch: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of cells ``indices`` at ``epoch`` as numpy arrays."""
        batch = self.store.get_packed(indices) if self.pack else self.store.get_batch(indices)
        for augmentation in self.augment:
            batch = augmentation(batch, epoch)
        if self.collator is not None:
            batch = self.collator(batch, epoch)
        for key, array in self.per_cell.items():
            batch[key] = array[batch["cell_index"]]
        return batch


class _CheckedLoader(DataLoader):
    """A DataLoader whose state in a Lightning checkpoint is the sampling plan (seed, split size, batch size).

    Resuming with another plan would replay other batches than the interrupted run; ``load_state_dict`` refuses it.
    The position inside the epoch is Lightning's own restored progress (see ``CorpusDataModule._loader``).
    """

    def __iter__(self):
        # Batches from worker processes arrive as SharedBatch (one or a group): unpacked here, in the main process,
        # into views.
        for item in super().__iter__():
            if isinstance(item, SharedBatch):
                yield from item.batches()
            else:
                yield item

    def __len__(self) -> int:
        """Batches, not worker items: what Lightning counts steps and schedules by."""
        sampler = self.sampler
        return len(sampler.inner if isinstance(sampler, GroupedBatches) else sampler)

    def state_dict(self) -> dict:
        sampler = self.sampler
        return {"seed": sampler.seed, "n_cells": len(sampler.indices), "batch_size": sampler.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state != self.state_dict():
            raise ValueError(
                f"The checkpoint was trained with data sampling {state}, this run samples {self.state_dict()}: "
                "resume with the same seed, store, split and batch size, or start a new run."
            )


class CorpusDataModule(pl.LightningDataModule):
    """Train/validation (and test) loaders over a corpus store.

    Args:
        store_path: a store built by :func:`sc_foundation.data.store.build_store`.
        batch_size: cells per batch (per rank).
        val_fraction: share of cells held out for validation.
        split_by: obs column for a grouped split (e.g. ``source`` or a donor column); None splits by cell.
        mask_ratio: share of gene tokens masked for pretraining; None for no masking (fine-tuning, inference).
        view_keep: ``(low, high)``: pretraining batches also carry two views of each cell (``view_masks``, see
            :class:`MaskingCollator`) for the contrastive objective; None for none.
        view_depth: ``(low, high)``: each view also keeps only that share of each cell's molecules (binomial
            thinning, :class:`~sc_foundation.data.technical_views.TechnicalViews`); None for none. Needs
            ``view_keep`` and the ``continuous`` encoding.
        view_gene_scale: standard deviation of the per-gene log capture factor each view applies (a synthetic
            batch per view, same module); 0 for none.
        group_by_length: length-grouped batches (much less padding).
        pack: packed batches (cells end to end, ``cu_seqlens``, no padding) for varlen attention.
        num_workers: DataLoader worker processes; each assembles whole batches.
        worker_batches: batches a worker assembles and hands over at once (:class:`GroupedBatches`): the
            main process pays its receiving cost once per group. Only with workers.
        seed: seed of the split, the shuffles and the masks.
        per_cell: batch key -> (n_store_cells,) per-cell array, added to each batch as (B,) (see
            :class:`StoreBatchDataset`); ``labels`` among them needs ``mask_ratio=None``.
        splits: precomputed ``{"train", "val"[, "test"]}`` store indices (e.g. :func:`split_train_val_test`), used
            instead of ``val_fraction`` and ``split_by``; a ``test`` split gets a ``test_dataloader``.
        token_dropout: share of gene tokens the training batches drop (:class:`TokenDropout`, a fine-tuning
            augmentation); 0 for none. Validation, test and prediction batches keep every token.
        thin_depth: ``(low, high)``: each training cell keeps a share of its molecules drawn in that range, anew each
            epoch (:class:`DepthThinning`, a fine-tuning augmentation, before the token dropout); None for none.
            Needs the ``continuous`` encoding. Validation, test and prediction batches keep their depth.
        source_balance: balanced sampling of the training cells across the store's inputs (its ``source``
            column): each cell is drawn with weight ``n_source ** -source_balance`` (:func:`source_balance_weights`),
            with replacement, as many cells per epoch as the split holds. 0 (default): each cell once per epoch.

    ``predict_dataloader`` yields every store cell once, whatever the splits (``cell_index`` says which), and
    ``cells_dataloader`` the cells asked for. They and ``test_dataloader`` serve evaluation outside the Trainer, on
    one process: they are not sharded across DDP ranks (each rank that asks gets every cell), while the training
    and validation loaders are.
    """

    def __init__(
        self,
        store_path: str | os.PathLike,
        batch_size: int = 32,
        *,
        val_fraction: float = 0.05,
        split_by: str | None = None,
        mask_ratio: float | None = 0.15,
        view_keep: Sequence[float] | None = None,
        view_depth: Sequence[float] | None = None,
        view_gene_scale: float = 0.0,
        group_by_length: bool = True,
        pack: bool = False,
        num_workers: int = 0,
        worker_batches: int = 4,
        pin_memory: bool = False,
        seed: int = 0,
        per_cell: Mapping[str, np.ndarray] | None = None,
        splits: Mapping[str, np.ndarray] | None = None,
        token_dropout: float = 0.0,
        thin_depth: Sequence[float] | None = None,
        source_balance: float = 0.0,
    ):
        super().__init__()
        if not 0 <= source_balance <= 1:
            raise ValueError(f"source_balance must be in [0, 1], got {source_balance}")
        self.source_balance = source_balance
        self.store_path = str(store_path)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_by = split_by
        self.mask_ratio = mask_ratio
        self.view_keep = None if view_keep is None else tuple(view_keep)
        self.view_depth = None if view_depth is None else tuple(view_depth)
        self.view_gene_scale = view_gene_scale
        self.group_by_length = group_by_length
        self.pack = pack
        self.num_workers = num_workers
        self.worker_batches = worker_batches
        self.pin_memory = pin_memory
        self.seed = seed
        self.per_cell = per_cell
        self.splits = splits
        self.token_dropout = token_dropout
        self.thin_depth = None if thin_depth is None else tuple(thin_depth)
        self.store: CorpusStore | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.store is not None:
            return
        self.store = CorpusStore(self.store_path)
        if self.splits is None:
            self.train_indices, self.val_indices = split_cells(self.store, self.val_fraction, self.seed, self.split_by)
        else:
            self.train_indices, self.val_indices = self.splits["train"], self.splits["val"]
        self.test_indices = None if self.splits is None else self.splits.get("test")
        collator = None
        if self.mask_ratio is not None:
            vocab = self.store.vocab
            encoding = self.store.tokenizer.config.encoding
            collator = MaskingCollator(
                mask_ratio=self.mask_ratio,
                objective="gene" if encoding == "rank" else "value",
                mask_id=vocab.mask_id,
                special_ids=vocab.special_ids.tolist(),
                vocab_size=len(vocab),
                seed=self.seed,
                view_keep=self.view_keep,
                technical=self._technical_views(),
            )
        elif self.view_keep is not None:
            raise ValueError("view_keep makes views of pretraining batches: it needs mask_ratio")
        self.dataset = StoreBatchDataset(self.store, collator=collator, pack=self.pack, per_cell=self.per_cell)
        self.train_dataset = self.dataset
        augment = self._augmentations()
        if augment:
            self.train_dataset = StoreBatchDataset(
                self.store, collator=collator, pack=self.pack, per_cell=self.per_cell, augment=augment
            )

    def _augmentations(self) -> list:
        """The training batches' augmentations, in order: depth thinning, then token dropout."""
        vocab, config = self.store.vocab, self.store.tokenizer.config
        augment = []
        if self.thin_depth is not None:
            self._require_continuous("data.thin_depth", "drop it: this model's tokenizer does not read counts")
            library = self.store.obs["n_counts"].to_numpy()
            augment.append(
                DepthThinning(
                    library, config.target_sum, self.thin_depth, vocab.special_ids.tolist(), vocab.pad_id, self.seed
                )
            )
        if self.token_dropout:
            augment.append(TokenDropout(self.token_dropout, vocab.special_ids.tolist(), vocab.pad_id, self.seed))
        return augment

    def _require_continuous(self, keys: str, fix: str) -> None:
        encoding = self.store.tokenizer.config.encoding
        if encoding != "continuous":
            raise ValueError(
                f"{keys} recover counts from continuous values; this store's encoding is {encoding!r}: {fix}"
            )

    def _technical_views(self) -> TechnicalViews | None:
        if self.view_depth is None and not self.view_gene_scale:
            return None
        self._require_continuous(
            "data.loader.view_depth and view_gene_scale", "set data.tokenizer.encoding=continuous or drop them"
        )
        config = self.store.tokenizer.config
        return TechnicalViews(
            self.store.obs["n_counts"].to_numpy(),
            config.target_sum,
            depth=self.view_depth,
            gene_scale=self.view_gene_scale,
            seed=self.seed,
        )

    def _sampler(self, indices: np.ndarray, train: bool, sharded: bool = True) -> CellBatchSampler:
        balanced = train and self.source_balance > 0
        return CellBatchSampler(
            indices,
            self.store.lengths,
            self.batch_size,
            shuffle=train,
            group_by_length=self.group_by_length,
            drop_last=train,
            seed=self.seed,
            **({} if sharded else {"num_replicas": 1, "rank": 0}),
            weights=source_balance_weights(self.store.obs["source"], self.source_balance) if balanced else None,
        )

    def _loader(self, indices: np.ndarray, train: bool, sharded: bool = True) -> DataLoader:
        sampler = self._sampler(indices, train, sharded)
        fit_loop = self.trainer.fit_loop if self.trainer is not None else None
        if train and fit_loop is not None and fit_loop.restarting:
            # Lightning restores its loop progress before asking for this loader: a run resumed mid-epoch skips
            # the batches of the epoch it already trained on, so it sees exactly the batches of an uninterrupted run.
            # "processed", not "completed": checkpoints are written in on_train_batch_end, before the batch counts
            # as completed, though its optimiser step is done.
            sampler.skip_batches = fit_loop.epoch_loop.batch_progress.current.processed
        return _CheckedLoader(
            self.train_dataset if train else self.dataset,
            sampler=GroupedBatches(sampler, self.worker_batches) if self.num_workers > 0 else sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # Workers exit at once when this process dies (torch's own check takes until their queue runs dry).
            worker_init_fn=functools.partial(die_with_parent, os.getpid()) if self.num_workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_indices, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_indices, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_indices is None:
            raise ValueError("no test split: pass splits={'train': ..., 'val': ..., 'test': ...}")
        return self._loader(self.test_indices, train=False, sharded=False)

    def predict_dataloader(self) -> DataLoader:
        return self.cells_dataloader(np.arange(len(self.store)))

    def cells_dataloader(self, indices: np.ndarray) -> DataLoader:
        """An evaluation loader (every token kept, not sharded) over the given (n,) store indices, in batches
        grouped by length like the validation loader's (``cell_index`` says which cell each row is)."""
        return self._loader(np.asarray(indices, dtype=np.int64), train=False, sharded=False)

    def padding_report(self) -> dict[str, float]:
        """Padded share of token slots in one training epoch, with and without length grouping."""
        report = {}
        for grouped in (True, False):
            sampler = self._sampler(self.train_indices, train=True)
            sampler.group_by_length = grouped
            report["length_grouped" if grouped else "random"] = sampler.padding_fraction()
        return report
