"""Shared helpers of the benchmarks: the replicated real-data corpus, machine facts, atomic JSON output.

The benchmark corpus is made of real cells only: ``kang_ifnb`` (13,999 PBMCs) and ``pbmc3k`` (2,700 PBMCs, symbol
``var_names``) from the shared data folder, copied until the corpus holds the requested number of cells. Every copy
gets its own cell ids (suffix ``-r{k}``), so per-cell hashes (random gene subsets, masks) differ between copies. Kang
copies are concatenated into a few large files of about ``file_cells`` cells, pbmc3k copies likewise, so that a
store build really streams big files in chunks. The last copy of each dataset is cut short (to evenly spaced cells)
so that the corpus holds exactly ``n_cells`` cells, in the two datasets' natural proportion (about 84% Kang, 16%
pbmc3k).

Counts are kept as stored (uint16 CSR). Files are written uncompressed by default (anndata's default), which is the
fastest layout for the backed-AnnData peer of the loading benchmark; pass ``compression="gzip"`` to mimic the
shared files. A ``corpus.json`` next to the files records what was made; a later call with the same settings whose
files are all present with the right cell counts reuses them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import h5py
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO_ROOT / ".bench"
DEFAULT_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()
SOURCES = {"kang": "kang_ifnb/kang_ifnb.h5ad", "pbmc3k": "pbmc3k/pbmc3k.h5ad"}
CORPUS_MANIFEST = "corpus.json"
CORPUS_FORMAT = 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write; renamed to ``path`` (readable by all) when the block
    ends, deleted if it raises. A reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as JSON to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return Path(path)


def write_report(out: str | os.PathLike, name: str, record: dict, text: str) -> None:
    """A benchmark's results: ``record`` as ``<out>/<name>.json`` and its markdown ``text`` as ``<out>/<name>.md``
    (each through :func:`atomic_path`), and ``text`` on stdout."""
    write_json_atomic(Path(out) / f"{name}.json", record)
    with atomic_path(Path(out) / f"{name}.md") as tmp:
        tmp.write_text(text)
    print(text)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def cached_slice(source: Path, path: Path, cells: int, *, evenly_spaced: bool) -> Path:
    """``cells`` real cells of the shared file ``source`` as an ``.h5ad`` at ``path``, written once (atomically).

    ``evenly_spaced`` takes cells spread over the whole file (e.g. both Kang conditions), else the first ``cells``.
    """
    import anndata

    from sc_foundation.data.io import write_h5ad_atomic

    if not source.exists():
        raise FileNotFoundError(f"{source} is missing: the benchmarks run on the shared real data.")
    if path.exists():
        return path
    backed = anndata.read_h5ad(source, backed="r")
    try:
        if cells > backed.n_obs:
            raise ValueError(f"--cells {cells} exceeds the {backed.n_obs} cells of {source}")
        rows = np.linspace(0, backed.n_obs - 1, cells).round().astype(np.int64) if evenly_spaced else np.arange(cells)
        adata = backed[np.unique(rows)].to_memory()
    finally:
        backed.file.close()
    return write_h5ad_atomic(adata, path)


def cached_binned_store(files: list, store_dir: Path, context: int, **build) -> dict:
    """A binned corpus store of ``files`` at ``store_dir``: a complete store of the same plan comes back at once (no
    work), one of another plan is replaced. ``build`` goes to ``build_store`` (``min_cells_per_gene``, ...).

    Returns:
        ``path``, ``reused`` (nothing was built), ``seconds`` and ``cells``.
    """
    from sc_foundation.data.store import MANIFEST, build_store
    from sc_foundation.data.tokenization import TokenizerConfig

    seed = build.pop("seed", 0)
    manifest = store_dir / MANIFEST
    before = manifest.stat().st_mtime_ns if manifest.exists() else None
    started = time.perf_counter()
    config = TokenizerConfig(encoding="binned", context_length=context, seed=seed)
    report = build_store([str(f) for f in files], store_dir, tokenizer_config=config, overwrite=True, **build)
    seconds = time.perf_counter() - started
    reused = before is not None and manifest.stat().st_mtime_ns == before
    return {"path": str(store_dir), "reused": reused, "seconds": seconds, "cells": report.n_cells}


def machine_info() -> dict:
    """Facts about the machine and software a figure was measured with (load average: the machine may be shared)."""
    import psutil

    versions = {}
    for package in ("numpy", "scipy", "torch", "anndata", "h5py", "pyarrow", "pandas"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "cpus_usable": usable,
        "cpu_model": _cpu_model(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **versions,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cells_in(path: Path) -> int | None:
    """Rows of the ``X`` of an ``.h5ad`` file, read from its header only; None when unreadable."""
    try:
        with h5py.File(path, "r") as f:
            shape = f["X"].attrs["shape"] if "shape" in f["X"].attrs else f["X"].shape
            return int(shape[0])
    except (OSError, KeyError):
        return None


def _plan(n_cells: int, sizes: dict[str, int], file_cells: int) -> list[dict]:
    """Which copies of which dataset go into which file: ``[{"name", "source", "copies": [(k, n_rows)]}]``."""
    total = sum(sizes.values())
    # The natural proportion of the two datasets, rounded; both get at least one cell when n_cells allows.
    wanted = {"kang": round(n_cells * sizes["kang"] / total)}
    wanted["pbmc3k"] = n_cells - wanted["kang"]
    files = []
    for source, n_wanted in wanted.items():
        if n_wanted <= 0:
            continue
        size = sizes[source]
        copies = [(k, min(size, n_wanted - k * size)) for k in range(math.ceil(n_wanted / size))]
        per_file = max(1, round(file_cells / size))
        for f in range(0, len(copies), per_file):
            name = f"{source}_{f // per_file:03d}.h5ad"
            files.append({"name": name, "source": source, "copies": copies[f : f + per_file]})
    return files


def make_replicated_corpus(
    out_dir: str | os.PathLike | None = None,
    n_cells: int = 200_000,
    *,
    file_cells: int = 50_000,
    compression: str | None = None,
    data_dir: str | os.PathLike | None = None,
    verbose: bool = True,
) -> list[Path]:
    """Write (or reuse) a corpus of exactly ``n_cells`` real cells as a few ``.h5ad`` files; return their paths.

    Args:
        out_dir: folder for the files (default ``<repo>/.bench/corpus-{n_cells}``).
        n_cells: cells in the whole corpus.
        file_cells: about how many cells each file holds (whole copies of a dataset per file, at least one).
        compression: HDF5 compression of the written files (None, ``"gzip"``, ``"lzf"``).
        data_dir: the shared data folder (default ``<repo>/../shared/data``).
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    if n_cells < 2:
        raise ValueError(f"n_cells must be at least 2, got {n_cells}.")
    out = Path(out_dir) if out_dir is not None else DEFAULT_CACHE / f"corpus-{n_cells}"
    data = Path(data_dir) if data_dir is not None else DEFAULT_DATA
    sources = {name: data / relative for name, relative in SOURCES.items()}
    for path in sources.values():
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the benchmark corpus is built from the shared real data.")
    sizes = {name: _cells_in(path) for name, path in sources.items()}
    plan = _plan(n_cells, sizes, file_cells)
    manifest = {
        "format": CORPUS_FORMAT,
        "n_cells": n_cells,
        "file_cells": file_cells,
        "compression": compression,
        "sources": {name: {"path": str(path), "size": path.stat().st_size} for name, path in sources.items()},
        "files": [{"name": f["name"], "n_cells": sum(n for _, n in f["copies"])} for f in plan],
    }
    paths = [out / f["name"] for f in manifest["files"]]
    manifest_path = out / CORPUS_MANIFEST
    reusable = manifest_path.exists() and json.loads(manifest_path.read_text()) == manifest
    if reusable and all(_cells_in(p) == f["n_cells"] for p, f in zip(paths, manifest["files"], strict=True)):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    loaded = {}
    for spec, path in zip(plan, paths, strict=True):
        if spec["source"] not in loaded:
            loaded[spec["source"]] = anndata.read_h5ad(sources[spec["source"]])
        base = loaded[spec["source"]]
        parts, names, obs = [], [], []
        for k, rows in spec["copies"]:
            # A cut copy takes evenly spaced cells, keeping the dataset's composition (Kang lists ctrl then stim).
            take = np.unique(np.linspace(0, base.n_obs - 1, rows).round().astype(np.int64))
            parts.append(base.X[take])
            names.append(base.obs_names[take] + f"-r{k}")
            obs.append(base.obs.iloc[take])
        frame = pd.concat(obs)
        frame.index = pd.Index(np.concatenate(names), name=base.obs.index.name)
        adata = anndata.AnnData(X=sp.vstack(parts, format="csr"), obs=frame, var=base.var.copy())
        tmp = path.with_name(f".{path.stem}.tmp.h5ad")
        adata.write_h5ad(tmp, compression=compression)
        os.replace(tmp, path)
        if verbose:
            print(f"corpus: wrote {path} ({adata.n_obs:,} cells)", flush=True)
        del adata, parts
    write_json_atomic(manifest_path, manifest)
    return paths
