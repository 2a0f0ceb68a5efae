"""The on-disk tokenized corpus: built from many count files in bounded memory, read back at random cheaply.

Layout of a store directory::

    gene_vocab.json, gene_tokenizer.json   the tokenizer the cells were encoded with
    plan.json                              inputs and settings; a rerun with the same plan resumes the build
    stats/00000.npz ...                    per-file gene statistics (vocabulary building, rank medians)
    shards/00000.arrow ...                 one Arrow IPC stream per input file, one record batch per chunk
    shards/00000.json ...                  the shard's report; written after the shard, so it marks it complete
    manifest.json                          written last: the store is complete only when this exists

Beside the directory, ``.<name>.lock`` serialises builders: N processes (DDP ranks, two runs, two checkouts sharing
a cache) asking for the same store build it once, the others wait and reuse it. A directory name holding ``{plan}``
gets the hash of the plan there, so different inputs or settings never share a folder and a stale cached store is
left to the runs still reading it.

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
import json
import logging
import multiprocessing
import os
import shutil
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from .gene_statistics import GeneStatistics
from .genes import GeneVocab, _atomic_write_text, resolve_genes
from .io import InvalidInputError, open_counts
from .tokenization import (
    GeneMatchError,
    GeneTokenizer,
    TokenizerConfig,
    aggregate_columns,
    cell_keys,
    normalise_counts,
    pad_cells,
)

MANIFEST = "manifest.json"
PLAN = "plan.json"
PLAN_PLACEHOLDER = "{plan}"
"""In a store directory name, replaced by :func:`plan_digest` of the store's plan (e.g. ``stores/binned-{plan}``)."""
TOKEN_COLUMNS = ("gene_ids", "values")
RESERVED_COLUMNS = ("cell_id", "source", "batch", "length", "n_counts", "n_expressed", *TOKEN_COLUMNS)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusInput:
    """One input file of a corpus and how to read it.

    Attributes:
        path: an ``.h5ad``, 10x ``.h5``, 10x ``matrix.mtx`` folder, or ``.h5mu`` (with ``modality``).
        layer: layer holding raw counts (default ``X``).
        use_raw: read counts from ``.raw``.
        modality: the modality of an ``.h5mu`` file.
        gene_key: ``var`` column with gene names or ids (default ``var_names``).
        species: ``"human"``, ``"mouse"`` or ``"auto"``.
        batch_key: ``obs`` column holding the batch; by default the file's name is the batch.
        genome: genome of a multi-genome 10x ``.h5``.
    """

    path: str
    layer: str | None = None
    use_raw: bool = False
    modality: str | None = None
    gene_key: str | None = None
    species: str = "auto"
    batch_key: str | None = None
    genome: str | None = None

    @classmethod
    def coerce(cls, item: str | os.PathLike | Mapping | CorpusInput) -> CorpusInput:
        if isinstance(item, CorpusInput):
            return item
        if isinstance(item, str | os.PathLike):
            return cls(path=str(item))
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(item) - fields
        if unknown:
            raise ValueError(f"Unknown corpus input settings {sorted(unknown)}; allowed: {sorted(fields)}.")
        return cls(**{k: (str(v) if k == "path" else v) for k, v in item.items()})

    @property
    def name(self) -> str:
        base = Path(self.path).name
        return f"{base}:{self.modality}" if self.modality else base

    def fingerprint(self) -> dict:
        """What identifies this input: its settings plus the file's size and modification time."""
        path = Path(self.path)
        if not path.exists():
            raise InvalidInputError(f"{self.path}: no such file or folder. Check the path in the corpus inputs.")
        stat = path.stat()
        return {
            **dataclasses.asdict(self),
            "path": str(path.resolve()),
            "size": stat.st_size,
            "mtime": stat.st_mtime_ns,
        }

    def open(self):
        return open_counts(
            self.path,
            layer=self.layer,
            use_raw=self.use_raw,
            modality=self.modality,
            gene_key=self.gene_key,
            genome=self.genome,
            backed=True,
        )


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
def _file_statistics(spec: CorpusInput, target_sum: float, chunk_size: int, out: str) -> str:
    """Pass 1 over one file: per-gene detection counts and value histograms, saved to ``out``."""
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
        for _, counts in source.iter_chunks(chunk_size):
            normalised, _ = normalise_counts(counts, aggregate, target_sum, sort_indices=False)
            stats.update(normalised)
    stats.save(out)
    return out


