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
