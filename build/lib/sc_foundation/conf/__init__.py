"""The Hydra configs, shipped inside the package (``pkg://sc_foundation.conf``), and :func:`compose` to read them from
Python as the command line would.

``pretrain.yaml`` (pretraining) and ``finetune.yaml`` (the fine-tuning tasks) are the two primary configs; the
groups beside them (``model``, ``data``, ``trainer``, ``logger``, ``task``, ``experiment``) are what a run swaps. A
user's own folder of configs extends or overrides these: ``--config-dir DIR`` on the command line, or
``config_dir=DIR`` here; a file there with the same group and name as one of ours replaces it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

CONFIG_MODULE = "sc_foundation.conf"
SEARCH_PATH = f"pkg://{CONFIG_MODULE}"
"""Hydra's address of the configs, which works the same from a checkout, an editable install and a wheel."""
CONFIG_ROOT = Path(__file__).resolve().parent
"""The folder of the YAML files, installed with the package (to read one group's file without composing)."""


def compose(config_name: str, overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None) -> DictConfig:
    """``<config_name>.yaml`` composed with Hydra ``overrides`` (``["experiment=cpu_smoke", ...]``), as the command
    line would compose it; for notebooks, benchmarks and tests.

    Args:
        config_name: ``"pretrain"`` or ``"finetune"``.
        overrides: Hydra overrides, as on the command line.
        config_dir: a folder of the user's own configs, searched before the package's (like ``--config-dir``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    if config_dir is not None:
        if not os.path.isdir(config_dir):
            raise FileNotFoundError(f"config_dir {config_dir} is not a folder: pass a folder of Hydra config files")
        overrides = [*overrides, f"hydra.searchpath=[file://{os.path.abspath(config_dir)}]"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
