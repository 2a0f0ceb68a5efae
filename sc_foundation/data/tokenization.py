"""The gene tokenizer: raw counts of each cell -> (gene token ids, values), by one of three value encodings.

* ``binned`` (scGPT): log1p of counts per ``target_sum``, then per-cell quantile bins of the non-zero values into
  ``1..n_bins-1`` (0 is kept for zero expression and special tokens). By rank (``bin_edges="rank"``, ours), ties
  always share a bin; by scGPT's own rule (``bin_edges="quantile"``), values are digitised against the cell's
  quantiles and a value equal to an edge takes one of the bins it borders at random, drawn from a seeded hash.
* ``rank`` (Geneformer): counts per ``target_sum`` divided by each gene's non-zero median over the corpus; genes are
  ordered by that value, highest first. The value is kept, but the order is what the model sees.
* ``continuous``: log1p of counts per ``target_sum``.

A cell longer than the context keeps its top genes (highest values, or highest relative to each gene's corpus non-zero
median: ``truncation="relative"``) or a seeded random subset. The random subset of a cell depends
only on the seed, the cell's key (a hash of its id) and the gene, never on the other cells in its chunk, so
tokenizing a file in chunks, in another order or one cell at a time gives the same tokens.

The tokenizer is saved as ``gene_tokenizer.json`` beside ``gene_vocab.json``; both travel with stores and models.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import scipy.sparse as sp

from sc_foundation.data.genes import (
    _GENOME_PREFIX,
    DAMAGED_FILE_FIX,
    EOS_TOKEN,
    GeneResolution,
    GeneVocab,
    _atomic_write_text,
    read_json,
    resolve_genes,
)

if TYPE_CHECKING:
    from sc_foundation.data.io import CountSource

TOKENIZER_FILE = "gene_tokenizer.json"
ENCODINGS = ("binned", "rank", "continuous")
_MAX_DENSE_ENTRIES = 16_000_000  # include_zeros: about 64 MB of float32 per dense block


class GeneMatchError(ValueError):
    """Too few input genes matched the vocabulary (or there are duplicates when they are refused)."""


@dataclass(frozen=True)
class TokenizerConfig:
    """Settings of a :class:`GeneTokenizer`; saved with it.

    Attributes:
        encoding: ``"binned"``, ``"rank"`` or ``"continuous"``.
        n_bins: number of value tokens for ``binned``, including bin 0 (zero expression).
        context_length: tokens per cell, the CLS token included.
        truncation: for cells with more genes than fit: ``"top"`` keeps the highest values; ``"relative"`` the genes
            highest relative to their non-zero median over the corpus (Geneformer's normalisation, applied to the
            choice only: the values stay the encoding's), so that genes every cell expresses highly do not crowd the
            context and a cell is read through what sets it apart; ``"random"`` a seeded random subset. ``rank``
            always keeps the top of its ranking.
        include_zeros: also offer genes with zero counts (value 0) as tokens, as scGPT does for HVG panels.
        add_cls: put a ``<cls>`` token (value 0) first; its output is the cell embedding.
        target_sum: counts per cell after normalisation.
        seed: seed for the random subset.
        min_match_rate: refuse an input when fewer of its genes than this fraction match the vocabulary.
        duplicates: input genes resolving to one vocabulary gene are summed (``"sum"``, Geneformer) or refused.
        gene_id_type: what the vocabulary's gene tokens are: ``"ensembl"`` ids (ours, Geneformer) or ``"symbol"``s
            (scGPT). Input genes are resolved to Ensembl ids either way; a symbol vocabulary then matches an input
            gene by its name as written, else by the Ensembl id of a vocabulary symbol.
        add_eos: put an ``<eos>`` token (value 0) last (Geneformer V2); the vocabulary must hold it.
        cls_value: the value the ``<cls>`` token carries (scGPT gives it its ``pad_value``, -2).
        gene_panel: vocabulary tokens the cells are read through (a task's variable genes), or None for every
            vocabulary gene. Genes outside the panel still count in the library size and the match rate; with
            ``include_zeros`` each cell then carries every panel gene its input has, zeros included, which is a
            fixed context of the genes that tell the task's cells apart (fine-tuning sets it; the export keeps it,
            so inference reads new cells the same way).
        bin_edges: ``binned`` only: ``"rank"`` (ours) or ``"quantile"`` (scGPT's ``binning``); see the module
            docstring.
        library_size: what each cell's counts are normalised by: its total over every input gene (``"input"``, as
            in pretraining), or over the genes it is read through (``"panel"``: the panel's genes, or the matched
            vocabulary genes without a panel). With ``"panel"`` a cell's values do not depend on which other genes
            its file measures, so a reference with 9,000 genes and a query with 765 read the same genes on one
            scale. Only the ``continuous`` encoding sees it: binned and rank values are per-cell orders.
    """

    encoding: Literal["binned", "rank", "continuous"] = "binned"
    n_bins: int = 51
    context_length: int = 2048
    truncation: Literal["random", "top", "relative"] = "random"
    include_zeros: bool = False
    add_cls: bool = True
    target_sum: float = 1e4
    seed: int = 0
    min_match_rate: float = 0.5
    duplicates: Literal["sum", "error"] = "sum"
    gene_id_type: Literal["ensembl", "symbol"] = "ensembl"
    add_eos: bool = False
    cls_value: float = 0.0
    bin_edges: Literal["rank", "quantile"] = "rank"
    gene_panel: tuple[str, ...] | None = None
    library_size: Literal["input", "panel"] = "input"

    def __post_init__(self) -> None:
        if self.gene_panel is not None:  # a list read back from JSON compares equal to the tuple it was
            object.__setattr__(self, "gene_panel", tuple(self.gene_panel))
            if not self.gene_panel:
                raise ValueError("gene_panel is empty: give the panel's genes, or None for every vocabulary gene.")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {self.encoding!r}.")
        if self.truncation not in ("random", "top", "relative"):
            raise ValueError(f"truncation must be 'random', 'top' or 'relative', got {self.truncation!r}.")
        if self.duplicates not in ("sum", "error"):
            raise ValueError(f"duplicates must be 'sum' or 'error', got {self.duplicates!r}.")
        if self.gene_id_type not in ("ensembl", "symbol"):
            raise ValueError(f"gene_id_type must be 'ensembl' or 'symbol', got {self.gene_id_type!r}.")
        if self.bin_edges not in ("rank", "quantile"):
            raise ValueError(f"bin_edges must be 'rank' or 'quantile', got {self.bin_edges!r}.")
        if self.library_size not in ("input", "panel"):
            raise ValueError(f"library_size must be 'input' or 'panel', got {self.library_size!r}.")
        if self.encoding == "binned" and self.n_bins < 3:
            raise ValueError(f"n_bins must be at least 3 (bin 0 plus two value bins), got {self.n_bins}.")
        if self.context_length < 2 + int(self.add_eos):
            raise ValueError(f"context_length must be at least 2, got {self.context_length}.")
        if not 0.0 <= self.min_match_rate <= 1.0:
            raise ValueError(f"min_match_rate must lie in [0, 1], got {self.min_match_rate}.")

    @property
    def needs_medians(self) -> bool:
        """Whether the tokenizer needs each gene's corpus non-zero median (the ``rank`` encoding, ``relative``
        truncation)."""
        return self.encoding == "rank" or self.truncation == "relative"

    @property
    def max_genes(self) -> int:
        """Gene tokens per cell, besides the CLS and EOS tokens."""
        return self.context_length - int(self.add_cls) - int(self.add_eos)


@dataclass
class GeneMatch:
    """How the columns of one input map onto the vocabulary.

    ``aggregate`` is an (n_input_genes, n_kept) 0/1 sparse matrix: ``counts @ aggregate`` keeps the matched columns
    and sums duplicates in one sparse product. ``token_ids`` (n_kept,) are the vocabulary ids of those columns, sorted.

    The match rate counts the *detected* input genes (non-zero in at least one cell) when detection is known: a
    whole-genome panel lists thousands of genes no cell expresses, and whether those match says nothing.
    """

    source: str
    n_input: int
    n_matched: int
    n_detected: int
    n_detected_matched: int
    n_duplicated: int
    token_ids: np.ndarray
    aggregate: sp.csr_matrix
    unmatched_examples: list[str]
    resolution: GeneResolution

    @property
    def match_rate(self) -> float:
        return self.n_detected_matched / max(self.n_detected, 1)

    def summary(self) -> str:
        return (
            f"{self.source}: {self.n_detected_matched}/{self.n_detected} detected genes matched the vocabulary "
            f"({100 * self.match_rate:.1f}%; {self.n_matched}/{self.n_input} of all listed genes, species "
            f"{self.resolution.species}); {self.n_duplicated} duplicated genes summed; "
            f"unmatched e.g. {self.unmatched_examples[:5]}"
        )


@dataclass
class TokenizedCells:
    """A ragged batch of tokenized cells in flat (CSR-like) form.

    Cell ``i`` owns ``gene_ids[offsets[i]:offsets[i+1]]`` and the same slice of ``values``.

    Attributes:
        offsets: (n_cells + 1,) int64.
        gene_ids: (n_tokens,) int32 vocabulary ids, ``<cls>`` first when the tokenizer adds it.
        values: (n_tokens,) float32 values of the encoding (bin index as a float for ``binned``).
        rows: (n_cells,) int64 row of each kept cell in the input; empty cells are dropped.
        n_counts: (n_cells,) float32 library size of each kept cell: the total its values were normalised by (its
            counts over every input gene; with ``library_size="panel"``, over the genes it is read through). With
            it the counts behind continuous values can be recovered (:mod:`sc_foundation.data.technical_views`).
        n_expressed: (n_cells,) int32 matched genes with non-zero counts, before truncation.
    """

    offsets: np.ndarray
    gene_ids: np.ndarray
    values: np.ndarray
    rows: np.ndarray
    n_counts: np.ndarray
    n_expressed: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        """(n_cells,) int32 tokens per cell."""
        return np.diff(self.offsets).astype(np.int32)

    @classmethod
    def concatenate(cls, parts: Sequence[TokenizedCells], row_starts: Sequence[int]) -> TokenizedCells:
        """Join consecutive row blocks; ``row_starts[k]`` is block k's first row in the joined input."""
        shifts = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
        return cls(
            offsets=np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts, strict=True)]),
            gene_ids=np.concatenate([p.gene_ids for p in parts]),
            values=np.concatenate([p.values for p in parts]),
            rows=np.concatenate([p.rows + r for p, r in zip(parts, row_starts, strict=True)]),
            n_counts=np.concatenate([p.n_counts for p in parts]),
            n_expressed=np.concatenate([p.n_expressed for p in parts]),
        )

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(gene ids, values) of cell ``i``."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.gene_ids[lo:hi], self.values[lo:hi]


