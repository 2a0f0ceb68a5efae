"""The on-disk tokenized corpus: built from many count files in bounded memory, read back at random cheaply.

Layout of a store directory::

    gene_vocab.json, gene_tokenizer.json   the tokenizer the cells were encoded with
    plan.json                              inputs and settings; a rerun with the same plan resumes the build
    stats/00000.npz ...                    per-file gene statistics (vocabulary building, rank medians)
    shards/00000.arrow ...                 one Arrow IPC stream per input file, one record batch per chunk
    shards/00000.json ...                  the shard's report; written after the shard, so it marks it complete
    manifest.json                          written last: the store is complete only when this exists

A shard row is one cell: ``cell_id``, the dictionary-encoded labels (``source``, ``batch``, the obs columns),
``length``, ``n_counts``, ``n_expressed``, then its tokens as list columns (types in :func:`token_types`):

    gene_ids            list<uint16|uint32>   rank stores: the ids in token order (the order is the value)
    gene_id_deltas      list<uint8>           binned, continuous: each id minus the one before (the first: minus 0);
                                              0 means "the next entry of gene_id_exceptions"
    gene_id_exceptions  list<int32>           the steps outside 1..255 in full, in token order (a first id over 255,
                                              a step to or from a CLS or EOS id at the end of the vocabulary, the
                                              rare gap over 255)
    values              list<uint8|int8|float32>   binned bins or continuous values; none in a rank store

Binned and continuous encodings keep a cell's genes in vocabulary order, so the steps are small and positive: one
byte per id instead of two (format 3, :func:`delta_encode`). Readers undo it for a whole batch at once
(:func:`delta_decode`).

Beside the directory, ``.<name>.lock`` serialises builders: N processes (DDP ranks, two runs, two checkouts sharing
a cache) asking for the same store build it once, the others wait and reuse it. A directory name holding ``{plan}``
gets the hash of the plan there, so different inputs or settings never share a folder and a stale cached store is
left to the runs still reading it. A build that fails before finishing any piece removes its folder and lock file;
in a ``{plan}`` cache, a build first removes the unfinished folders of other plans that no process is building
(:func:`sweep_unfinished_stores`). Its worker processes die with it (:mod:`sc_foundation.data.lifetime`).

Every file is written under a temporary name and renamed, so a killed build leaves finished pieces and nothing
half-written; running the same build again reuses the finished pieces and completes the rest. Shards are Arrow IPC
streams, the format of HF ``datasets`` cache files: ``CorpusStore.to_hf_dataset()`` opens them as a ``Dataset``.
Reading memory-maps the shards and slices the flat token buffers directly (no per-row Python objects).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from pandas.api.types import union_categoricals

from sc_foundation.data.gene_statistics import GeneStatistics
from sc_foundation.data.genes import GENE_ID_RULES, GeneVocab, _atomic_write_text, resolve_genes
from sc_foundation.data.io import InvalidInputError, open_counts
from sc_foundation.data.lifetime import pool_initializer
from sc_foundation.data.soma import is_soma_uri
from sc_foundation.data.tokenization import (
    GeneMatchError,
    GeneTokenizer,
    TokenizerConfig,
    aggregate_columns,
    cell_keys,
    normalise_counts,
    pad_flat,
)

MANIFEST = "manifest.json"
PLAN = "plan.json"
PLAN_PLACEHOLDER = "{plan}"
"""In a store directory name, replaced by :func:`plan_digest` of the store's plan (e.g. ``stores/binned-{plan}``)."""
DELTA_COLUMNS = ("gene_id_deltas", "gene_id_exceptions")
TOKEN_COLUMNS = ("gene_ids", *DELTA_COLUMNS, "values")
CENSUS_PREFIX = "census:"
FORMAT = 3
"""Store format: 1 kept int32 ids and float32 values; 2 keeps the narrowest types (see :func:`token_types`); 3 keeps
the ids of binned and continuous stores as one-byte steps with full exceptions (:func:`delta_encode`), rank stores
as in format 2. Every older format stays readable."""
MAX_DELTA = 255
"""The largest step from one gene id to the next that ``gene_id_deltas`` holds itself (0 marks an exception)."""
PART_SIZE = 262_144
"""Default cells per part: an input larger than this is split into row ranges that workers and ranks share out."""
RESERVED_COLUMNS = ("cell_id", "source", "batch", "length", "n_counts", "n_expressed", *TOKEN_COLUMNS)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusInput:
    """One input of a corpus (a count file or a TileDB-SOMA experiment) and how to read it.

    Attributes:
        path: an ``.h5ad``, 10x ``.h5``, 10x ``matrix.mtx`` folder, ``.h5mu`` (with ``modality``), or a TileDB-SOMA
            experiment (a local folder or URI); ``census:<version>/<organism>`` is a CELLxGENE Census release
            (``{"census": {"version", "organism", "value_filter"}}`` in settings).
        layer: layer holding raw counts (default ``X``; for SOMA the X layer, default ``raw``).
        use_raw: read counts from ``.raw``.
        modality: the modality of an ``.h5mu`` file.
        gene_key: ``var`` column with gene names or ids (default ``var_names``; for SOMA ``feature_id``).
        species: ``"human"``, ``"mouse"`` or ``"auto"``.
        batch_key: ``obs`` column holding the batch; by default the input's name is the batch.
        genome: genome of a multi-genome 10x ``.h5``.
        measurement: SOMA only: the measurement (default ``RNA``).
        value_filter: SOMA only: the ``obs`` filter selecting cells, e.g. ``"is_primary_data == True"``.
        targeted_panel: the file measures a designed gene panel (imaging: MERFISH, Xenium; targeted sequencing), every
            gene of it chosen for the cells it tells apart: a gene panel (:mod:`sc_foundation.data.gene_panel`) then
            takes all its genes rather than its most variable ones. Reading is unchanged.
    """

    path: str
    layer: str | None = None
    use_raw: bool = False
    modality: str | None = None
    gene_key: str | None = None
    species: str = "auto"
    batch_key: str | None = None
    genome: str | None = None
    measurement: str | None = None
    value_filter: str | None = None
    targeted_panel: bool = False

    @classmethod
    def coerce(cls, item: str | os.PathLike | Mapping | CorpusInput) -> CorpusInput:
        if isinstance(item, CorpusInput):
            return item
        if isinstance(item, str | os.PathLike):
            return cls(path=str(item))
        item = dict(item)
        if "census" in item:
            item.update(_census_settings(item.pop("census"), has_path="path" in item))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(item) - fields
        if unknown:
            raise ValueError(
                f"Unknown corpus input settings {sorted(unknown)}; allowed: {sorted(fields)}, or census=... alone."
            )
        return cls(**{k: (str(v) if k == "path" else v) for k, v in item.items()})

    @property
    def is_soma(self) -> bool:
        return self.path.startswith(CENSUS_PREFIX) or is_soma_uri(self.path)

    @property
    def name(self) -> str:
        base = self.path if self.path.startswith(CENSUS_PREFIX) else Path(self.path).name
        return f"{base}:{self.modality}" if self.modality else base

    def fingerprint(self) -> dict:
        """What identifies this input: its settings plus the file's size and modification time (for a local SOMA
        folder, the total size and latest modification of its files; a Census release is pinned by its version)."""
        settings = dataclasses.asdict(self)
        if not self.targeted_panel:  # only when set, so inputs fingerprinted before this setting existed keep theirs
            del settings["targeted_panel"]
        if self.path.startswith(CENSUS_PREFIX) or "://" in self.path:
            return settings
        path = Path(self.path)
        if not path.exists():
            raise InvalidInputError(f"{self.path}: no such file or folder. Check the path in the corpus inputs.")
        files = [f.stat() for f in path.rglob("*") if f.is_file()] if self.is_soma else [path.stat()]
        return {
            **settings,
            "path": str(path.resolve()),
            "size": sum(f.st_size for f in files),
            "mtime": max((f.st_mtime_ns for f in files), default=0),
        }

    def open(self, obs_columns: Sequence[str] = ()):
        """The input as a count source (``CountSource`` or ``SomaCountSource``); SOMA reads ``obs_columns`` only."""
        if self.is_soma:
            return self._open_soma(obs_columns)
        if self.measurement is not None or self.value_filter is not None:
            raise InvalidInputError(
                f"{self.path}: measurement= and value_filter= apply to TileDB-SOMA experiments only. Drop them, or "
                "point path at a SOMA experiment."
            )
        return open_counts(
            self.path,
            layer=self.layer,
            use_raw=self.use_raw,
            modality=self.modality,
            gene_key=self.gene_key,
            genome=self.genome,
            backed=True,
        )

    def _open_soma(self, obs_columns: Sequence[str]):
        from sc_foundation.data.soma import census_source, open_soma

        unsupported = {k: v for k, v in (("use_raw", self.use_raw), ("modality", self.modality)) if v}
        unsupported.update({"genome": self.genome} if self.genome else {})
        if unsupported:
            raise InvalidInputError(f"{self.path}: {sorted(unsupported)} do not apply to a SOMA experiment; drop them.")
        columns = [*obs_columns, *([self.batch_key] if self.batch_key else [])]
        if self.path.startswith(CENSUS_PREFIX):
            version, _, organism = self.path[len(CENSUS_PREFIX) :].partition("/")
            return census_source(version, organism, value_filter=self.value_filter, obs_columns=columns)
        return open_soma(
            self.path,
            measurement=self.measurement or "RNA",
            layer=self.layer or "raw",
            value_filter=self.value_filter,
            gene_key=self.gene_key or "feature_id",
            obs_columns=columns,
        )

    def n_rows(self) -> int | None:
        """Cells of an input that can be read in row ranges (``.h5ad``, SOMA), else None (read whole)."""
        if not (self.is_soma or self.path.lower().endswith(".h5ad")):
            return None
        with self.open() as source:
            return source.n_cells


