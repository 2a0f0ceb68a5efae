"""The package as users get it: a wheel built from the checkout, installed (not editable) into a new virtual
environment, and run from a folder outside the checkout through the ``sc-foundation`` command on its PATH.

The new environment reaches the third-party dependencies already installed for the tests through a ``.pth`` line
(installing torch and the rest again would take minutes and gigabytes); ``sc_foundation`` itself comes only from the
wheel, which the first test proves. Everything runs with the checkout neither the working directory nor on
``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import anndata
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# What a checkout holds besides its sources: environments, caches, run outputs and earlier builds.
NOT_SOURCES = (".git", ".venv", ".cache", ".bench", "build", "outputs", "*.egg-info", "__pycache__", ".*_cache")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """(bin folder, environment) of a new venv holding the installed wheel."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources, and a build/lib left in the
    # checkout would ship modules that no longer exist in the next wheel.
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(root)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = root.glob("sc_foundation-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for packaged in ("sc_foundation/conf/pretrain.yaml", "sc_foundation/conf/experiment/cpu_smoke.yaml"):
        assert packaged in names, f"{packaged} missing from the wheel"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as archive:
        assert "sc-foundation = sc_foundation.cli:main" in archive.read(entry_points).decode()

    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    (purelib,) = (env_dir / "lib").glob("python3*/site-packages")
    (purelib / "test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    bin_dir = env_dir / "bin"
    installed = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env |= {
        "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}",
        "WANDB_MODE": "disabled",
        "SC_FOUNDATION_CACHE": str(root / "cache"),
        "SC_FOUNDATION_OFFLINE": "1",
    }
    return bin_dir, env


def run(command: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_the_wheel_installs_and_imports_outside_the_checkout(venv, tmp_path):
    bin_dir, env = venv
    where = run([str(bin_dir / "python"), "-c", "import sc_foundation; print(sc_foundation.__file__)"], tmp_path, env)
    path = Path(where.strip().splitlines()[-1]).resolve()
    assert bin_dir.parent.resolve() in path.parents, f"imported from {path}, not from the installed wheel"
    assert ROOT not in path.parents
    assert "pretrain" in run([str(bin_dir / "sc-foundation"), "--help"], tmp_path, env)
    assert "finetune" in run([str(bin_dir / "python"), "-m", "sc_foundation", "--help"], tmp_path, env)


def test_pretrain_finetune_embed_and_probe_from_the_path(venv, tmp_path, real_slice, shared_data):
    """The user's path with the installed command: a cpu_smoke pretraining (shortened), a fine-tune, embed, probe."""
    bin_dir, env = venv
    env = {**env, "SC_FOUNDATION_DATA": str(shared_data)}  # the registry's datasets, for the probe sets
    corpus = tmp_path / "kang.h5ad"
    real_slice("kang_ifnb/kang_ifnb.h5ad", np.arange(0, 14000, 28)).write_h5ad(corpus)
    cells = tmp_path / "cellbench.h5ad"
    real_slice("cellbench_3cl/cellbench_3cl.h5ad", 499).write_h5ad(cells)
    command = str(bin_dir / "sc-foundation")

    log = run(
        [
            command,
            "pretrain",
            "experiment=cpu_smoke",
            "data.datasets=[]",
            f"data.files=[{corpus},{cells}]",  # the vocabulary must cover the fine-tuning cells' genes
            "data.min_cells_per_gene=1",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "probes.sets=[{name: pbmc68k, dataset: pbmc68k_reduced, label_key: cell_type, max_cells: 200}]",
            "output_dir=pretrain",
        ],
        tmp_path,
        env,
    )
    assert "exported model:" in log and "probes at step 6" in log, log[-3000:]
    # Not a terminal: progress comes as whole lines (no carriage-return bar refreshes), and the run says its precision.
    assert "\r" not in log and "step 6/6" in log, log[-3000:]
    assert re.search(r"precision: (32-true|bf16-mixed) \((auto|set in the config)", log), log[-3000:]
    assert (tmp_path / "pretrain" / "train.log").read_text().count("step 6/6") == 1
    export = tmp_path / "pretrain" / "export" / "final"
    hidden = json.loads((export / "config.json").read_text())["hidden_size"]

    log = run(
        [
            command,
            "finetune",
            "task=annotation",
            f"pretrained={export}",
            f"data.files=[{cells}]",
            "label_key=cell_type",
            "trainer.max_epochs=1",
            "baselines.scvi=false",
            "output_dir=annotation",
        ],
        tmp_path,
        env,
    )
    metrics = json.loads((tmp_path / "annotation" / "metrics.json").read_text())
    assert metrics["task"] == "annotation" and 0 <= metrics["model"]["macro_f1"] <= 1

    out = tmp_path / "embedded.h5ad"
    log = run([command, "embed", "--model", str(export), "--input", str(cells), "--output", str(out)], tmp_path, env)
    embedded = anndata.read_h5ad(out)
    assert embedded.obsm["X_sc_foundation"].shape == (499, hidden) and f"-> {out}" in log
    assert np.isfinite(embedded.obsm["X_sc_foundation"]).all()

    log = run(
        [command, "probe", str(export), "--sets", "pbmc68k", "--max-cells", "200", "--json", "probe.json"],
        tmp_path,
        env,
    )
    scores = json.loads((tmp_path / "probe.json").read_text())
    assert set(scores) == {"pbmc68k"} and 0 < scores["pbmc68k"]["ours"]["knn_accuracy"] <= 1
    assert "pbmc68k" in log