def pad_cells(
    cells: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, pad_to_multiple: int = 8
) -> dict[str, np.ndarray]:
    """Tokenized cells as one padded batch (:func:`pad_flat` of the cells concatenated).

    Args:
        cells: B pairs of (gene ids, values) arrays of each cell's length (``TokenizedCells.cell``), of any integer
            and numeric dtypes; values None for a cell whose values are all 0.
    """
    lengths = np.fromiter((len(ids) for ids, _ in cells), dtype=np.int64, count=len(cells))
    ids = np.concatenate([ids for ids, _ in cells] or [np.zeros(0, np.int64)])
    values = [np.zeros(n, np.float32) if vals is None else vals for (_, vals), n in zip(cells, lengths, strict=True)]
    return pad_flat(ids, np.concatenate(values or [np.zeros(0, np.float32)]), lengths, pad_id, pad_to_multiple)


def pad_flat(
    ids: np.ndarray, values: np.ndarray, lengths: np.ndarray, pad_id: int, pad_to_multiple: int = 8
) -> dict[str, np.ndarray]:
    """Cells given end to end as one padded batch: the layout every model input of this package has.

    Args:
        ids, values: (T,) the cells' gene ids and values, concatenated in order (any integer and numeric dtypes).
        lengths: (B,) tokens per cell, summing to T.
        pad_to_multiple: L is the longest cell rounded up to this, so the attention kernels see fewer shapes.
    Returns:
        ``input_ids`` (B, L) int64 (``pad_id`` after each cell), ``values`` (B, L) float32 (0 at padding) and
        ``attention_mask`` (B, L) bool.
    """
    width = int(-(-int(lengths.max(initial=1)) // pad_to_multiple) * pad_to_multiple)
    attention_mask = np.arange(width)[None, :] < lengths[:, None]
    # The tokens fill each row's first positions, row after row: the order of the concatenated cells (one boolean
    # scatter, faster than a slice copy per row).
    input_ids = np.full((len(lengths), width), pad_id, dtype=np.int64)
    input_ids[attention_mask] = ids
    padded_values = np.zeros((len(lengths), width), dtype=np.float32)
    padded_values[attention_mask] = values
    return {"input_ids": input_ids, "values": padded_values, "attention_mask": attention_mask}


def aggregate_columns(codes: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
    """Select and merge input columns by code.

    Args:
        codes: (n_input,) int64 code of each input column (a token id, say), -1 to drop the column.
    Returns:
        (n_kept,) sorted unique codes, and the (n_input, n_kept) 0/1 CSR matrix ``A`` such that ``counts @ A`` keeps
        the coded columns in code order and sums the columns that share a code.
    """
    kept = codes >= 0
    unique, column = np.unique(codes[kept], return_inverse=True)
    aggregate = sp.csr_matrix(
        (np.ones(int(kept.sum()), dtype=np.float32), (np.flatnonzero(kept), column)), shape=(len(codes), len(unique))
    )
    return unique, aggregate


def normalise_counts(
    counts: sp.spmatrix,
    aggregate: sp.csr_matrix,
    target_sum: float,
    sort_indices: bool = True,
    dtype: type[np.floating] = np.float32,
    library: Literal["input", "kept"] = "input",
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Counts per ``target_sum`` over the columns that ``aggregate`` keeps (see :func:`aggregate_columns`).

    Args:
        counts: (n_cells, n_input) raw counts.
        aggregate: (n_input, n_kept) column selector.
        sort_indices: sort column indices within rows (tokenization needs it; statistics do not).
        dtype: of the arithmetic and the results (the rank encoding orders genes in float64, as Geneformer does).
        library: what a cell's counts are divided by: its total over all input columns (``"input"``, scGPT's and
            Geneformer's library size), or over the kept columns only (``"kept"``: a value then does not depend on
            which other genes the file happens to measure).
    Returns:
        (n_cells, n_kept) ``dtype`` CSR without stored zeros, and (n_cells,) ``dtype`` library sizes, the totals
        each cell was divided by (over all input columns with ``"input"``, as scGPT and Geneformer define it).
    """
    counts = sp.csr_matrix(counts, dtype=dtype)
    totals = np.asarray(counts.sum(axis=1), dtype=dtype).ravel()
    kept = (counts @ aggregate).tocsr()
    if sort_indices:
        kept.sort_indices()
    library_sizes = totals if library == "input" else np.asarray(kept.sum(axis=1), dtype=dtype).ravel()
    scale = np.divide(target_sum, library_sizes, out=np.zeros_like(library_sizes), where=library_sizes > 0)
    kept.data *= np.repeat(scale, np.diff(kept.indptr))
    kept.eliminate_zeros()
    return kept, library_sizes


def cell_keys(cell_ids: Sequence[str]) -> np.ndarray:
    """(n,) uint64 stable hash of each cell id: the per-cell seed of the random subset and of masking."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(c).encode(), digest_size=8).digest(), "little") for c in cell_ids),
        dtype=np.uint64,
        count=len(cell_ids),
    )


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a fast, well-spread, vectorised hash."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hash_uniform(*keys: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random numbers in [0, 1) from broadcastable uint64 key arrays.

    The state starts as a scalar and takes each key's shape by broadcasting, so leading scalar keys (a seed, an
    epoch) are mixed once rather than once per element: the same numbers, at half the cost for (seed, epoch, cells,
    positions)."""
    with np.errstate(over="ignore"):
        h = np.zeros((), dtype=np.uint64)
        for k in keys:
            h = _mix(h ^ np.asarray(k).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _descending(values: np.ndarray) -> np.ndarray:
    """(n,) uint64 keys that sort non-negative float32 ``values`` from highest to lowest.

    The bit pattern of a non-negative IEEE float, read as an unsigned integer, orders like the float itself.
    """
    return np.uint64(0xFFFFFFFF) - values.astype(np.float32).view(np.uint32).astype(np.uint64)


def _sort_within_rows(rows: np.ndarray, priority: np.ndarray) -> np.ndarray:
    """Stable order by (row, priority) for ``rows`` < 2**32 and ``priority`` < 2**32, as one uint64 sort key.

    One integer sort is several times faster than ``np.lexsort`` over two keys, and exact: the order within a row
    does not depend on the row's number, so it is the same whatever chunk the cell was tokenized in. Equal
    priorities keep their input order (vocabulary order).
    """
    return np.argsort((rows.astype(np.uint64) << np.uint64(32)) | priority, kind="stable")


def _first_in_group(sorted_keys: list[np.ndarray]) -> np.ndarray:
    """For rows sorted by ``sorted_keys``, the position of the first row of each run of equal keys."""
    n = len(sorted_keys[0])
    new = np.zeros(n, dtype=bool)
    new[:1] = True
    for k in sorted_keys:
        new[1:] |= k[1:] != k[:-1]
    return np.maximum.accumulate(np.where(new, np.arange(n), 0))


class GeneTokenizer:
    """Turns raw-count rows into token sequences for one vocabulary and one :class:`TokenizerConfig`.

    Args:
        vocab: the gene vocabulary.
        config: the settings.
        gene_medians: (len(vocab),) float64 non-zero median of normalised counts per token id, NaN where unknown;
            required by the ``rank`` encoding and ``relative`` truncation (see
            :class:`sc_foundation.data.gene_statistics.GeneStatistics`).
    """

    def __init__(self, vocab: GeneVocab, config: TokenizerConfig, gene_medians: np.ndarray | None = None):
        if config.needs_medians:
            if gene_medians is None:
                what = "The rank encoding" if config.encoding == "rank" else "truncation='relative'"
                raise ValueError(f"{what} needs gene_medians: compute them over the corpus first.")
            gene_medians = np.asarray(gene_medians, dtype=np.float64)
            if gene_medians.shape != (len(vocab),):
                raise ValueError(f"gene_medians has shape {gene_medians.shape}, expected ({len(vocab)},).")
        if config.add_eos and EOS_TOKEN not in vocab:
            raise ValueError(f"add_eos=True needs an {EOS_TOKEN} token in the vocabulary; add it with add_special.")
        self.vocab = vocab
        self.config = config
        self.gene_medians = gene_medians

    # ----------------------------------------------------------------------------------------------- genes
    def match_genes(
        self,
        gene_names: Sequence[str],
        *,
        source: str = "<AnnData>",
        species: str = "auto",
        cells_per_gene: np.ndarray | None = None,
    ) -> GeneMatch:
        """Map input columns onto the vocabulary; refuse too few matches (or duplicates, by setting).

        Args:
            gene_names: (n_input,) gene names or ids of the input columns.
            source: the file, for messages.
            species: see :func:`sc_foundation.data.genes.resolve_genes`.
            cells_per_gene: (n_input,) cells in which each column is non-zero (all cells or a sample): the match
                rate then counts detected genes only, and the most detected unmatched genes are listed first.

        Under the rank encoding a gene without a corpus median cannot be ranked and counts as unmatched.
        """
        resolution = resolve_genes(gene_names, species=species)
        ids = self._vocabulary_ids(resolution)
        if self.config.encoding == "rank":
            known = np.zeros(len(ids), dtype=bool)
            medians = self.gene_medians[ids[ids >= 0]]
            known[ids >= 0] = np.isfinite(medians) & (medians > 0)
            ids = np.where(known, ids, -1)
        matched = ids >= 0
        detected = np.ones(len(ids), bool) if cells_per_gene is None else np.asarray(cells_per_gene) > 0
        # Unmatched genes, the most detected first: those are the ones whose loss matters.
        unmatched = np.flatnonzero(~matched)
        if cells_per_gene is not None:
            unmatched = unmatched[np.argsort(-np.asarray(cells_per_gene)[unmatched], kind="stable")]
            unmatched = unmatched[detected[unmatched]]
        n_duplicated = int(matched.sum() - len(np.unique(ids[matched])))
        panel = self._panel_ids
        kept_ids, aggregate = aggregate_columns(ids if panel is None else np.where(np.isin(ids, panel), ids, -1))
        match = GeneMatch(
            source=source,
            n_input=len(ids),
            n_matched=int(matched.sum()),
            n_detected=int(detected.sum()),
            n_detected_matched=int((matched & detected).sum()),
            n_duplicated=n_duplicated,
            token_ids=kept_ids.astype(np.int32),
            aggregate=aggregate,
            unmatched_examples=[str(u) for u in resolution.names[unmatched[:20]]],
            resolution=resolution,
        )
        if match.match_rate < self.config.min_match_rate or match.n_detected_matched == 0:
            raise GeneMatchError(
                f"{source}: only {match.n_detected_matched} of {match.n_detected} detected genes "
                f"({100 * match.match_rate:.1f}%) match the vocabulary, below "
                f"min_match_rate={self.config.min_match_rate}. Unmatched examples: {match.unmatched_examples[:10]}. "
                f"Detected species: {resolution.species}. Check that gene_key names the column with gene symbols or "
                "Ensembl ids, set species= if detection is wrong, or lower min_match_rate if this panel is expected "
                "to overlap little."
            )
        if n_duplicated and self.config.duplicates == "error":
            unique, times = np.unique(ids[matched], return_counts=True)
            repeated = unique[times > 1]
            dup = np.flatnonzero(np.isin(ids, repeated))
            raise GeneMatchError(
                f"{source}: {n_duplicated} input genes map onto a gene already present, e.g. "
                f"{resolution.names[dup[:10]].tolist()}. Remove the duplicates or set duplicates='sum'."
            )
        return match

    def _vocabulary_ids(self, resolution: GeneResolution) -> np.ndarray:
        """(n,) int64 vocabulary id of each resolved input gene, -1 where it has none (see ``gene_id_type``)."""
        if self.config.gene_id_type == "ensembl":
            return self.vocab.lookup(resolution.canonical)
        by_name = self.vocab.lookup([_GENOME_PREFIX.sub("", name.strip()) for name in resolution.names])
        by_ensembl = self._symbol_ids_by_ensembl
        via_ensembl = np.fromiter((by_ensembl.get(g, -1) for g in resolution.canonical), np.int64, len(by_name))
        return np.where(by_name >= 0, by_name, via_ensembl)

    @functools.cached_property
    def _panel_ids(self) -> np.ndarray | None:
        """(P,) int64 vocabulary ids of ``config.gene_panel``, None without a panel."""
        panel = self.config.gene_panel
        if panel is None:
            return None
        ids = self.vocab.lookup(list(panel))
        if (ids < 0).any():
            missing = [gene for gene, i in zip(panel, ids, strict=True) if i < 0]
            raise ValueError(
                f"gene_panel names {len(missing)} genes the vocabulary lacks, e.g. {missing[:5]}: a panel must be "
                "vocabulary tokens (gene_vocab.json)."
            )
        return ids

    @functools.cached_property
    def _symbol_ids_by_ensembl(self) -> dict[str, int]:
        """Human Ensembl id -> id of the first vocabulary symbol that resolves to it (symbol vocabularies)."""
        tokens = self.vocab.tokens
        mapping: dict[str, int] = {}
        for token_id, gene in enumerate(resolve_genes(tokens, species="human").canonical):
            if gene is not None:
                mapping.setdefault(gene, token_id)
        return mapping

    def match_source(
        self, source: CountSource, *, chunk_size: int, species: str = "auto", start: int = 0, stop: int | None = None
    ) -> tuple[GeneMatch, Iterator[tuple[int, sp.csr_matrix]]]:
        """Match the genes of a whole :class:`~sc_foundation.data.io.CountSource` once, then hand back its chunks.

        Detection in the first chunk that holds any counts tells which listed genes carry signal (see
        :class:`GeneMatch`); the chunks read to find it are not lost but come first in the returned iterator. A
        source of empty cells matches on all its genes. Detection is always read from the source's first rows, so
        every row range of one source (``start``, ``stop``: a part that one process tokenizes) gets the same match.

        Returns:
            The match, and ``source.iter_chunks(chunk_size, start=start, stop=stop)``'s
            ``(start_row, (k, n_genes) counts)``.
        """
        chunks = source.iter_chunks(chunk_size)
        head: list[tuple[int, sp.csr_matrix]] = []
        detected = np.zeros(source.n_genes, dtype=np.int64)
        for chunk in chunks:
            head.append(chunk)
            detected += np.bincount(chunk[1].indices, minlength=source.n_genes)
            if detected.any():
                break
        match = self.match_genes(
            source.gene_names,
            source=source.path,
            species=species,
            cells_per_gene=detected if detected.any() else None,
        )
        if start == 0 and stop is None:
            return match, itertools.chain(head, chunks)
        chunks.close()
        return match, source.iter_chunks(chunk_size, start=start, stop=stop)

    # --------------------------------------------------------------------------------------------- encode
    def encode(self, counts: sp.spmatrix, match: GeneMatch, keys: np.ndarray) -> TokenizedCells:
        """Tokenize a chunk of cells.

        Args:
            counts: (n_cells, n_input_genes) raw counts in the column order that ``match`` was made for.
            match: from :meth:`match_genes` on the same columns.
            keys: (n_cells,) uint64 cell keys (:func:`cell_keys` of the cell ids).
        """
        cfg = self.config
        block = max(1, _MAX_DENSE_ENTRIES // max(len(match.token_ids), 1))
        if cfg.include_zeros and counts.shape[0] > block:
            # include_zeros works on a dense (cells x matched genes) block: bound it by splitting the rows.
            parts = [
                self.encode(counts[lo : lo + block], match, keys[lo : lo + block])
                for lo in range(0, counts.shape[0], block)
            ]
            return TokenizedCells.concatenate(parts, row_starts=range(0, counts.shape[0], block))
        # The rank encoding's order is its value: computed in float64, so that it is Geneformer's to the last gene.
        dtype = np.float64 if cfg.encoding == "rank" else np.float32
        library = "input" if cfg.library_size == "input" else "kept"
        norm, library_sizes = normalise_counts(counts, match.aggregate, cfg.target_sum, dtype=dtype, library=library)
        n_cells = norm.shape[0]
        n_expressed = np.diff(norm.indptr).astype(np.int32)
        if cfg.include_zeros:
            # Every matched gene is a candidate; the zeros get value 0.
            dense = norm.toarray()
            rows = np.repeat(np.arange(n_cells), dense.shape[1])
            cols = np.tile(np.arange(dense.shape[1]), n_cells)
            raw = dense.ravel()
        else:
            rows = np.repeat(np.arange(n_cells), n_expressed)
            cols = norm.indices.astype(np.int64)
            raw = norm.data
        # A cell is kept when it has tokens with a value; through a panel with zeros, a cell with counts outside the
        # panel only is a real cell too (all its panel genes at zero), which the task must still score.
        if cfg.gene_panel is not None and cfg.include_zeros:
            keep_cell = np.asarray(counts.sum(axis=1)).ravel() > 0
        else:
            keep_cell = n_expressed > 0
        genes = match.token_ids[cols]
        values = self._values(rows, genes, raw, n_cells, keys)
        # Entries arrive grouped by cell and in vocabulary order within each cell.
        if cfg.encoding == "rank":
            order = np.lexsort((-values, rows))  # stable: equal values keep vocabulary order
            rows, genes, values = rows[order], genes[order], values[order]
            selected = self._first_per_row(rows, n_cells)
        else:
            # Genes are a set and stay in vocabulary order; only cells longer than the context are cut.
            selected = np.ones(len(rows), dtype=bool)
            too_long = np.bincount(rows, minlength=n_cells) > cfg.max_genes
            if too_long.any():
                idx = np.flatnonzero(too_long[rows])
                if cfg.truncation == "top":
                    priority = _descending(values[idx])
                elif cfg.truncation == "relative":
                    priority = _descending(raw[idx] / self._choice_medians[genes[idx]])
                else:
                    draw = hash_uniform(np.uint64(cfg.seed), keys[rows[idx]], genes[idx].astype(np.uint64))
                    priority = (draw * 2.0**32).astype(np.uint64)
                idx = idx[_sort_within_rows(rows[idx], priority)]
                selected[idx] = self._first_per_row(rows[idx], n_cells)
        selected &= keep_cell[rows]
        rows, genes, values = rows[selected], genes[selected], values[selected]

        kept_rows = np.flatnonzero(keep_cell)
        lengths = np.bincount(rows, minlength=n_cells)[kept_rows] + int(cfg.add_cls) + int(cfg.add_eos)
        offsets = np.zeros(len(kept_rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gene_ids = np.empty(offsets[-1], dtype=np.int32)
        out_values = np.zeros(offsets[-1], dtype=np.float32)
        token_slot = np.ones(offsets[-1], dtype=bool)
        if cfg.add_cls:
            gene_ids[offsets[:-1]] = self.vocab.cls_id
            out_values[offsets[:-1]] = cfg.cls_value
            token_slot[offsets[:-1]] = False
        if cfg.add_eos:
            gene_ids[offsets[1:] - 1] = self.vocab[EOS_TOKEN]
            token_slot[offsets[1:] - 1] = False
        gene_ids[token_slot] = genes
        out_values[token_slot] = values
        return TokenizedCells(
            offsets=offsets,
            gene_ids=gene_ids,
            values=out_values,
            rows=kept_rows.astype(np.int64),
            n_counts=library_sizes[kept_rows].astype(np.float32),
            n_expressed=n_expressed[kept_rows],
        )

    @functools.cached_property
    def _choice_medians(self) -> np.ndarray:
        """(len(vocab),) float32 medians that ``relative`` truncation divides by: a gene without a corpus median (a
        vocabulary gene the corpus never detected) takes the median of the known ones, neither favoured nor hidden."""
        medians = self.gene_medians
        known = np.isfinite(medians) & (medians > 0)
        return np.where(known, medians, np.median(medians[known]) if known.any() else 1.0).astype(np.float32)

    def _first_per_row(self, rows: np.ndarray, n_cells: int) -> np.ndarray:
        """(n,) bool: True for the first ``max_genes`` entries of each cell, for entries sorted by cell."""
        row_start = np.searchsorted(rows, np.arange(n_cells))
        return np.arange(len(rows)) - row_start[rows] < self.config.max_genes

    def _values(
        self, rows: np.ndarray, genes: np.ndarray, norm: np.ndarray, n_cells: int, keys: np.ndarray
    ) -> np.ndarray:
        """(n,) token values (float32; float64 for rank) from normalised counts ``norm`` of (row, gene) entries
        grouped by row."""
        cfg = self.config
        if cfg.encoding == "continuous":
            return np.log1p(norm).astype(np.float32)
        if cfg.encoding == "rank":
            return norm / self.gene_medians[genes]  # float64 (see encode); stored as float32
        if cfg.bin_edges == "quantile":
            return self._quantile_bins(rows, genes, np.log1p(norm).astype(np.float32), n_cells, keys)
        # binned: bin = 1 + floor(r * (n_bins - 1) / m), with r the number of the cell's m non-zero values strictly
        # below this one. Equal values get equal r, hence the same bin; zeros stay in bin 0.
        logged = np.log1p(norm).astype(np.float32)
        nonzero = logged > 0
        nz_rows, nz_vals = rows[nonzero], logged[nonzero]
        order = _sort_within_rows(nz_rows, nz_vals.view(np.uint32).astype(np.uint64))
        sorted_rows, sorted_vals = nz_rows[order], nz_vals[order]
        first = _first_in_group([sorted_rows, sorted_vals])
        starts = np.searchsorted(sorted_rows, np.arange(n_cells))
        m = np.bincount(sorted_rows, minlength=n_cells)
        r = first - starts[sorted_rows]
        bins_sorted = 1 + (r * (cfg.n_bins - 1)) // m[sorted_rows]
        bins = np.zeros(len(logged), dtype=np.float32)
        nz_bins = np.empty(len(order), dtype=np.float32)
        nz_bins[order] = bins_sorted
        bins[nonzero] = nz_bins
        return bins

    def _quantile_bins(
        self, rows: np.ndarray, genes: np.ndarray, logged: np.ndarray, n_cells: int, keys: np.ndarray
    ) -> np.ndarray:
        """scGPT's binning: (n,) float32 bins of (row, gene) entries grouped by row.

        Each cell's non-zero values are digitised against its ``n_bins - 1`` quantiles at ``linspace(0, 1)``
        (bins 1..n_bins-1; zeros stay 0). A value equal to one or more edges lies between its left and right
        digitisation; scGPT picks a bin there with an unseeded uniform draw, we with a draw hashed from the seed, the
        cell and the gene, so a cell's bins do not depend on the run. Being a rank statistic, the result is the same
        on counts, normalised counts or their log.
        """
        bins = np.zeros(len(logged), dtype=np.float32)
        nonzero = np.flatnonzero(logged > 0)
        bounds = np.searchsorted(rows[nonzero], np.arange(n_cells + 1))
        draws = hash_uniform(np.uint64(self.config.seed), keys[rows[nonzero]], genes[nonzero].astype(np.uint64))
        quantiles = np.linspace(0, 1, self.config.n_bins - 1)
        for lo, hi in itertools.pairwise(bounds):
            if lo == hi:
                continue
            values = logged[nonzero[lo:hi]].astype(np.float64)
            edges = np.quantile(values, quantiles)
            left, right = np.digitize(values, edges), np.digitize(values, edges, right=True)
            bins[nonzero[lo:hi]] = np.ceil(draws[lo:hi] * (right - left) + left)
        return bins

    # ------------------------------------------------------------------------------------------ save/load
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``gene_vocab.json`` and ``gene_tokenizer.json`` into ``directory`` (atomically, file by file)."""
        directory = Path(directory)
        self.vocab.save(directory)
        payload = {"config": dataclasses.asdict(self.config)}
        if self.gene_medians is not None:
            finite = np.isfinite(self.gene_medians)
            tokens = self.vocab.tokens
            payload["gene_medians"] = {tokens[i]: float(self.gene_medians[i]) for i in np.flatnonzero(finite)}
        _atomic_write_text(directory / TOKENIZER_FILE, json.dumps(payload))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GeneTokenizer:
        """Load a tokenizer saved by :meth:`save` (a store, a model directory, or any folder holding both files)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"No {TOKENIZER_FILE} in {directory}: not a store or model directory.")
        payload = read_json(path, DAMAGED_FILE_FIX)
        if not isinstance(payload, dict) or not isinstance(payload.get("config"), dict):
            raise ValueError(f"{path} holds no tokenizer settings ('config'): not a gene tokenizer. {DAMAGED_FILE_FIX}")
        vocab = GeneVocab.from_file(directory)
        medians = None
        if "gene_medians" in payload:
            medians = np.full(len(vocab), np.nan, dtype=np.float64)
            for gene, value in payload["gene_medians"].items():
                medians[vocab[gene]] = value
        return cls(vocab, TokenizerConfig(**payload["config"]), medians)

    def __repr__(self) -> str:
        cfg = self.config
        values = f"{cfg.encoding} values" + (f" in {cfg.n_bins} bins" if cfg.encoding == "binned" else "")
        medians = (
            ""
            if self.gene_medians is None
            else f", rank medians of {int(np.isfinite(self.gene_medians).sum()):,} genes"
        )
        return (
            f"GeneTokenizer({len(self.vocab):,} tokens, {values}, context {cfg.context_length} ({cfg.truncation} "
            f"truncation{', <cls> first' if cfg.add_cls else ''}"
            f"{'' if cfg.gene_panel is None else f', a panel of {len(cfg.gene_panel):,} genes'}"
            f"{', zeros included' if cfg.include_zeros else ''}"
            f"{', library size over the panel' if cfg.library_size == 'panel' else ''}){medians})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GeneTokenizer):
            return False
        same_medians = (self.gene_medians is None and other.gene_medians is None) or (
            self.gene_medians is not None
            and other.gene_medians is not None
            and np.array_equal(self.gene_medians, other.gene_medians, equal_nan=True)
        )
        return self.vocab == other.vocab and self.config == other.config and same_medians

    __hash__ = None