def _census_settings(census: Mapping, has_path: bool) -> dict:
    """``{"census": {version, organism, value_filter}}`` as :class:`CorpusInput` settings."""
    if has_path:
        raise ValueError("A corpus input is either a path or census=..., not both.")
    allowed = {"version", "organism", "value_filter"}
    if not isinstance(census, Mapping) or set(census) - allowed or "version" not in census:
        raise ValueError(
            f"census= takes {{version, organism, value_filter}} (version required, e.g. '2025-01-30'), got {census!r}."
        )
    organism = census.get("organism", "homo_sapiens")
    return {"path": f"{CENSUS_PREFIX}{census['version']}/{organism}", "value_filter": census.get("value_filter")}


@dataclass
class ShardReport:
    """What happened to one input file."""

    source: str
    n_cells_in: int
    n_empty: int
    n_cells: int
    n_tokens: int
    n_truncated: int
    n_genes_in: int
    n_genes_matched: int
    n_genes_detected: int
    n_genes_detected_matched: int
    n_genes_duplicated: int
    species: str
    unmatched_examples: list[str]
    missing_obs_keys: list[str]
    seconds: float

    @property
    def match_rate(self) -> float:
        """Matched share of the genes detected in the file's first chunk (see ``GeneMatch``)."""
        return self.n_genes_detected_matched / max(self.n_genes_detected, 1)


