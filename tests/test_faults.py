"""The fault suite: processes killed mid-work (store builds, exports, pretraining, fine-tuning), damaged export files,
a full disk during a store build, and property-based fuzzing of the readers and the tokenizer.

Every kill is a SIGKILL at a seeded random moment of the work, followed by a rerun that must end exactly where an
uninterrupted run ends. Counts of what survives are in BENCHMARKS.md ("Fault suite").
"""

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sc_foundation.data.store as store_module
from sc_foundation.data.genes import GeneVocab
from sc_foundation.data.io import InvalidInputError, counts_from_anndata
from sc_foundation.data.store import CorpusStore, build_store
from sc_foundation.data.tokenization import GeneTokenizer, TokenizerConfig, cell_keys
from sc_foundation.models.checksums import MANIFEST as CHECKSUMS
from sc_foundation.models.export import EXPORT_FILES, export_pretrained, load_pretrained

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
KANG = "kang_ifnb/kang_ifnb.h5ad"
ORPHAN_TIMEOUT_S = 60
STORE_SETTINGS = {"tokenizer_config": TokenizerConfig(context_length=64), "min_cells_per_gene": 1, "chunk_size": 64}
BUILD = """
import os, sys
from sc_foundation.data.store import build_store
from sc_foundation.data.tokenization import TokenizerConfig
build_store(sys.argv[1:-1], sys.argv[-1], tokenizer_config=TokenizerConfig(context_length=64), min_cells_per_gene=1,
            chunk_size=64, num_workers=int(os.environ.get("BUILD_WORKERS", "1")))
"""
EXPORT_FOREVER = """
import sys, torch
from sc_foundation.models.export import export_pretrained, load_pretrained
model = load_pretrained(sys.argv[1], device="cpu")
print("exporting", flush=True)
while True:
    export_pretrained(model, model.gene_tokenizer, sys.argv[2])
"""


