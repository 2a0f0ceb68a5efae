"""Shared fixtures: where the real datasets live (see ../shared/data/DATASETS.md)."""

import importlib
import math
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CELLBENCH = "cellbench_3cl/cellbench_3cl.h5ad"
"""The CellBench 3-cell-line file under the shared data: two protocols (obs ``batch``), three ``cell_type`` labels."""
TINY_ARCHITECTURE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "hidden_dropout_prob": 0.0,
}
"""The tests' tiny model (``ScFoundationConfig`` arguments beside the tokenizer's): seconds per fine-tuning run."""


def pytest_configure(config):
    """Under pytest-xdist (pyproject's addopts run two workers), each worker gets its share of the cores as torch
    threads: two workers of two threads on a 2-core machine oversubscribe it, and OpenMP's spinning threads then slow
    both down."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


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


@pytest.fixture(scope="session")
def cellbench(shared_data) -> Path:
    return shared_data / CELLBENCH


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, cellbench) -> Path:
    """A tiny, untrained masked-value model with a tokenizer built on cellbench: the fastest valid export to
    fine-tune.

    The tokenizer keeps each cell's top genes: with random gene subsets an untrained backbone memorises the
    training cells instead of learning their cell lines (val/loss rises from the start).
    """
    import torch

    from sc_foundation.data.store import CorpusStore, build_store
    from sc_foundation.data.tokenization import TokenizerConfig
    from sc_foundation.models.configuration import ScFoundationConfig
    from sc_foundation.models.export import export_pretrained
    from sc_foundation.models.modeling import ScFoundationForMaskedValueModeling

    root = tmp_path_factory.mktemp("pretrained")
    store = CorpusStore(
        build_store(
            [cellbench],
            root / "store",
            tokenizer_config=TokenizerConfig(context_length=256, truncation="top"),
            min_cells_per_gene=5,
        ).path
    )
    config = ScFoundationConfig.from_tokenizer(store.tokenizer, **TINY_ARCHITECTURE)
    torch.manual_seed(0)
    return export_pretrained(ScFoundationForMaskedValueModeling(config), store.tokenizer, root / "export")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Put back torch's thread count after every test: the benchmark smoke tests set it (``--threads 1``), and the
    exact save/load round trip of tests/test_modeling.py is not bitwise reproducible at one thread."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def import_benchmark():
    """``import_benchmark(name)``: a script of benchmarks/ as a module. The scripts import their helper ``_corpus``
    (and one another) as siblings, so benchmarks/ stays on ``sys.path`` while the test module runs."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


def small_recipe(cache: Path) -> list[str]:
    """Overrides that shrink ``experiment=cpu_pretrain`` to a smoke run of the pretraining benchmarks: CellBench
    alone, a 200-gene panel, batches of 16, its store under ``cache``."""
    return [
        "data.datasets=[cellbench_3cl]",
        f"paths.cache={cache}",
        "data.build_workers=1",
        "data.panel.n_top_genes=200",
        "data.tokenizer.min_match_rate=0.0",  # a 200-gene panel is 0.7% of cellbench's detected genes
        "data.loader.batch_size=16",
        "trainer.log_every_n_steps=2",
    ]


def assert_positive(record: dict, keys: list[str]) -> None:
    """Each ``record[key]`` is a finite number above zero (a measured figure)."""
    for key in keys:
        value = record[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value)


@pytest.fixture(scope="session")
def published(tmp_path_factory, shared_data) -> dict:
    """Small random stand-ins of the published checkpoints, written as the published folders (tests/published.py):
    ``{"scgpt": (folder, reference), "geneformer_v1": (folder, bert, medians), "geneformer_v2": (...)}``. The scGPT
    vocabulary is pbmc3k's gene symbols; the Geneformer ones are V1's real 25,426 tokens and a V2-shaped list."""
    import anndata

    from tests import published as stand_ins

    root = tmp_path_factory.mktemp("published")
    backed = anndata.read_h5ad(shared_data / "pbmc3k/pbmc3k.h5ad", backed="r")
    symbols = list(dict.fromkeys(backed.var_names))
    backed.file.close()
    v1, v2 = stand_ins.geneformer_v1_tokens(shared_data), stand_ins.geneformer_v2_tokens(shared_data)
    return {
        "scgpt": (root / "scgpt", stand_ins.write_scgpt_folder(root / "scgpt", symbols)),
        "geneformer_v1": (root / "gf_v1", *stand_ins.write_geneformer_folder(root / "gf_v1", v1)),
        "geneformer_v2": (
            root / "gf_v2",
            *stand_ins.write_geneformer_folder(root / "gf_v2", v2, max_position_embeddings=4096, seed=1),
        ),
    }