def _write_shard(
    spec: CorpusInput, store_dir: str, index: int, chunk_size: int, obs_keys: Sequence[str], vocab_hint: str
) -> dict:
    """Pass 2 over one file: tokenize it chunk by chunk into ``shards/{index}.arrow`` and write its report."""
    started = time.perf_counter()
    tokenizer = GeneTokenizer.from_pretrained(store_dir)
    shard = Path(store_dir) / "shards" / f"{index:05d}.arrow"
    tmp = shard.with_name(f".{shard.name}.tmp")
    counts_in = empty = tokens = truncated = 0
    with spec.open() as source:
        try:
            match, chunks = tokenizer.match_source(source, chunk_size=chunk_size, species=spec.species)
        except GeneMatchError as error:
            raise GeneMatchError(f"{error} {vocab_hint}".strip()) from error
        obs = source.obs
        if spec.batch_key is not None and spec.batch_key not in obs.columns:
            raise InvalidInputError(
                f"{spec.path}: batch_key={spec.batch_key!r} is not an obs column; obs columns: {list(obs.columns)}."
            )
        missing = [k for k in obs_keys if k not in obs.columns]
        keys = cell_keys(obs.index)
        schema = _shard_schema(obs_keys)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for start, counts in chunks:
                n = counts.shape[0]
                cells = tokenizer.encode(counts, match, keys[start : start + n])
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


def _shard_schema(obs_keys: Sequence[str]) -> pa.Schema:
    metadata = [pa.field(name, pa.string()) for name in ("cell_id", "source", "batch", *obs_keys)]
    return pa.schema(
        [
            *metadata,
            pa.field("length", pa.int32()),
            pa.field("n_counts", pa.float32()),
            pa.field("n_expressed", pa.int32()),
            pa.field("gene_ids", pa.large_list(pa.int32())),
            pa.field("values", pa.large_list(pa.float32())),
        ]
    )


