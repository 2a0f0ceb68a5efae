"""Shared fixtures: where the real datasets live (see ../shared/data/DATASETS.md)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder, ``<repo>/../shared/data``; tests needing it skip when it is absent."""
    path = (Path(__file__).parents[1] / "../shared/data").resolve()
    if not path.is_dir():
        pytest.skip(f"shared datasets not found at {path}: these tests need the real data described in DATASETS.md")
    return path


@pytest.fixture(scope="session")
def real_slice(shared_data):
    """``real_slice(relative, rows)``: the given rows of a shared ``.h5ad`` file as an in-memory AnnData (a copy)."""
    import anndata
    import numpy as np

    cache = {}

    def load(relative: str, rows) -> "anndata.AnnData":
        path = shared_data / relative
        if not path.exists():
            pytest.skip(f"{relative} is missing from {shared_data}")
        key = (relative, tuple(np.atleast_1d(np.arange(rows) if isinstance(rows, int) else rows).tolist()))
        if key not in cache:
            backed = anndata.read_h5ad(path, backed="r")
            cache[key] = backed[list(key[1])].to_memory()
            backed.file.close()
        return cache[key].copy()

    return load