@dataclass
class StoreReport:
    """The whole build: one :class:`ShardReport` per input, plus the vocabulary and where the store is."""

    path: str
    n_vocab: int
    shards: list[ShardReport]
    seconds: float = 0.0
    resumed: list[str] = field(default_factory=list)
    reused: bool = False
    """The store was complete already (built earlier, or by another process while this one waited)."""

    @property
    def n_cells(self) -> int:
        return sum(s.n_cells for s in self.shards)

    def format(self) -> str:
        """A table for people: one line per file, then the totals."""
        head = (
            f"{'source':<32} {'cells in':>9} {'empty':>6} {'cells':>8} {'detected genes matched':>24} "
            f"{'mean len':>9} {'trunc':>6}"
        )
        lines = [f"Corpus store {self.path}", head, "-" * len(head)]
        for s in self.shards:
            genes = f"{s.n_genes_detected_matched}/{s.n_genes_detected} {100 * s.match_rate:.1f}%"
            mean = s.n_tokens / max(s.n_cells, 1)
            lines.append(
                f"{s.source[:32]:<32} {s.n_cells_in:>9} {s.n_empty:>6} {s.n_cells:>8} {genes:>24} {mean:>9.1f} "
                f"{s.n_truncated:>6}"
            )
        total_in = sum(s.n_cells_in for s in self.shards)
        total_empty = sum(s.n_empty for s in self.shards)
        tokens = sum(s.n_tokens for s in self.shards)
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<32} {total_in:>9} {total_empty:>6} {self.n_cells:>8} {'vocabulary ' + str(self.n_vocab):>24} "
            f"{tokens / max(self.n_cells, 1):>9.1f}"
        )
        for s in self.shards:
            if s.n_genes_in > s.n_genes_matched:
                lines.append(f"  {s.source}: unmatched genes e.g. {', '.join(s.unmatched_examples[:6])}")
            if s.missing_obs_keys:
                lines.append(f"  {s.source}: obs columns absent (stored as null): {s.missing_obs_keys}")
        if self.reused:
            lines.append(f"reused a complete store (built in {self.seconds:.1f} s)")
        else:
            resumed = f"; reused {len(self.resumed)} finished shards" if self.resumed else ""
            lines.append(f"built in {self.seconds:.1f} s{resumed}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class _Part:
    """Rows ``start .. stop - 1`` of input ``input``; ``stop`` None reads to the end (inputs read whole)."""

    input: int
    index: int
    start: int
    stop: int | None

    @property
    def name(self) -> str:
        return f"{self.input:05d}-{self.index:05d}"


def _plan_parts(specs: Sequence[CorpusInput], part_size: int) -> list[_Part]:
    """Every input cut into row ranges of ``part_size`` cells: fixed by the inputs and ``part_size`` alone, so the
    store is the same whatever the number of workers or ranks."""
    parts = []
    for k, spec in enumerate(specs):
        n = spec.n_rows()
        if n == 0:
            raise InvalidInputError(
                f"{spec.path}: holds no cells (0 rows): remove it from the corpus inputs (data.files or data.datasets) "
                "or pass the file with its cells"
            )
        if n is None or n <= part_size:
            parts.append(_Part(k, 0, 0, None))
            continue
        parts += [_Part(k, j, lo, min(lo + part_size, n)) for j, lo in enumerate(range(0, n, part_size))]
    return parts


def _part_statistics(spec: CorpusInput, part: _Part, target_sum: float, chunk_size: int, out: str) -> str:
    """Pass 1 over one part: per-gene detection counts and value histograms, saved to ``out``."""
    with spec.open() as source:
        resolution = resolve_genes(source.gene_names, species=spec.species)
        canonical = resolution.canonical
        if pd.isna(canonical).all():
            raise GeneMatchError(
                f"{spec.path}: none of its {len(canonical)} gene names resolves to a known gene (species "
                f"{resolution.species}), e.g. {resolution.names[:8].tolist()}. Point gene_key at the var column with "
                "gene symbols or Ensembl ids, or set species."
            )
        codes, genes = pd.factorize(pd.Series(canonical, dtype=object), use_na_sentinel=True)
        _, aggregate = aggregate_columns(codes.astype(np.int64))
        stats = GeneStatistics.empty(list(genes))
        for _, counts in source.iter_chunks(chunk_size, start=part.start, stop=part.stop):
            normalised, _ = normalise_counts(counts, aggregate, target_sum, sort_indices=False)
            stats.update(normalised)
    stats.save(out)
    return out


def _write_part(
    spec: CorpusInput, part: _Part, store_dir: str, chunk_size: int, obs_keys: Sequence[str], vocab_hint: str
) -> dict:
    """Pass 2 over one part: tokenize it chunk by chunk into ``shards/{part}.arrow`` and write its report."""
    started = time.perf_counter()
    tokenizer = GeneTokenizer.from_pretrained(store_dir)
    shard = Path(store_dir) / "shards" / f"{part.name}.arrow"
    tmp = shard.with_name(f".{shard.name}.tmp")
    counts_in = empty = tokens = truncated = 0
    with spec.open(obs_columns=obs_keys) as source:
        try:
            match, chunks = tokenizer.match_source(
                source, chunk_size=chunk_size, species=spec.species, start=part.start, stop=part.stop
            )
        except GeneMatchError as error:
            raise GeneMatchError(f"{error} {vocab_hint}".strip()) from error
        obs = source.obs
        if spec.batch_key is not None and spec.batch_key not in obs.columns:
            raise InvalidInputError(
                f"{spec.path}: batch_key={spec.batch_key!r} is not an obs column; obs columns: {list(obs.columns)}."
            )
        missing = [k for k in obs_keys if k not in obs.columns]
        keys = cell_keys(obs.index[part.start : part.stop])
        schema = _shard_schema(obs_keys, tokenizer, chunk_size)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for start, counts in chunks:
                n = counts.shape[0]
                cells = tokenizer.encode(counts, match, keys[start - part.start : start - part.start + n])
                counts_in += n
                empty += n - len(cells)
                tokens += len(cells.gene_ids)
                truncated += int((cells.n_expressed > tokenizer.config.max_genes).sum())
                chunk_obs = obs.iloc[start + cells.rows]
                writer.write_batch(_record_batch(cells, chunk_obs, spec, obs_keys, schema))
    os.replace(tmp, shard)
    report = ShardReport(
        source=spec.name,
        n_cells_in=counts_in,
        n_empty=empty,
        n_cells=counts_in - empty,
        n_tokens=tokens,
        n_truncated=truncated,
        n_genes_in=match.n_input,
        n_genes_matched=match.n_matched,
        n_genes_detected=match.n_detected,
        n_genes_detected_matched=match.n_detected_matched,
        n_genes_duplicated=match.n_duplicated,
        species=match.resolution.species,
        unmatched_examples=match.unmatched_examples,
        missing_obs_keys=missing,
        seconds=time.perf_counter() - started,
    )
    _atomic_write_text(shard.with_suffix(".json"), json.dumps(dataclasses.asdict(report)))
    return dataclasses.asdict(report)


def token_types(tokenizer: GeneTokenizer) -> tuple[pa.DataType, pa.DataType | None]:
    """The narrowest Arrow types that hold a store's gene ids and values exactly.

    Ids: uint16 below 65,536 vocabulary entries, else uint32 (``gene_ids`` of a rank store; other encodings store
    steps between ids instead, see :func:`delta_coded`). Values: ``binned`` bins (and the CLS value, when it is a
    whole number) in uint8, or int8 when the CLS value is negative (scGPT's -2); ``continuous`` float32; ``rank``
    none at all, since its values are the order of the genes, which the ids already hold (the model ignores them).
    """
    ids = pa.uint16() if len(tokenizer.vocab) <= 2**16 else pa.uint32()
    config = tokenizer.config
    if config.encoding == "rank":
        return ids, None
    if config.encoding == "binned" and float(config.cls_value).is_integer():
        low, high = min(0, config.cls_value), max(config.n_bins - 1, config.cls_value)
        for candidate, (lo, hi) in ((pa.uint8(), (0, 255)), (pa.int8(), (-128, 127))):
            if lo <= low and high <= hi:
                return ids, candidate
    return ids, pa.float32()


def delta_coded(tokenizer: GeneTokenizer) -> bool:
    """Whether a store keeps its gene ids as steps (:func:`delta_encode`): every encoding but ``rank`` keeps a cell's
    genes in vocabulary order, so its steps are small; rank orders them by value, so its steps are not."""
    return tokenizer.config.encoding != "rank"


def delta_encode(gene_ids: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cells' gene ids as one-byte steps plus the steps that do not fit, in full (format 3).

    Args:
        gene_ids: (T,) integer ids of the cells concatenated.
        offsets: (n_cells + 1,) where each cell starts in ``gene_ids``, then the end.
    Returns:
        (T,) uint8 ``deltas``: each id minus the one before in its cell (the first minus 0), 0 where that step is
        outside ``1..MAX_DELTA``; (E,) int32 ``exceptions``: those steps, in order; (n_cells + 1,) int64 where each
        cell's exceptions start, then the end. Any ids round-trip, in any order; sorted ids rarely need exceptions.
    """
    ids = gene_ids.astype(np.int64)
    steps = np.diff(ids, prepend=0)
    starts = offsets[:-1][np.diff(offsets) > 0]
    steps[starts] = ids[starts]
    exception = (steps < 1) | (steps > MAX_DELTA)
    deltas = np.where(exception, 0, steps).astype(np.uint8)
    before = np.concatenate([[0], np.cumsum(exception)])
    return deltas, steps[exception].astype(np.int32), before[offsets]


def delta_decode(ids: np.ndarray, exceptions: np.ndarray, lengths: np.ndarray) -> None:
    """Undo :func:`delta_encode` for a batch of cells, in place, without a loop over cells or tokens.

    Args:
        ids: (T,) int64 stored ``gene_id_deltas`` of the cells concatenated; overwritten with their gene ids.
        exceptions: (E,) the cells' ``gene_id_exceptions`` concatenated in the same order (one per 0 in ``ids``).
        lengths: (B,) tokens per cell; each cell's running sum restarts at 0.
    """
    if not ids.size:
        return
    ids[ids == 0] = exceptions  # numpy refuses a count that differs: a store whose lists do not match
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    # One running sum over the whole batch: each cell's first step is lowered by the last id of the cell before it
    # (the sum of that cell's steps), so the sum restarts at every cell without a second pass over the tokens.
    last_ids = np.add.reduceat(ids, starts)
    ids[starts[1:]] -= last_ids[:-1]
    np.cumsum(ids, out=ids)


def _shard_schema(obs_keys: Sequence[str], tokenizer: GeneTokenizer, chunk_size: int) -> pa.Schema:
    ids, values = token_types(tokenizer)
    # 32-bit list offsets when a chunk's tokens surely fit them (4 bytes a cell less per list).
    fits = chunk_size * tokenizer.config.context_length < 2**31
    as_list = pa.list_ if fits else pa.large_list
    # Labels repeat across cells: dictionary-encoded, each cell stores a 4-byte code.
    labels = pa.dictionary(pa.int32(), pa.string())
    return pa.schema(
        [
            pa.field("cell_id", pa.string()),
            *[pa.field(name, labels) for name in ("source", "batch", *obs_keys)],
            pa.field("length", pa.int32()),
            pa.field("n_counts", pa.float32()),
            pa.field("n_expressed", pa.int32()),
            *(
                [pa.field("gene_id_deltas", as_list(pa.uint8())), pa.field("gene_id_exceptions", as_list(pa.int32()))]
                if delta_coded(tokenizer)
                else [pa.field("gene_ids", as_list(ids))]
            ),
            *([pa.field("values", as_list(values))] if values is not None else []),
        ]
    )


def _record_batch(cells, obs: pd.DataFrame, spec: CorpusInput, obs_keys: Sequence[str], schema) -> pa.RecordBatch:
    n = len(cells)

    def strings(column, type_) -> pa.Array:
        values = pd.Series(column, dtype=object)
        array = pa.array(values.astype(str).where(pd.notna(values), None).tolist(), type=pa.string())
        return array.dictionary_encode() if pa.types.is_dictionary(type_) else array

    def tokens(array: np.ndarray, field: pa.Field, offsets: np.ndarray = cells.offsets) -> pa.Array:
        offsets = pa.array(offsets, type=pa.int32() if pa.types.is_list(field.type) else pa.int64())
        list_type = pa.ListArray if pa.types.is_list(field.type) else pa.LargeListArray
        narrow = field.type.value_type.to_pandas_dtype()
        # The types were chosen so that every value fits (token_types); check rather than wrap around silently.
        cast = array.astype(narrow)
        if not np.array_equal(cast, array):
            raise ValueError(f"{field.name} do not fit {field.type}: the store's types do not match its tokenizer")
        return list_type.from_arrays(offsets, pa.array(cast))

    batch = obs[spec.batch_key] if spec.batch_key else [spec.name] * n
    columns = {
        "cell_id": strings(obs.index, pa.string()),
        "source": strings([spec.name] * n, schema.field("source").type),
        "batch": strings(list(batch), schema.field("batch").type),
        **{k: strings(list(obs[k]) if k in obs.columns else [None] * n, schema.field(k).type) for k in obs_keys},
        "length": pa.array(cells.lengths, type=pa.int32()),
        "n_counts": pa.array(cells.n_counts, type=pa.float32()),
        "n_expressed": pa.array(cells.n_expressed, type=pa.int32()),
    }
    if "gene_ids" in schema.names:
        columns["gene_ids"] = tokens(cells.gene_ids, schema.field("gene_ids"))
    else:
        deltas, exceptions, exception_offsets = delta_encode(cells.gene_ids, cells.offsets)
        columns["gene_id_deltas"] = tokens(deltas, schema.field("gene_id_deltas"))
        field = schema.field("gene_id_exceptions")
        columns["gene_id_exceptions"] = tokens(exceptions, field, exception_offsets)
    if "values" in schema.names:
        columns["values"] = tokens(cells.values, schema.field("values"))
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)


@contextlib.contextmanager
def _worker_pool(num_workers: int, n_jobs: int):
    """A ``run(function, jobs)`` callable: ``function(*job)`` for each job, results in job order.

    With ``num_workers > 1`` the jobs run in one pool of worker processes that serves both passes of a build, so
    each worker imports the package once.
    """
    if num_workers <= 1 or n_jobs <= 1:
        yield lambda function, jobs: [function(*job) for job in jobs]
        return
    # spawn, not fork: the parent may hold torch or HDF5 state that is unsafe to fork. The workers die with this
    # process (a killed build must not leave them running).
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(num_workers, n_jobs), mp_context=context, **pool_initializer()) as pool:
        yield lambda function, jobs: list(pool.map(function, *zip(*jobs, strict=True))) if jobs else []


def _refuse_while_bootstrapping() -> None:
    """Fail at once in a worker process that is importing the parent's main script.

    Build workers are spawned: each imports the user's main script again. A script that calls ``build_store`` at
    its top level, without ``if __name__ == "__main__":``, would start a second build in every worker, which waits
    for the build lock its parent holds: a silent deadlock. ``_inheriting`` is the flag Python's own spawn check
    reads for this moment (``multiprocessing.spawn._check_not_importing_main``).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            f"build_store was called while a worker process was importing the main script "
            f"({sys.argv[0] or 'your script'}): worker processes run its top-level "
            'code again. Put the code that builds stores or trains under `if __name__ == "__main__":`.'
        )


def launcher_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from the launcher running this process: torchrun's ``RANK``/``WORLD_SIZE``, or a SLURM
    array's ``SLURM_ARRAY_TASK_ID`` (from ``SLURM_ARRAY_TASK_MIN``) and ``SLURM_ARRAY_TASK_COUNT``; else ``(0, 1)``."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", 0)), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"])
    return 0, 1


def build_store(
    inputs: Iterable[str | os.PathLike | Mapping | CorpusInput],
    out_dir: str | os.PathLike,
    *,
    tokenizer_config: TokenizerConfig | None = None,
    tokenizer: GeneTokenizer | None = None,
    vocab: GeneVocab | str | os.PathLike | None = None,
    min_cells_per_gene: int = 10,
    obs_keys: Sequence[str] = (),
    chunk_size: int = 8192,
    num_workers: int = 1,
    part_size: int = PART_SIZE,
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
) -> StoreReport | None:
    """Tokenize count files into a corpus store at ``out_dir``; resume an interrupted build of the same plan.

    Safe to call from many processes at once: one builds, under a lock beside ``out_dir``, and the others wait for
    it and reuse the store.

    Args:
        inputs: files or SOMA experiments (paths, or :class:`CorpusInput` settings as objects or dicts).
        out_dir: the store directory; ``{plan}`` in it is replaced by :func:`plan_digest` of this build's plan, so a
            cache keeps one folder per corpus (``overwrite`` is then never needed).
        tokenizer_config: encoding, context length and the rest (default :class:`TokenizerConfig`).
        tokenizer: a complete tokenizer to encode with as it is (vocabulary, settings and rank medians), e.g. a
            pretrained model's ``gene_tokenizer`` for fine-tuning data; excludes ``tokenizer_config`` and ``vocab``.
        vocab: a fixed vocabulary (object, ``gene_vocab.json``/``vocab.txt`` path); by default one is built from
            the genes detected in at least ``min_cells_per_gene`` cells of the corpus.
        obs_keys: obs columns to keep with each cell (labels, donors...); files lacking one store nulls.
        chunk_size: cells read and tokenized at a time; memory grows with it, not with the file.
        num_workers: parts processed in parallel (one process each).
        part_size: an ``.h5ad`` or SOMA input of more cells is cut into row ranges of this many cells (parts), so
            one large input is shared out among workers and ranks. The parts depend on this alone: the same cells
            give the same store whatever ``num_workers``, ``rank`` and ``world_size``.
        rank, world_size: build only the parts ``rank, rank + world_size, ...`` (launcher ranks, see
            :func:`launcher_rank`); the ranks run at once, without the build lock, and wait for each other only for
            the gene statistics that make the vocabulary. Such a call returns None; afterwards one call without
            ``rank`` (the merge step, or :func:`merge_store`) finds every part done and writes the manifest.
        overwrite: replace a store built with another plan (otherwise that is an error); a store that another
            process has open is never replaced.
    """
    _refuse_while_bootstrapping()
    started = time.perf_counter()
    specs = [CorpusInput.coerce(item) for item in inputs]
    reserved = sorted(set(obs_keys) & set(RESERVED_COLUMNS))
    if reserved:
        raise ValueError(
            f"obs_keys {reserved} clash with columns every store has ({list(RESERVED_COLUMNS)}). The store's "
            "'batch' comes from each input's batch_key (e.g. {'path': ..., 'batch_key': 'batch'}); rename other "
            "obs columns before building."
        )
    if not specs:
        raise ValueError("build_store needs at least one input file.")
    if tokenizer is not None and (tokenizer_config is not None or vocab is not None):
        raise ValueError("Pass either tokenizer= or tokenizer_config=/vocab=, not both.")
    if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
        raise ValueError(f"rank and world_size go together with 0 <= rank < world_size, got {rank}, {world_size}.")
    if part_size < 1:
        raise ValueError(f"part_size must be a positive number of cells, got {part_size}.")
    config = tokenizer.config if tokenizer is not None else tokenizer_config or TokenizerConfig()
    if tokenizer is not None:
        vocab = tokenizer.vocab
    fixed_vocab = None if vocab is None else vocab if isinstance(vocab, GeneVocab) else GeneVocab.from_file(vocab)
    parts = _plan_parts(specs, part_size)
    plan = {
        "inputs": [s.fingerprint() for s in specs],
        "tokenizer": dataclasses.asdict(config),
        "vocab": None if fixed_vocab is None else hashlib.sha256("\n".join(fixed_vocab.tokens).encode()).hexdigest(),
        "medians": None
        if tokenizer is None or tokenizer.gene_medians is None
        else hashlib.sha256(tokenizer.gene_medians.tobytes()).hexdigest(),
        "min_cells_per_gene": min_cells_per_gene,
        "obs_keys": list(obs_keys),
        "format": FORMAT,
        "gene_id_rules": GENE_ID_RULES,
        "parts": [dataclasses.astuple(p) for p in parts],
    }
    if config.library_size == "panel":
        # Since 2026-12-04 n_counts holds the panel total these stores divide by (it held the input's total): a
        # store built before does not share this plan, so it is never reused with the wrong library.
        plan["n_counts"] = "library"
    out = Path(str(out_dir).replace(PLAN_PLACEHOLDER, plan_digest(plan)))
    if PLAN_PLACEHOLDER in str(out_dir):
        sweep_unfinished_stores(out.parent, keep=out)
    mine = parts if rank is None else parts[rank::world_size]
    with contextlib.ExitStack() as held:
        if rank is None:
            held.enter_context(_build_lock(out))
            _prepare_directory(out, plan, overwrite)
            if (out / MANIFEST).exists():
                return load_report(out, reused=True)
        else:
            with _build_lock(out):  # only to write the plan: the ranks then work side by side
                _prepare_directory(out, plan, overwrite=False, clean=False)
                held.enter_context(_building(out))  # taken before the build lock goes: never a moment unheld
        with (
            _discard_if_failed(out) if rank is None else contextlib.nullcontext(),
            _worker_pool(num_workers, len(mine)) as run,
        ):
            # Pass 1: gene statistics, when a vocabulary must be built or the tokenizer needs medians.
            if tokenizer is None and (fixed_vocab is None or config.needs_medians):
                (out / "stats").mkdir(exist_ok=True)
                todo = [
                    (specs[p.input], p, config.target_sum, chunk_size, str(out / "stats" / f"{p.name}.npz"))
                    for p in mine
                    if not (out / "stats" / f"{p.name}.npz").exists()
                ]
                run(_part_statistics, todo)
                files = [out / "stats" / f"{p.name}.npz" for p in parts]
                if rank is not None:
                    _wait_for(files, f"rank {rank}/{world_size}: the gene statistics of the other ranks")
                stats = GeneStatistics.empty([])
                for file in files:
                    stats = stats.merge(GeneStatistics.load(file))
            if tokenizer is None:
                built = fixed_vocab is None
                vocabulary = _build_vocabulary(stats, min_cells_per_gene, specs) if built else fixed_vocab
                medians = stats.medians_for(vocabulary) if config.needs_medians else None
                tokenizer = GeneTokenizer(vocabulary, config, medians)
            saved = (out / "gene_tokenizer.json").exists() and GeneTokenizer.from_pretrained(out) == tokenizer
            if not saved:
                tokenizer.save(out)  # every rank computes the same tokenizer; the files are written atomically

            # Pass 2: one shard per part; a shard with its report is finished and is not redone.
            (out / "shards").mkdir(exist_ok=True)
            done = [p for p in parts if (out / "shards" / f"{p.name}.json").exists()]
            vocab_hint = (
                ""
                if fixed_vocab is not None
                else "The vocabulary was built from this corpus with "
                f"min_cells_per_gene={min_cells_per_gene}: genes seen in fewer cells are left out, so on a small "
                "corpus lower min_cells_per_gene."
            )
            todo = [
                (specs[p.input], p, str(out), chunk_size, tuple(obs_keys), vocab_hint) for p in mine if p not in done
            ]
            run(_write_part, todo)
        if rank is not None:
            return None
        report = _write_manifest(out, plan, started, resumed=list(dict.fromkeys(specs[p.input].name for p in done)))
        return report


def merge_store(out_dir: str | os.PathLike) -> StoreReport:
    """The merge step after launcher ranks built their parts: write the manifest of the store at ``out_dir``.

    Raises:
        FileNotFoundError: no plan there, or parts not built yet (named, with the rank that owns them).
    """
    out = Path(out_dir)
    if not (out / PLAN).exists():
        raise FileNotFoundError(f"{out} holds no store plan ({PLAN}): build_store with rank= was not run there.")
    with _build_lock(out):
        if (out / MANIFEST).exists():
            return load_report(out, reused=True)
        return _write_manifest(out, json.loads((out / PLAN).read_text()), time.perf_counter(), resumed=[])


def _write_manifest(out: Path, plan: dict, started: float, resumed: list[str]) -> StoreReport:
    """Check that every part of ``plan`` is built, then write ``manifest.json`` (the store is then complete)."""
    parts = [_Part(*p) for p in plan["parts"]]
    missing = [p.name for p in parts if not (out / "shards" / f"{p.name}.json").exists()]
    if missing:
        raise FileNotFoundError(
            f"{out}: {len(missing)} of {len(parts)} parts are not built yet (e.g. {missing[:5]}). Run the missing "
            "ranks (part k belongs to rank k % world_size) or build_store without rank= to finish them here."
        )
    reports = []
    for k in range(len(plan["inputs"])):
        pieces = [json.loads((out / "shards" / f"{p.name}.json").read_text()) for p in parts if p.input == k]
        # The gene match is the input's (read from its first rows by every part); the counts add up.
        summed = {f: sum(r[f] for r in pieces) for f in _ADDITIVE_REPORT_FIELDS}
        reports.append(ShardReport(**{**pieces[0], **summed}))
    tokenizer = GeneTokenizer.from_pretrained(out)
    report = StoreReport(
        path=str(out),
        n_vocab=len(tokenizer.vocab),
        shards=reports,
        seconds=time.perf_counter() - started,
        resumed=resumed,
    )
    manifest = {
        "format": plan.get("format", 1),
        "n_cells": report.n_cells,
        "shards": [f"shards/{p.name}.arrow" for p in parts],
        "obs_keys": list(plan["obs_keys"]),
        "report": dataclasses.asdict(report),
    }
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return report


_ADDITIVE_REPORT_FIELDS = ("n_cells_in", "n_empty", "n_cells", "n_tokens", "n_truncated", "seconds")
_WAIT_POLL_S = 1.0


def _wait_for(files: Sequence[Path], what: str) -> None:
    """Block until every file exists (written by other ranks), saying what it waits for once."""
    announced = False
    while not all(f.exists() for f in files):
        if not announced:
            missing = sum(not f.exists() for f in files)
            logger.info(f"{what}: waiting for {missing} of {len(files)} parts (every rank must run)")
            announced = True
        time.sleep(_WAIT_POLL_S)


def _build_vocabulary(stats: GeneStatistics, min_cells_per_gene: int, specs: Sequence[CorpusInput]) -> GeneVocab:
    """The vocabulary of the genes detected in at least ``min_cells_per_gene`` cells, or an error naming the inputs
    and the setting to change."""
    try:
        return GeneVocab.build(stats.cells_per_gene(), min_cells=min_cells_per_gene)
    except ValueError:
        names = ", ".join(s.path for s in specs[:5]) + (", ..." if len(specs) > 5 else "")
        raise ValueError(
            f"no gene of the corpus ({names}) is detected in at least min_cells_per_gene={min_cells_per_gene} cells, "
            "so the vocabulary would be empty: lower min_cells_per_gene (data.min_cells_per_gene on the command "
            "line) or add cells"
        ) from None


def _finished_pieces(out: Path) -> bool:
    """Whether a store folder holds anything a rerun would reuse: gene statistics or finished shards."""
    return any((out / "stats").glob("*.npz")) or any((out / "shards").glob("*.json"))


@contextlib.contextmanager
def _discard_if_failed(out: Path):
    """Around a build under the build lock: when it fails before finishing any piece, remove ``out`` (and its lock
    file), so a failed build leaves no folder of a plan file and empty sub-folders behind. A failure after some
    pieces keeps them for the rerun to resume from."""
    try:
        yield
    except BaseException:
        if not _finished_pieces(out):
            shutil.rmtree(out, ignore_errors=True)
            _lock_path(out).unlink(missing_ok=True)  # we hold its flock; see _build_lock for why this is safe
        raise


@contextlib.contextmanager
def _building(out: Path):
    """A launcher rank's hold on the store it builds without the build lock: a shared ``flock`` on its plan file, so
    that :func:`sweep_unfinished_stores` never removes a folder while a rank writes into it."""
    with open(out / PLAN, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH)
        yield


def sweep_unfinished_stores(cache: str | os.PathLike, keep: str | os.PathLike | None = None) -> list[Path]:
    """Remove the unfinished store folders under ``cache`` (a plan, no manifest) that no process is building.

    An unfinished folder of the same plan as a new build is resumed by it (``keep``); one of another plan is what a
    killed or failed build of other inputs or settings left, and no later run resumes it unless that corpus comes
    back. A folder is removed only while this process holds both its build lock and an exclusive lock on its plan,
    so never while a builder or a launcher rank works in it.

    Returns:
        the removed folders.
    """
    cache, removed = Path(cache), []
    if not cache.is_dir():
        return removed
    for folder in sorted(cache.iterdir()):
        if folder == Path(keep or "") or not (folder / PLAN).is_file() or (folder / MANIFEST).exists():
            continue
        with _build_lock(folder, wait=False) as held:
            if not held or (folder / MANIFEST).exists():
                continue
            with open(folder / PLAN, "rb") as plan:
                try:
                    fcntl.flock(plan, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a launcher rank is building it
                shutil.rmtree(folder, ignore_errors=True)
            _lock_path(folder).unlink(missing_ok=True)
            logger.info(f"Removed the unfinished corpus store {folder} (a killed or failed build of another plan)")
            removed.append(folder)
    return removed


def plan_digest(plan: dict) -> str:
    """12 hex digits of the SHA-256 of a build plan (inputs with their size and modification time, settings)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def _build_lock(out: Path, wait: bool = True):
    """Hold the exclusive build lock of the store ``out``: ``.<name>.lock`` beside it, naming its owner. Yields
    True; with ``wait=False``, yields False at once instead of waiting when another process holds it.

    An ``flock`` is released by the kernel when its holder exits, killed or not, so a dead builder never leaves a
    stale lock: the next process takes it and resumes the build. The holder may delete the lock file (a failed or
    swept build): whoever then gets the lock on the deleted file finds that the path no longer names it, and starts
    over on a new file, so two processes never hold the lock of one store.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(out)
    while True:
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    yield False
                    return
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                logger.info(f"Waiting for the build of the corpus store {out} by {owner} (lock {path})")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if not current:  # the previous holder deleted this lock file: lock the new one
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
            try:
                yield True
                return
            finally:
                handle.truncate(0)
                fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_directory(out: Path, plan: dict, overwrite: bool, clean: bool = True) -> None:
    """Start a store at ``out``, or check that the store already there follows the same plan. Needs the build lock.

    Replacing a store (``overwrite``) is refused while a :class:`CorpusStore` anywhere has it open. ``clean``
    deletes a killed builder's temporary files; launcher ranks pass False, since other ranks may be writing theirs.
    """
    plan_file = out / PLAN
    if plan_file.exists():
        if json.loads(plan_file.read_text()) == json.loads(json.dumps(plan)):
            for leftover in out.rglob(".*.tmp*") if clean else ():  # no other builder runs under the lock
                leftover.unlink()
            return
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a store built from other inputs or settings (see {plan_file}). Choose another "
                f"directory (a name holding {PLAN_PLACEHOLDER} gets one per plan), or pass overwrite=True to "
                "replace it."
            )
        _remove_unused(out)
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not a corpus store; choose an empty or new directory.")
        _remove_unused(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(plan_file, json.dumps(plan, indent=1))


def _remove_unused(out: Path) -> None:
    """Delete the store ``out`` unless a reader holds its manifest (see :class:`CorpusStore`)."""
    manifest = out / MANIFEST
    if not manifest.exists():
        shutil.rmtree(out)
        return
    with open(manifest, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(
                f"{out} holds a store of another plan that a running process is reading, so it is not replaced. "
                f"Use another directory (a name holding {PLAN_PLACEHOLDER} gets one per plan)."
            ) from None
        shutil.rmtree(out)


def load_report(store_dir: str | os.PathLike, reused: bool = False) -> StoreReport:
    """The build report saved in a complete store (``reused`` marks it as reused rather than just built)."""
    saved = json.loads((Path(store_dir) / MANIFEST).read_text())["report"]
    saved["shards"] = [ShardReport(**s) for s in saved["shards"]]
    return dataclasses.replace(StoreReport(**saved), reused=reused)


# ----------------------------------------------------------------------------------------------------- reading
def _concat_obs(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The shards' obs tables as one, categorical columns merged with the union of their categories.

    ``pd.concat`` would do the same but warns (a FutureWarning on every store opened) whenever a shard's column is
    all null, which an obs key absent from one input always is.
    """
    if not frames:
        return pd.DataFrame()
    if any(list(frame.columns) != list(frames[0].columns) for frame in frames):
        raise ValueError(f"the store's shards have different obs columns: {[list(f.columns) for f in frames]}")
    merged = {}
    for column in frames[0].columns:
        parts = [frame[column] for frame in frames]
        if all(isinstance(part.dtype, pd.CategoricalDtype) for part in parts):
            merged[column] = union_categoricals(parts, sort_categories=True, ignore_order=True)
        else:
            merged[column] = np.concatenate([part.to_numpy() for part in parts])
    return pd.DataFrame(merged)


class CorpusStore:
    """Random access to a complete store's cells.

    Attributes:
        tokenizer: the tokenizer the cells were encoded with (and its vocabulary).
        lengths: (n_cells,) int32 tokens per cell (CLS included).
        obs: per-cell metadata (``cell_id``, ``source``, ``batch``, the requested obs columns, ``n_counts``...).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            hint = (
                "its build did not finish: run the same build_store call again to complete it"
                if (self.path / PLAN).exists()
                else "build one with build_store (or `python train.py`)"
            )
            raise FileNotFoundError(f"{self.path} is not a complete corpus store ({MANIFEST} missing); {hint}.")
        # A shared lock on the manifest for as long as this object lives: build_store(overwrite=True) elsewhere
        # then refuses to delete the store under this reader.
        self._in_use = open(manifest_path, "rb")  # noqa: SIM115 (held open with the store)
        fcntl.flock(self._in_use, fcntl.LOCK_SH)
        manifest = json.loads(self._in_use.read())
        self.format = manifest.get("format", 1)
        if self.format > FORMAT:
            raise ValueError(
                f"{self.path} is a corpus store of format {self.format}, newer than this sc_foundation reads "
                f"(format {FORMAT}): upgrade sc_foundation, or rebuild the store with this version."
            )
        self.tokenizer = GeneTokenizer.from_pretrained(self.path)
        self.shard_paths = [self.path / s for s in manifest["shards"]]
        ids, values, exceptions, starts, spans, buffer_of_cell, obs = [], [], [], [], [], [], []
        for shard in self.shard_paths:
            table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
            names = table.column_names
            for batch in table.to_batches():
                buffer_of_cell.append(np.full(len(batch), len(ids), dtype=np.int32))
                # Zero-copy views of the memory-mapped buffers: format 1 int32 ids and float32 values; formats 2 and
                # 3 the narrow types of token_types, no values for rank, and format 3 ids as steps (delta_encode).
                delta = "gene_id_deltas" in names
                tokens = batch.column("gene_id_deltas" if delta else "gene_ids")
                starts.append(tokens.offsets.to_numpy()[:-1].astype(np.int64, copy=False))
                ids.append(tokens.values.to_numpy())
                values.append(batch.column("values").values.to_numpy() if "values" in names else None)
                if delta:
                    jumps = batch.column("gene_id_exceptions")
                    spans.append(jumps.offsets.to_numpy().astype(np.int64))
                    exceptions.append(jumps.values.to_numpy())
            obs.append(table.drop_columns([c for c in TOKEN_COLUMNS if c in names]).to_pandas())
        self._ids, self._values, self._exceptions = ids, values, exceptions
        self._delta = bool(exceptions)
        self._buffer = np.concatenate(buffer_of_cell) if buffer_of_cell else np.zeros(0, np.int32)
        self._start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        # (n_cells,) where each cell's exceptions start and end in its buffer (delta-coded stores only).
        self._exception_start = np.concatenate([s[:-1] for s in spans]) if spans else None
        self._exception_stop = np.concatenate([s[1:] for s in spans]) if spans else None
        self.obs = _concat_obs(obs)
        for column in ("source", "batch", *manifest["obs_keys"]):
            self.obs[column] = self.obs[column].astype("category")
        self.lengths = self.obs["length"].to_numpy(np.int32)

    def __reduce__(self):
        # Worker processes reopen the memory maps instead of receiving a pickled copy of every buffer.
        return CorpusStore, (str(self.path),)

    @property
    def vocab(self) -> GeneVocab:
        return self.tokenizer.vocab

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(gene ids, values) of one cell: (length,) int64 ids and (length,) float32 values (zeros for a rank store,
        which stores none); both copies."""
        ids, values, _ = self._gather(np.asarray([index], dtype=np.int64))
        return ids, values

    def _gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Cells ``indices`` concatenated: (T,) int64 gene ids, (T,) float32 values (0 where none are stored) and
        (B,) int64 lengths.

        One slice copy per cell out of its memory-mapped buffer (the cells of a batch lie in many buffers, so this
        beats any vectorised gather); a delta-coded store then decodes the whole batch at once (:func:`delta_decode`).
        """
        lengths = self.lengths[indices].astype(np.int64)
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if len(ends) else 0
        ids = np.empty(total, dtype=np.int64)
        values = np.zeros(total, dtype=np.float32)
        buffers = self._buffer[indices].tolist()
        slots = zip((ends - lengths).tolist(), ends.tolist(), buffers, self._start[indices].tolist(), strict=True)
        if self._delta:
            first, stop = self._exception_start[indices].tolist(), self._exception_stop[indices].tolist()
            parts = [self._exceptions[b][lo:hi] for b, lo, hi in zip(buffers, first, stop, strict=True)]
        for lo, hi, b, s in slots:
            ids[lo:hi] = self._ids[b][s : s + hi - lo]
            if self._values[b] is not None:
                values[lo:hi] = self._values[b][s : s + hi - lo]
        if self._delta:
            delta_decode(ids, np.concatenate(parts) if parts else np.zeros(0, np.int32), lengths)
        return ids, values, lengths

    def get_batch(self, indices: Sequence[int], pad_to_multiple: int = 8) -> dict[str, np.ndarray]:
        """Cells ``indices`` as one padded batch.

        Returns:
            ``input_ids`` (B, L) int64 (``<pad>`` after each cell), ``values`` (B, L) float32 (0 at padding),
            ``attention_mask`` (B, L) bool, ``cell_index`` (B,) int64; L is the longest cell rounded up to
            ``pad_to_multiple``.
        """
        indices = np.asarray(indices, dtype=np.int64)
        ids, values, lengths = self._gather(indices)
        return {**pad_flat(ids, values, lengths, self.vocab.pad_id, pad_to_multiple), "cell_index": indices}

    def get_packed(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Cells ``indices`` concatenated without padding (for varlen attention).

        Returns:
            ``input_ids`` (1, T) int64, ``values`` (1, T) float32, ``cu_seqlens`` (B + 1,) int32 cumulative lengths
            starting at 0, ``max_seqlen`` (), ``cell_index`` (B,) int64.
        """
        indices = np.asarray(indices, dtype=np.int64)
        ids, values, lengths = self._gather(indices)
        cu_seqlens = np.zeros(len(indices) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        return {
            "input_ids": ids[None],
            "values": values[None],
            "cu_seqlens": cu_seqlens,
            "max_seqlen": np.asarray(lengths.max(initial=0)),
            "cell_index": indices,
        }

    def to_hf_dataset(self):
        """The store as one HF ``datasets.Dataset`` over the same memory-mapped shard files (no copy).

        A delta-coded store's rows come with their real ``gene_ids`` in place of ``gene_id_deltas`` and
        ``gene_id_exceptions``: a ``with_transform`` decodes the rows each access reads (:func:`decode_rows`), which
        costs a pass over their tokens on top of the Python lists ``datasets`` builds anyway; nothing is written.
        ``column_names`` lists the stored columns, and a whole column is read as ``dataset[:]["gene_ids"]``.
        """
        import datasets

        dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in self.shard_paths])
        return dataset.with_transform(decode_rows) if self._delta else dataset


def decode_rows(batch: dict[str, list]) -> dict[str, list]:
    """A batch of store rows as ``datasets`` gives them (columns of Python lists) with ``gene_id_deltas`` and
    ``gene_id_exceptions`` replaced by the decoded ``gene_ids`` (lists of ints), the other columns as they are."""
    if "gene_id_deltas" not in batch:
        return batch
    deltas, exceptions = batch["gene_id_deltas"], batch["gene_id_exceptions"]
    lengths = np.fromiter(map(len, deltas), dtype=np.int64, count=len(deltas))
    ids = np.fromiter(itertools.chain.from_iterable(deltas), dtype=np.int64, count=int(lengths.sum()))
    delta_decode(ids, np.fromiter(itertools.chain.from_iterable(exceptions), dtype=np.int64), lengths)
    gene_ids = [
        ids[end - n : end].tolist() for end, n in zip(np.cumsum(lengths).tolist(), lengths.tolist(), strict=True)
    ]
    out = {}
    for name, column in batch.items():
        if name == "gene_id_deltas":
            out["gene_ids"] = gene_ids
        elif name != "gene_id_exceptions":
            out[name] = column
    return out
