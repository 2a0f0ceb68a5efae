"""JAX's compiled kernels (scib-metrics' scores) are kept on disk under the project's cache and reused by the next
process; a folder the user chose for JAX is left alone."""

import os
import subprocess
import sys
from pathlib import Path

import jax

from sc_foundation.jax_cache import use_persistent_compilation_cache

ROOT = Path(__file__).resolve().parents[1]
# Importing the probes turns the cache on; then one of the scib-metrics scores a probe round computes.
SCORE = (
    "import numpy as np; from sc_foundation.training.probes import scib_metrics; "
    "scib_metrics.silhouette_label(np.random.default_rng(0).normal(size=(90, 8)), np.repeat(['a', 'b', 'c'], 30))"
)


def _kernels(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("*-cache")} if folder.is_dir() else set()


def test_a_second_process_reuses_the_kernels_the_first_compiled(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(SC_FOUNDATION_CACHE=str(tmp_path), PYTHONPATH=str(ROOT), JAX_LOG_COMPILES="1")
    first = subprocess.run([sys.executable, "-c", SCORE], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    kernels = _kernels(tmp_path / "jax")
    assert len(kernels) >= 3, f"expected the scores' kernels on disk, found {len(kernels)}"

    second = subprocess.run([sys.executable, "-c", SCORE], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _kernels(tmp_path / "jax") == kernels, "the second process compiled kernels the first had cached"
    assert "Persistent compilation cache hit" in second.stderr, second.stderr[-3000:]


def test_a_folder_the_user_configured_is_kept(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    try:
        assert use_persistent_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