def _record_batch(cells, obs: pd.DataFrame, spec: CorpusInput, obs_keys: Sequence[str], schema) -> pa.RecordBatch:
    n = len(cells)
    offsets = pa.array(cells.offsets, type=pa.int64())

    def strings(column) -> pa.Array:
        values = pd.Series(column, dtype=object).astype(str).where(pd.notna(pd.Series(column, dtype=object)), None)
        return pa.array(values.tolist(), type=pa.string())

    batch = obs[spec.batch_key] if spec.batch_key else [spec.name] * n
    columns = {
        "cell_id": strings(obs.index),
        "source": strings([spec.name] * n),
        "batch": strings(list(batch)),
        **{k: strings(list(obs[k])) if k in obs.columns else pa.nulls(n, pa.string()) for k in obs_keys},
        "length": pa.array(cells.lengths, type=pa.int32()),
        "n_counts": pa.array(cells.n_counts, type=pa.float32()),
        "n_expressed": pa.array(cells.n_expressed, type=pa.int32()),
        "gene_ids": pa.LargeListArray.from_arrays(offsets, pa.array(cells.gene_ids, type=pa.int32())),
        "values": pa.LargeListArray.from_arrays(offsets, pa.array(cells.values, type=pa.float32())),
    }
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
    # spawn, not fork: the parent may hold torch or HDF5 state that is unsafe to fork.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(num_workers, n_jobs), mp_context=context) as pool:
        yield lambda function, jobs: list(pool.map(function, *zip(*jobs, strict=True))) if jobs else []


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
    overwrite: bool = False,
) -> StoreReport:
    """Tokenize count files into a corpus store at ``out_dir``; resume an interrupted build of the same plan.

    Safe to call from many processes at once: one builds, under a lock beside ``out_dir``, and the others wait for
    it and reuse the store.

    Args:
        inputs: files (paths, or :class:`CorpusInput` settings as objects or dicts).
        out_dir: the store directory; ``{plan}`` in it is replaced by :func:`plan_digest` of this build's plan, so a
            cache keeps one folder per corpus (``overwrite`` is then never needed).
        tokenizer_config: encoding, context length and the rest (default :class:`TokenizerConfig`).
        tokenizer: a complete tokenizer to encode with as it is (vocabulary, settings and rank medians), e.g. a
            pretrained model's ``gene_tokenizer`` for fine-tuning data; excludes ``tokenizer_config`` and ``vocab``.
        vocab: a fixed vocabulary (object, ``gene_vocab.json``/``vocab.txt`` path); by default one is built from
            the genes detected in at least ``min_cells_per_gene`` cells of the corpus.
        obs_keys: obs columns to keep with each cell (labels, donors...); files lacking one store nulls.
        chunk_size: cells read and tokenized at a time; memory grows with it, not with the file.
        num_workers: files processed in parallel (one process each).
        overwrite: replace a store built with another plan (otherwise that is an error); a store that another
            process has open is never replaced.
    """
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
    config = tokenizer.config if tokenizer is not None else tokenizer_config or TokenizerConfig()
    if tokenizer is not None:
        vocab = tokenizer.vocab
    fixed_vocab = None if vocab is None else vocab if isinstance(vocab, GeneVocab) else GeneVocab.from_file(vocab)
    plan = {
        "inputs": [s.fingerprint() for s in specs],
        "tokenizer": dataclasses.asdict(config),
        "vocab": None if fixed_vocab is None else hashlib.sha256("\n".join(fixed_vocab.tokens).encode()).hexdigest(),
        "medians": None
        if tokenizer is None or tokenizer.gene_medians is None
        else hashlib.sha256(tokenizer.gene_medians.tobytes()).hexdigest(),
        "min_cells_per_gene": min_cells_per_gene,
        "obs_keys": list(obs_keys),
    }
    out = Path(str(out_dir).replace(PLAN_PLACEHOLDER, plan_digest(plan)))
    with _build_lock(out):
        _prepare_directory(out, plan, overwrite)
        if (out / MANIFEST).exists():
            return load_report(out, reused=True)
        with _worker_pool(num_workers, len(specs)) as run:
            # Pass 1: gene statistics, when a vocabulary must be built or the rank encoding needs medians.
            if tokenizer is None and (fixed_vocab is None or config.encoding == "rank"):
                (out / "stats").mkdir(exist_ok=True)
                todo = [
                    (s, config.target_sum, chunk_size, str(out / "stats" / f"{k:05d}.npz"))
                    for k, s in enumerate(specs)
                    if not (out / "stats" / f"{k:05d}.npz").exists()
                ]
                run(_file_statistics, todo)
                stats = GeneStatistics.empty([])
                for k in range(len(specs)):
                    stats = stats.merge(GeneStatistics.load(out / "stats" / f"{k:05d}.npz"))
            if tokenizer is None:
                if fixed_vocab is None:
                    vocabulary = GeneVocab.build(stats.cells_per_gene(), min_cells=min_cells_per_gene)
                else:
                    vocabulary = fixed_vocab
                medians = stats.medians_for(vocabulary) if config.encoding == "rank" else None
                tokenizer = GeneTokenizer(vocabulary, config, medians)
            saved = (out / "gene_tokenizer.json").exists() and GeneTokenizer.from_pretrained(out) == tokenizer
            if not saved:
                tokenizer.save(out)

            # Pass 2: one shard per file; a shard with its report is finished and is not redone.
            (out / "shards").mkdir(exist_ok=True)
            done = [k for k in range(len(specs)) if (out / "shards" / f"{k:05d}.json").exists()]
            vocab_hint = (
                ""
                if fixed_vocab is not None
                else "The vocabulary was built from this corpus with "
                f"min_cells_per_gene={min_cells_per_gene}: genes seen in fewer cells are left out, so on a small "
                "corpus lower min_cells_per_gene."
            )
            todo = [
                (s, str(out), k, chunk_size, tuple(obs_keys), vocab_hint) for k, s in enumerate(specs) if k not in done
            ]
            run(_write_shard, todo)
        reports = [ShardReport(**json.loads((out / "shards" / f"{k:05d}.json").read_text())) for k in range(len(specs))]
        report = StoreReport(
            path=str(out),
            n_vocab=len(tokenizer.vocab),
            shards=reports,
            seconds=time.perf_counter() - started,
            resumed=[specs[k].name for k in done],
        )
        manifest = {
            "format": 1,
            "n_cells": report.n_cells,
            "shards": [f"shards/{k:05d}.arrow" for k in range(len(specs))],
            "obs_keys": list(obs_keys),
            "report": dataclasses.asdict(report),
        }
        _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
        return report


