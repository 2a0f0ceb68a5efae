"""A disk cache for the kernels JAX compiles, so that scib-metrics compiles them once per machine, not once per process.

scib-metrics (the probes' clustering, silhouette and batch scores; the integration and embedding scores of
fine-tuning) runs on JAX, which compiles a kernel for every new array shape. One probe round over the five probe
sets of ``conf/pretrain.yaml`` compiles about 550 small kernels: 25 to 55 s of a 2-core CPU, paid again by every new
process (each ``python train.py``, each fine-tuning run, each ``sc-foundation probe``, each notebook kernel). JAX can
keep compiled kernels on disk, but its cache is off unless a folder is configured, and by default it keeps only
kernels that took a second or more to compile, which none of these do.

:func:`use_persistent_compilation_cache` turns it on under the project's cache folder (``$SC_FOUNDATION_CACHE/jax``,
default ``~/.cache/sc_foundation/jax``), bounded in size. A folder the user configured for JAX
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``) is left as it is, and ``JAX_ENABLE_COMPILATION_CACHE=false``
turns the cache off.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sc_foundation.data.datasets import cache_dir

logger = logging.getLogger(__name__)

MAX_BYTES = 512 * 2**20
"""Bound of the cache folder; JAX evicts the least recently used kernels beyond it. Setting a bound also makes JAX
lock the folder around each read and write, so concurrent processes never read a half-written kernel."""


def use_persistent_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at ``<cache>/jax`` and cache every compiled kernel; call before
    the first JAX computation of the process.

    Returns:
        the folder now in use, or None when it was left alone: the user configured a folder already, or the
        project's cache folder cannot be written (the reason is logged; JAX then compiles as before).
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return None
    path = cache_dir() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        logger.info("JAX kernels will not be cached on disk: %s", error)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
