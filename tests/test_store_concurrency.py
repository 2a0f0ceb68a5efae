"""Corpus stores shared between processes: one build per plan however many ask, a folder per plan, no store deleted
under a reader, no stale lock after a killed builder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sc_foundation.data.store import PLAN_PLACEHOLDER, CorpusStore, build_store, launcher_rank, merge_store
from sc_foundation.data.tokenization import TokenizerConfig

ROOT = Path(__file__).parents[1]
KANG = "kang_ifnb/kang_ifnb.h5ad"
CONFIG = TokenizerConfig(context_length=64)
BUILD = """
import json, sys
from sc_foundation.data.store import build_store
from sc_foundation.data.tokenization import TokenizerConfig
report = build_store(
    [sys.argv[1]], sys.argv[2], tokenizer_config=TokenizerConfig(context_length=64), min_cells_per_gene=1,
    chunk_size=256,
)
print(json.dumps({"path": report.path, "reused": report.reused, "cells": report.n_cells}))
"""
HOLD_LOCK = """
import sys, time
from pathlib import Path
from sc_foundation.data.store import _build_lock
with _build_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def python(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


@pytest.fixture(scope="module")
def kang(real_slice, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kang") / "kang.h5ad"
    real_slice(KANG, np.arange(0, 12000, 15)).write_h5ad(path)  # 800 cells: builds overlap
    return path


def test_two_processes_on_a_cold_cache_build_one_store(kang, tmp_path):
    out = tmp_path / "cache" / f"binned-{PLAN_PLACEHOLDER}"
    runs = [subprocess.Popen(python(BUILD, kang, out), env=ENV, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    reports = []
    for run in runs:
        stdout, _ = run.communicate(timeout=300)
        assert run.returncode == 0
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    assert reports[0]["path"] == reports[1]["path"]
    assert sorted(r["reused"] for r in reports) == [False, True], "one process builds, the other waits and reuses"
    store = CorpusStore(reports[0]["path"])
    assert len(store) == reports[0]["cells"] == reports[1]["cells"] == 800
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [Path(store.path).name]


def test_each_plan_gets_its_own_folder_and_the_old_store_stays(kang, real_slice, tmp_path):
    out = tmp_path / f"binned-{PLAN_PLACEHOLDER}"
    first = build_store([kang], out, tokenizer_config=CONFIG, min_cells_per_gene=1)
    other = tmp_path / "other.h5ad"
    real_slice(KANG, 120).write_h5ad(other)
    second = build_store([other], out, tokenizer_config=CONFIG, min_cells_per_gene=1)
    assert first.path != second.path and PLAN_PLACEHOLDER not in first.path
    assert len(CorpusStore(first.path)) == 800 and len(CorpusStore(second.path)) == 120
    again = build_store([kang], out, tokenizer_config=CONFIG, min_cells_per_gene=1)
    assert again.path == first.path and again.reused


def test_a_store_in_use_is_not_replaced(kang, tmp_path):
    out = tmp_path / "store"
    build_store([kang], out, tokenizer_config=CONFIG, min_cells_per_gene=1)
    reader = CorpusStore(out)
    other = TokenizerConfig(context_length=32)
    with pytest.raises(FileExistsError, match="a running process is reading"):
        build_store([kang], out, tokenizer_config=other, min_cells_per_gene=1, overwrite=True)
    assert len(reader) == 800 and reader[0][0].size > 0
    del reader  # the last reader closes: now it may go
    build_store([kang], out, tokenizer_config=other, min_cells_per_gene=1, overwrite=True)
    assert CorpusStore(out).lengths.max() == 32


def test_a_killed_builder_leaves_no_stale_lock(kang, tmp_path):
    out = tmp_path / "store"
    holder = subprocess.Popen(python(HOLD_LOCK, out), env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = tmp_path / ".store.lock"
        assert f"pid {holder.pid} on " in lock.read_text(), "the lock file names its owner"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    started = time.perf_counter()
    report = build_store([kang], out, tokenizer_config=CONFIG, min_cells_per_gene=1)
    assert report.n_cells == 800 and not report.reused
    assert time.perf_counter() - started < 120


RANK_BUILD = """
import sys
from sc_foundation.data.store import build_store, launcher_rank
rank, world_size = launcher_rank()
result = build_store(
    [sys.argv[1]], sys.argv[2], tokenizer_config=TokenizerConfig(context_length=64), min_cells_per_gene=1,
    chunk_size=64, part_size=150, rank=rank, world_size=world_size,
)
assert result is None
""".replace("import sys\n", "import sys\nfrom sc_foundation.data.tokenization import TokenizerConfig\n", 1)


def test_launcher_ranks_build_parts_and_one_merge_writes_the_manifest(kang, tmp_path):
    """torchrun-style ranks (RANK, WORLD_SIZE) each build their row ranges of one input; merge_store completes the
    store, which holds exactly what one process builds alone."""
    out = tmp_path / "ranked"
    runs = [
        subprocess.Popen(python(RANK_BUILD, kang, out), env={**ENV, "RANK": str(rank), "WORLD_SIZE": "2"})
        for rank in range(2)
    ]
    for run in runs:
        assert run.wait(timeout=300) == 0
    shards = sorted(p.name for p in (out / "shards").glob("*.arrow"))
    assert shards == [f"00000-{k:05d}.arrow" for k in range(6)], "800 cells in parts of 150"
    assert not (out / "manifest.json").exists()
    report = merge_store(out)
    assert report.n_cells == 800 and [s.n_cells_in for s in report.shards] == [800]
    alone = build_store([kang], tmp_path / "alone", tokenizer_config=CONFIG, min_cells_per_gene=1, chunk_size=64)
    ranked, single = CorpusStore(out), CorpusStore(alone.path)
    assert ranked.tokenizer == single.tokenizer
    assert ranked.obs["cell_id"].tolist() == single.obs["cell_id"].tolist()
    for index in range(0, 800, 7):
        assert np.array_equal(ranked[index][0], single[index][0])
        assert np.array_equal(ranked[index][1], single[index][1])


def test_merge_names_the_parts_still_missing(kang, tmp_path):
    with pytest.raises(FileNotFoundError, match="no store plan"):
        merge_store(tmp_path / "nothing")
    # With a fixed vocabulary no rank waits for the others' statistics: rank 0 of 3 builds its parts and returns.
    vocab = build_store([kang], tmp_path / "vocab", tokenizer_config=CONFIG, min_cells_per_gene=1).path
    out = tmp_path / "partial"
    kw = {"tokenizer_config": CONFIG, "vocab": Path(vocab) / "gene_vocab.json", "part_size": 300}
    assert build_store([kang], out, rank=0, world_size=3, **kw) is None
    assert sorted(p.name for p in (out / "shards").glob("*.arrow")) == ["00000-00000.arrow"]
    with pytest.raises(
        FileNotFoundError, match=r"2 of 3 parts are not built yet \(e.g. \['00000-00001', '00000-00002'\]\)"
    ):
        merge_store(out)
    assert build_store([kang], out, **kw).n_cells == 800  # the merge by a plain call builds what is missing


def test_launcher_rank_reads_torchrun_and_slurm_arrays(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(name, raising=False)
    assert launcher_rank() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert launcher_rank() == (1, 3)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launcher_rank() == (2, 4)