def plan_digest(plan: dict) -> str:
    """12 hex digits of the SHA-256 of a build plan (inputs with their size and modification time, settings)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _build_lock(out: Path):
    """Hold the exclusive build lock of the store ``out``: ``.<name>.lock`` beside it, naming its owner.

    An ``flock`` is released by the kernel when its holder exits, killed or not, so a dead builder never leaves a
    stale lock: the next process takes it and resumes the build. The file itself stays (deleting it could let two
    processes hold locks on two different files).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            logger.info(f"Waiting for the build of the corpus store {out} by {owner} (lock {path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prepare_directory(out: Path, plan: dict, overwrite: bool) -> None:
    """Start a store at ``out``, or check that the store already there follows the same plan. Needs the build lock.

    Replacing a store (``overwrite``) is refused while a :class:`CorpusStore` anywhere has it open.
    """
    plan_file = out / PLAN
    if plan_file.exists():
        if json.loads(plan_file.read_text()) == json.loads(json.dumps(plan)):
            for leftover in out.rglob(".*.tmp*"):  # a killed builder's; no other builder runs under the lock
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
        self.tokenizer = GeneTokenizer.from_pretrained(self.path)
        self.shard_paths = [self.path / s for s in manifest["shards"]]
        ids, values, starts, buffer_of_cell, obs = [], [], [], [], []
        for shard in self.shard_paths:
            table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
            for batch in table.to_batches():
                gene_ids, vals = batch.column("gene_ids"), batch.column("values")
                buffer_of_cell.append(np.full(len(batch), len(ids), dtype=np.int32))
                # Zero-copy views of the memory-mapped buffers.
                starts.append(gene_ids.offsets.to_numpy()[:-1])
                ids.append(gene_ids.values.to_numpy())
                values.append(vals.values.to_numpy())
            obs.append(table.drop_columns(list(TOKEN_COLUMNS)).to_pandas())
        self._ids, self._values = ids, values
        self._buffer = np.concatenate(buffer_of_cell) if buffer_of_cell else np.zeros(0, np.int32)
        self._start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.obs = pd.concat(obs, ignore_index=True) if obs else pd.DataFrame()
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
        """(gene ids, values) of one cell: (length,) int32 and (length,) float32 views."""
        b, s, n = self._buffer[index], self._start[index], self.lengths[index]
        return self._ids[b][s : s + n], self._values[b][s : s + n]

    def get_batch(self, indices: Sequence[int], pad_to_multiple: int = 8) -> dict[str, np.ndarray]:
        """Cells ``indices`` as one padded batch.

        Returns:
            ``input_ids`` (B, L) int64 (``<pad>`` after each cell), ``values`` (B, L) float32 (0 at padding),
            ``attention_mask`` (B, L) bool, ``cell_index`` (B,) int64; L is the longest cell rounded up to
            ``pad_to_multiple``.
        """
        indices = np.asarray(indices, dtype=np.int64)
        batch = pad_cells([self[i] for i in indices], self.vocab.pad_id, pad_to_multiple)
        return {**batch, "cell_index": indices}

    def get_packed(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Cells ``indices`` concatenated without padding (for varlen attention).

        Returns:
            ``input_ids`` (1, T) int64, ``values`` (1, T) float32, ``cu_seqlens`` (B + 1,) int32 cumulative lengths
            starting at 0, ``max_seqlen`` (), ``cell_index`` (B,) int64.
        """
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        cu_seqlens = np.zeros(len(indices) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        input_ids = np.empty(int(cu_seqlens[-1]), dtype=np.int64)
        values = np.empty(int(cu_seqlens[-1]), dtype=np.float32)
        for lo, b, s, n in zip(cu_seqlens[:-1], self._buffer[indices], self._start[indices], lengths, strict=True):
            input_ids[lo : lo + n] = self._ids[b][s : s + n]
            values[lo : lo + n] = self._values[b][s : s + n]
        return {
            "input_ids": input_ids[None],
            "values": values[None],
            "cu_seqlens": cu_seqlens,
            "max_seqlen": np.asarray(lengths.max(initial=0)),
            "cell_index": indices,
        }

    def to_hf_dataset(self):
        """The store as one HF ``datasets.Dataset`` over the same memory-mapped shard files (no copy)."""
        import datasets

        return datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in self.shard_paths])