def kill_during(command: list[str], started: callable, seed: int, span: float, cwd=ROOT) -> bool:
    """Run ``command``; once ``started()`` is true, SIGKILL it after a seeded random delay in [0, span) seconds.

    Returns whether it was killed (False: it finished first, so the kill came too late to test anything).
    """
    process = subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not started() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0, span))
    killed = process.poll() is None
    if killed:
        os.kill(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    assert killed or process.returncode == 0, stderr[-3000:]
    return killed


@pytest.fixture(scope="module")
def slices(real_slice, tmp_path_factory) -> list[Path]:
    """Three real files of 300 Kang cells each: a store build of a few seconds, three shards."""
    folder = tmp_path_factory.mktemp("fault_slices")
    paths = []
    for k in range(3):
        path = folder / f"kang{k}.h5ad"
        real_slice(KANG, np.arange(k, 9000, 30)).write_h5ad(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference_store(slices, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "store"
    build_store(slices, out, **STORE_SETTINGS)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    left, right = CorpusStore(a), CorpusStore(b)
    assert left.tokenizer == right.tokenizer and len(left) == len(right)
    pd.testing.assert_frame_equal(left.obs, right.obs)
    for i in range(len(left)):
        np.testing.assert_array_equal(left[i][0], right[i][0])
        np.testing.assert_array_equal(left[i][1], right[i][1])


# --------------------------------------------------------------------------------------------------- kills
KILL_POINTS = {
    0: lambda out: (out / "stats").is_dir(),  # in the first pass (gene statistics)
    1: lambda out: any((out / "shards").glob("*.json")),  # between shards: one finished, two to go
    2: lambda out: (out / "gene_tokenizer.json").exists(),  # the vocabulary just written
}


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_a_killed_store_build_reruns_to_the_same_store(slices, reference_store, tmp_path, seed):
    """SIGKILL at a point of the build chosen by ``seed``; the kill must land before the build finished (else the
    case tests nothing and fails), and the rerun resumes what was finished and ends with the reference store."""
    out = tmp_path / "store"
    command = [sys.executable, "-c", BUILD, *map(str, slices), str(out)]
    assert kill_during(command, lambda: KILL_POINTS[seed](out), seed, span=0.0)
    assert not (out / store_module.MANIFEST).exists(), "the kill came after the build finished: it tested nothing"
    with pytest.raises(FileNotFoundError, match="did not finish"):
        CorpusStore(out)  # never readable half-built
    finished = sorted(p.name for p in (out / "shards").glob("*.json")) if (out / "shards").is_dir() else []
    report = build_store(slices, out, **STORE_SETTINGS)
    assert not report.reused and len(report.resumed) == len(finished)
    assert_same_store(out, reference_store)
    assert not list(out.rglob(".*tmp*")), "the rerun leaves no temporary files"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_a_script_that_builds_without_a_main_guard_fails_with_the_fix_instead_of_hanging(slices, tmp_path):
    """Spawned build workers import the main script again; a script calling ``build_store`` at its top level used
    to start a second build in every worker, each waiting for the lock its parent held, for ever. Now the workers
    refuse and the build fails, naming the fix."""
    script = tmp_path / "unguarded.py"
    script.write_text(BUILD)
    command = [sys.executable, str(script), *map(str, slices), str(tmp_path / "store")]
    result = subprocess.run(
        command, cwd=ROOT, env={**ENV, "BUILD_WORKERS": "2"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0
    assert 'Put the code that builds stores or trains under `if __name__ == "__main__":`' in result.stderr
    assert str(script) in result.stderr


@pytest.mark.parametrize("entry", ["build_store", pytest.param("train.py", marks=pytest.mark.slow)])
def test_a_killed_store_build_leaves_no_child_alive(slices, tmp_path, entry):
    """SIGKILL of a build running a pool of two worker processes (``build_store`` itself, or ``python train.py``
    during its store build): within a few seconds no child is left (the pool workers and multiprocessing's resource
    tracker used to run on for minutes, about 890 MB each)."""
    workers, cache = 2, tmp_path / "cache"
    if entry == "build_store":
        command = [sys.executable, "-c", BUILD, *map(str, slices), str(cache / "store")]
    else:
        files = f"data.files=[{','.join(map(str, slices))}]"
        command = [*_train_command(slices[0], cache, tmp_path / "run", f"data.build_workers={workers}", files)]
    env = {**ENV, "BUILD_WORKERS": str(workers)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, children = time.monotonic() + 120, []
    while time.monotonic() < deadline and process.poll() is None:
        children = _descendants(process.pid)
        if len(children) > workers:
            break  # every worker and the resource tracker are up
        time.sleep(0.05)
    assert process.poll() is None and len(children) > workers, "the pool never started: nothing to kill"
    process.kill()
    process.wait()
    killed = time.monotonic()
    assert not list(cache.rglob(store_module.MANIFEST)), "the kill came after the build finished: it tested nothing"
    # A worker still importing the package when its parent died exits as soon as the import is done (seconds on an
    # idle machine); one past it is killed by the kernel at once. The bound leaves room for a loaded machine.
    gone, alive = psutil.wait_procs(children, timeout=ORPHAN_TIMEOUT_S)
    assert not alive, f"children outlived their killed parent: {[(p.pid, p.cmdline()[-3:]) for p in alive]}"
    assert len(gone) == len(children) > workers
    print(f"{len(children)} children gone {time.monotonic() - killed:.1f} s after the parent's SIGKILL")


LOADER_FOREVER = """
import sys, time
from sc_foundation.data.datamodule import CorpusDataModule
datamodule = CorpusDataModule(sys.argv[1], batch_size=8, num_workers=2, worker_batches=1)
datamodule.setup()
batches = iter(datamodule.train_dataloader())
next(batches)
print("loading", flush=True)
time.sleep(600)
"""


def test_killed_training_leaves_no_loader_worker_alive(reference_store):
    """SIGKILL of a process whose DataLoader has two workers (persistent, between batches): both exit at once."""
    process = subprocess.Popen(
        [sys.executable, "-c", LOADER_FOREVER, str(reference_store)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE
    )
    assert process.stdout.readline().strip() == b"loading", "the loader never started"
    workers = _descendants(process.pid)
    assert len(workers) >= 2
    _kill_and_expect_gone(process, workers, "loader workers")


def _kill_and_expect_gone(process: subprocess.Popen, children: list[psutil.Process], what: str) -> None:
    """SIGKILL ``process``; every one of ``children`` must exit within :data:`ORPHAN_TIMEOUT_S`."""
    process.kill()
    process.wait()
    killed = time.monotonic()
    gone, alive = psutil.wait_procs(children, timeout=ORPHAN_TIMEOUT_S)
    assert not alive, f"{what} outlived their killed parent: {[p.pid for p in alive]}"
    print(f"{len(gone)} {what} gone {time.monotonic() - killed:.2f} s after the parent's SIGKILL")


QUALITY_POOL = """
import sys, time
sys.path.insert(0, sys.argv[1])
import quality
with quality.executor(2) as pool:
    runs = [pool.submit(time.sleep, 600) for _ in range(2)]
    time.sleep(600)
"""


def test_a_killed_quality_table_leaves_no_worker_alive():
    """SIGKILL of ``benchmarks/quality.py`` while its two fine-tuning workers run (``--jobs 2``): both exit at once
    instead of fine-tuning on, orphaned, for up to 15 minutes."""
    command = [sys.executable, "-c", QUALITY_POOL, str(ROOT / "benchmarks")]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.monotonic() + 120, []
    while time.monotonic() < deadline and process.poll() is None and len(workers) < 2:
        workers = [p for p in _descendants(process.pid) if "spawn_main" in " ".join(p.cmdline())]
        time.sleep(0.05)
    assert process.poll() is None and len(workers) == 2, "the two workers never started: nothing to kill"
    time.sleep(2)  # both past their first instruction (the initializer), sleeping in their runs
    _kill_and_expect_gone(process, workers, "quality workers")


def test_a_failed_build_leaves_nothing_behind(real_slice, tmp_path):
    """A build that fails before finishing a piece (a 0-cell input among the files) leaves no folder or lock file:
    nothing that a later run trips over."""
    empty = tmp_path / "empty.h5ad"
    real_slice(KANG, np.arange(5))[:0].copy().write_h5ad(empty)
    cache = tmp_path / "stores"
    with pytest.raises(InvalidInputError, match=rf"{empty}: holds no cells \(0 rows\): remove it"):
        build_store([empty], cache / "binned-{plan}", **STORE_SETTINGS)
    assert not cache.exists() or not list(cache.iterdir())

    negative = real_slice(KANG, np.arange(20))
    negative.X = np.asarray(negative.X.toarray() if sp.issparse(negative.X) else negative.X, dtype=np.float32)
    negative.X[0, np.flatnonzero(negative.X[0])[0]] = -1  # found in the first pass, after the folder was made
    bad = tmp_path / "negative.h5ad"
    negative.write_h5ad(bad)
    with pytest.raises(InvalidInputError, match="negative"):
        build_store([bad], cache / "binned-{plan}", **STORE_SETTINGS)
    assert not cache.exists() or not list(cache.iterdir()), "no folder, plan, empty stats/ or lock file is left"

    full = tmp_path / "full.h5ad"
    real_slice(KANG, np.arange(20)).write_h5ad(full)
    settings = {**STORE_SETTINGS, "min_cells_per_gene": 10_000}
    with pytest.raises(ValueError, match=r"min_cells_per_gene=10000 cells.*lower min_cells_per_gene \(data\."):
        build_store([full], cache / "binned-{plan}", **settings)  # fails after the statistics: those are kept
    (kept,) = cache.glob("binned-*")
    assert list((kept / "stats").glob("*.npz"))


def test_unfinished_stores_of_other_plans_are_swept_unless_held(slices, tmp_path):
    """A {plan} cache: a killed build's folder of another plan goes at the next build, unless a process holds its
    build lock (a builder) or its plan (a launcher rank)."""
    cache = tmp_path / "stores"
    template = str(cache / "binned-{plan}")
    stale = cache / "binned-000000000000"
    (stale / "stats").mkdir(parents=True)
    (stale / store_module.PLAN).write_text("{}")
    held = cache / "binned-111111111111"
    (held / "stats").mkdir(parents=True)
    (held / store_module.PLAN).write_text("{}")
    with store_module._build_lock(held):
        report = build_store(slices[:1], template, **STORE_SETTINGS)
    assert not stale.exists() and held.exists() and Path(report.path).exists()
    with open(held / store_module.PLAN, "rb") as plan:  # what a launcher rank holds while it builds
        fcntl.flock(plan, fcntl.LOCK_SH)
        assert store_module.sweep_unfinished_stores(cache) == []
    assert store_module.sweep_unfinished_stores(cache) == [held]
    name = Path(report.path).name
    assert sorted(p.name for p in cache.iterdir()) == sorted([name, f".{name}.lock"]), "swept lock files went too"


@pytest.fixture(scope="module")
def exported(reference_store, tmp_path_factory) -> Path:
    import torch

    from sc_foundation.models.configuration import ScFoundationConfig
    from sc_foundation.models.modeling import ScFoundationForMaskedValueModeling

    from .conftest import TINY_ARCHITECTURE

    tokenizer = CorpusStore(reference_store).tokenizer
    torch.manual_seed(0)
    model = ScFoundationForMaskedValueModeling(ScFoundationConfig.from_tokenizer(tokenizer, **TINY_ARCHITECTURE))
    return export_pretrained(model, tokenizer, tmp_path_factory.mktemp("exported") / "export")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_killed_export_leaves_the_old_export_or_none_and_reruns_the_same(exported, tmp_path, seed):
    target = tmp_path / "final"
    command = [sys.executable, "-c", EXPORT_FOREVER, str(exported), str(target)]
    assert kill_during(command, lambda: target.exists(), seed, span=2.0)
    if target.exists():  # at any moment: a complete export, or briefly none
        load_pretrained(target, device="cpu")
    model = load_pretrained(exported, device="cpu")
    export_pretrained(model, model.gene_tokenizer, target)
    for name in (*EXPORT_FILES, CHECKSUMS):
        assert (target / name).read_bytes() == (exported / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["final"], "the rerun removed the killed export's leftovers"


def _train_command(kang_file: Path, cache: Path, out: Path, *extra) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=cpu_smoke",
        "data.datasets=[]",
        f"data.files=[{kang_file}]",
        f"paths.cache={cache}",
        "data.min_cells_per_gene=1",
        "data.build_workers=1",
        "data.tokenizer.context_length=64",
        # 60 steps (about 6 s here) with a checkpoint every 5: a kill up to 1 s after the first one lands mid-run.
        "trainer.max_steps=60",
        "trainer.val_check_interval=20",
        "checkpoint.every_n_train_steps=5",
        "trainer.enable_progress_bar=false",
        # Probes off: probe sets matched against a 300-cell vocabulary fall below min_match_rate (the run then fails
        # at its first validation); resuming does not involve them.
        "probes=null",
        f"output_dir={out}",
        f"hydra.run.dir={out}",
        *extra,
    ]


@pytest.fixture(scope="module")
def straight_pretraining(slices, tmp_path_factory) -> Path:
    """The uninterrupted pretraining run that every killed one must match byte for byte."""
    root = tmp_path_factory.mktemp("straight_pretraining")
    command = _train_command(slices[0], root / "cache", root / "run")
    subprocess.run(command, cwd=ROOT, env=ENV, check=True, capture_output=True)
    return root / "run"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_pretraining_resumes_to_the_uninterrupted_weights(slices, straight_pretraining, tmp_path, seed):
    cache = tmp_path / "cache"
    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    assert kill_during(_train_command(slices[0], cache, killed), last.exists, seed, span=1.0)
    assert not (killed / "export" / "final").exists(), "the kill came after the run finished: it tested nothing"
    resume = [f"ckpt_path={last}"] if last.exists() else []
    subprocess.run(
        _train_command(slices[0], cache, killed, *resume), cwd=ROOT, env=ENV, check=True, capture_output=True
    )
    for name in EXPORT_FILES:  # the model card and metrics.json hold wall times (and so do their checksums)
        expected = (straight_pretraining / "export" / "final" / name).read_bytes()
        assert (killed / "export" / "final" / name).read_bytes() == expected, name


def _finetune_command(pretrained: Path, data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "finetune.py"),
        f"pretrained={pretrained}",
        f"data.files=[{data}]",
        "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false",
        "baselines.n_pcs=5",
        f"output_dir={out}",
        f"hydra.run.dir={out}",
    ]


@pytest.fixture(scope="module")
def finetuning_cells(real_slice, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("finetuning") / "cells.h5ad"
    real_slice("cellbench_3cl/cellbench_3cl.h5ad", np.arange(0, 499, 2)).write_h5ad(data)  # both protocols
    return data


@pytest.fixture(scope="module")
def straight_finetuning(pretrained, finetuning_cells) -> Path:
    """The uninterrupted fine-tuning run that every killed one must match."""
    out = finetuning_cells.parent / "straight"
    subprocess.run(
        _finetune_command(pretrained, finetuning_cells, out), cwd=ROOT, env=ENV, check=True, capture_output=True
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_finetuning_reruns_to_the_same_metrics(
    pretrained, finetuning_cells, straight_finetuning, tmp_path, seed
):
    killed = tmp_path / "killed"
    command = _finetune_command(pretrained, finetuning_cells, killed)
    assert kill_during(command, lambda: (killed / "store").exists(), seed, span=15.0)
    assert not (killed / "metrics.json").exists(), "the kill came after the run finished: it tested nothing"
    subprocess.run(command, cwd=ROOT, env=ENV, check=True, capture_output=True)
    expected = json.loads((straight_finetuning / "metrics.json").read_text())
    assert json.loads((killed / "metrics.json").read_text())["model"] == expected["model"]
    for name in EXPORT_FILES:
        assert (killed / "export" / "best" / name).read_bytes() == (
            straight_finetuning / "export" / "best" / name
        ).read_bytes()


# ------------------------------------------------------------------------------------------ damaged files
DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: bytes(random.Random(len(data)).randrange(256) for _ in range(min(len(data), 4096))),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", EXPORT_FILES)
def test_damaged_export_files_are_refused_by_name(exported, tmp_path, name, damage):
    copy = tmp_path / "export"
    copy.mkdir()
    for file in exported.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / name).write_bytes(DAMAGE[damage]((exported / name).read_bytes()))
    with pytest.raises(ValueError, match="is corrupt or truncated") as error:
        load_pretrained(copy, device="cpu")
    assert str(copy / name) in str(error.value) and "again" in str(error.value)


@pytest.mark.parametrize("name", [*EXPORT_FILES, CHECKSUMS])
def test_a_flipped_bit_in_any_export_file_is_refused_naming_it(exported, tmp_path, name):
    """One bit flipped in the middle of a file (in the weights: inside the tensor data, which still parses) is found
    by the checksums and the file named; ``verify=False`` skips the check."""
    copy = tmp_path / "export"
    copy.mkdir()
    for file in exported.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    data = bytearray((copy / name).read_bytes())
    position = len(data) - 64 if name == "model.safetensors" else len(data) // 2
    data[position] ^= 0x04
    (copy / name).write_bytes(bytes(data))
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        load_pretrained(copy, device="cpu")
    assert str(copy / name) in str(error.value) and "again" in str(error.value)
    if name == "model.safetensors":  # the damage is invisible to the safetensors format itself
        load_pretrained(copy, device="cpu", verify=False)


def test_an_export_lists_every_file_and_sha256sum_agrees(exported):
    listed = dict(line.split("  ")[::-1] for line in (exported / CHECKSUMS).read_text().splitlines())
    assert sorted(listed) == sorted(p.name for p in exported.iterdir() if p.name != CHECKSUMS)
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "-c", CHECKSUMS], cwd=exported, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.count(": OK") == len(listed), done.stdout + done.stderr


def test_unusable_model_folders_are_named_with_the_fix(exported, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'absent'} does not exist: pass an exported model"):
        load_pretrained(tmp_path / "absent")
    noise = tmp_path / "noise"
    noise.mkdir()
    for name in EXPORT_FILES:  # a folder of random bytes under the right names
        (noise / name).write_bytes(random.Random(name).randbytes(2048))
    with pytest.raises(ValueError, match=f"{noise / 'config.json'} is corrupt or truncated"):
        load_pretrained(noise)
    scgpt = tmp_path / "scgpt"
    scgpt.mkdir()
    (scgpt / "args.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"scGPT folder \(args.json\) but lacks best_model.pt, vocab.json"):
        load_pretrained(scgpt)


def test_a_killed_export_leaves_nothing_the_next_export_keeps(exported, tmp_path):
    """What a SIGKILLed export leaves (its staging folder, an old export moved aside) is cleaned by the next export
    to the same folder; an export that lost its folder gets the old one back first."""
    target = tmp_path / "final"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = f"{dead.pid}@{socket.gethostname()}"
    (tmp_path / f".final.tmp-{owner}-abc").mkdir()
    retired = tmp_path / f".final.old-{owner}-def"
    shutil.copytree(exported, retired / "final")
    alive = tmp_path / f".final.tmp-{os.getpid()}@{socket.gethostname()}-ghi"  # a live writer's: kept
    alive.mkdir()
    model = load_pretrained(exported, device="cpu")
    export_pretrained(model, model.gene_tokenizer, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, "final"])


# ---------------------------------------------------------------------------------------------- full disk
def test_a_full_disk_during_a_store_build_leaves_no_readable_store(slices, reference_store, tmp_path, monkeypatch):
    """ENOSPC while writing the second shard, then while writing the manifest: never a store that opens."""
    out = tmp_path / "store"
    writes = []
    real_write = pa.ipc.RecordBatchStreamWriter.write_batch

    def write_until_full(self, batch, *args, **kwargs):
        writes.append(1)
        if len(writes) > 6:  # the first shard (5 chunks of 64 cells) fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, batch, *args, **kwargs)

    monkeypatch.setattr(pa.ipc.RecordBatchStreamWriter, "write_batch", write_until_full)
    with pytest.raises(OSError, match="No space left"):
        build_store(slices, out, **STORE_SETTINGS)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        CorpusStore(out)
    monkeypatch.setattr(pa.ipc.RecordBatchStreamWriter, "write_batch", real_write)

    real_atomic = store_module._atomic_write_text

    def manifest_fails(path, text):
        if Path(path).name == store_module.MANIFEST:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_atomic(path, text)

    monkeypatch.setattr(store_module, "_atomic_write_text", manifest_fails)
    with pytest.raises(OSError, match="No space left"):
        build_store(slices, out, **STORE_SETTINGS)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        CorpusStore(out)
    monkeypatch.setattr(store_module, "_atomic_write_text", real_atomic)

    report = build_store(slices, out, **STORE_SETTINGS)  # space again: the rerun completes it
    assert report.resumed == ["kang0.h5ad", "kang1.h5ad", "kang2.h5ad"]
    assert_same_store(out, reference_store)


# --------------------------------------------------------------------------------------- property tests
GENES = [f"ENSG{k:011d}" for k in range(1, 41)]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [np.int32, np.int64, np.uint16, np.float32, np.float64]


@st.composite
def count_matrices(draw):
    """A random (n_cells, n_genes) count matrix as dense, CSR or CSC (what AnnData holds) of any numeric dtype."""
    n_cells, n_genes = draw(st.integers(1, 30)), draw(st.integers(1, len(GENES)))
    density = draw(st.floats(0.0, 1.0))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dense = np.where(rng.random((n_cells, n_genes)) < density, rng.integers(0, 50, (n_cells, n_genes)), 0)
    dense = dense.astype(draw(st.sampled_from(DTYPES)))
    layout = draw(st.sampled_from(["dense", "csr", "csc"]))
    matrix = dense if layout == "dense" else getattr(sp, f"{layout}_matrix")(dense)
    return dense, matrix


@FUZZ
@given(data=count_matrices(), chunk_size=st.integers(1, 40))
def test_fuzz_readers_give_back_every_count(data, chunk_size):
    dense, matrix = data
    adata = anndata.AnnData(matrix, var=pd.DataFrame(index=GENES[: dense.shape[1]]))
    chunks = list(counts_from_anndata(adata).iter_chunks(chunk_size))
    assert [start for start, _ in chunks] == list(range(0, dense.shape[0], chunk_size))
    combined = sp.vstack([chunk for _, chunk in chunks]).tocsr()
    assert combined.dtype == np.float32 and not (combined.data == 0).any()
    np.testing.assert_array_equal(combined.toarray(), dense.astype(np.float32))


@FUZZ
@given(data=count_matrices(), bad=st.sampled_from([-1.0, np.nan, np.inf, 0.5]))
def test_fuzz_readers_refuse_what_counts_cannot_hold(data, bad):
    dense, _ = data
    broken = dense.astype(np.float64)
    broken[-1, -1] = bad
    adata = anndata.AnnData(sp.csr_matrix(broken), var=pd.DataFrame(index=GENES[: dense.shape[1]]))
    with pytest.raises(InvalidInputError, match="<AnnData>: X"):
        list(counts_from_anndata(adata).iter_chunks(7))


@pytest.fixture(scope="module")
def fuzz_tokenizers() -> dict[str, GeneTokenizer]:
    vocab = GeneVocab.from_genes(GENES)
    return {
        encoding: GeneTokenizer(vocab, TokenizerConfig(encoding=encoding, context_length=64, min_match_rate=0.0))
        for encoding in ("binned", "continuous")
    }


@FUZZ
@given(data=count_matrices(), order_seed=st.integers(0, 2**32 - 1), encoding=st.sampled_from(["binned", "continuous"]))
def test_fuzz_tokenizer_tokens_are_valid_and_ignore_gene_order(fuzz_tokenizers, data, order_seed, encoding):
    tokenizer = fuzz_tokenizers[encoding]
    dense, _ = data
    genes = GENES[: dense.shape[1]]
    keys = cell_keys(pd.Index([f"c{i}" for i in range(dense.shape[0])]))

    def tokens(columns: np.ndarray) -> dict[int, set]:
        counts = sp.csr_matrix(dense[:, columns].astype(np.float32))
        counts.eliminate_zeros()
        match = tokenizer.match_genes([genes[c] for c in columns], cells_per_gene=np.ones(len(columns)))
        cells = tokenizer.encode(counts, match, keys)
        assert len(cells.gene_ids) == len(cells.values) == cells.offsets[-1]
        assert (cells.gene_ids >= 0).all() and (cells.gene_ids < len(tokenizer.vocab)).all()
        assert (cells.gene_ids != tokenizer.vocab.pad_id).all() and np.isfinite(cells.values).all()
        if encoding == "binned":
            body = cells.gene_ids != tokenizer.vocab.cls_id
            assert ((cells.values[body] >= 1) & (cells.values[body] <= tokenizer.config.n_bins - 1)).all()
        expressed = (dense > 0).sum(axis=1)
        np.testing.assert_array_equal(cells.rows, np.flatnonzero(expressed))  # empty cells dropped, no other
        np.testing.assert_array_equal(cells.lengths, expressed[cells.rows] + 1)  # + <cls>; 40 genes < context
        return {
            int(row): set(zip(cells.cell(i)[0].tolist(), cells.cell(i)[1].tolist(), strict=True))
            for i, row in enumerate(cells.rows)
        }

    identity = np.arange(dense.shape[1])
    shuffled = np.random.default_rng(order_seed).permutation(dense.shape[1])
    assert tokens(identity) == tokens(shuffled)
