"""Configs checked before any work: a wrong type, an unknown key or an impossible combination fails in the first
second, naming the key and the fix, instead of after a store build (``trainer.max_steps=abc`` used to build the whole
corpus and then die inside Lightning).

The types come from the packaged YAML files themselves, so a key added to them needs no edit here: every file of a
primary config and of its groups (``conf/<group>/*.yaml``, ``@package _global_`` files at the root) is read, and a
key takes the types of its defaults across them (an int default takes ints, a float default numbers, a string
default strings; ``trainer.devices`` is ``1`` in one file and ``auto`` in another, so it takes both). Null is
always allowed (it switches things off); a default that is null everywhere, an interpolation (``${seed}``) or a
required ``???`` takes any type unless :data:`ANNOTATIONS` names one. Beyond the packaged keys, ``trainer.*`` may be
any ``pytorch_lightning.Trainer`` argument, ``model.*`` any :class:`ScFoundationConfig` field, and a mapping with a
``_target_`` any keyword of what it builds. Then the combinations no key shows alone: a GPU trainer without a GPU,
a rank context longer than the model's learned positions, a ``label_key``/``batch_key`` column that an input lacks,
a ``data.panel.exclude`` entry that names no gene.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sc_foundation.conf import CONFIG_ROOT

ANY = "any"
ANNOTATIONS = {
    "pretrain": {
        "output_dir": {"str"},
        "ckpt_path": {"str"},
        "name": {"str"},
        "data.vocab": {"str"},
        "data.panel": {"dict"},
        "data.loader.split_by": {"str"},
        "data.loader.view_keep": {"list"},
        "data.loader.view_depth": {"list"},
        "trainer.precision": {"str", "int"},
    },
    "finetune": {
        "pretrained": {"str"},
        "output_dir": {"str"},
        "data.files": {"list"},
        "data.store_dir": {"str"},
        "data.thin_depth": {"list"},
        "split.split_by": {"str"},
        "finetune.dropout": {"float"},
        "finetune.weight_ensemble": {"float"},
        "label_key": {"str"},
        "batch_key": {"str"},
        "unknown_threshold": {"float"},
        "modality.kind": {"str"},
        "modality.files": {"list"},
        "modality.layer": {"str"},
        "trainer.precision": {"str", "int"},
    },
}
"""Types of the keys whose packaged default says nothing (null, ``???``): ``key -> {type names}``."""
TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "list": "a list",
              "dict": "a mapping"}  # fmt: skip


class ConfigError(ValueError):
    """A config value that cannot work: the message names the key and the fix, on one line."""


class _Spec:
    """What the packaged configs allow at one key: type names, and the known sub-keys of a mapping."""

    def __init__(self) -> None:
        self.types: set[str] = set()
        self.children: dict[str, _Spec] = {}
        self.defaults: list[Any] = []
        self.open = False  # a mapping whose keys are someone else's keyword arguments (a _target_)
        self.elements: set[str] | None = None  # element types of a list default (None: no non-empty default)

    def add(self, value: Any) -> None:
        kind = _kind(value, default=True)
        self.types.add(kind)
        if kind not in (ANY, "null") and len(self.defaults) < 3:
            self.defaults.append(value)
        if kind == "dict":
            self.open |= "_target_" in value
            for key, child in value.items():
                self.children.setdefault(key, _Spec()).add(child)
        elif kind == "list" and value:
            self.elements = (self.elements or set()) | {_kind(item, default=True) for item in value}


def _kind(value: Any, default: bool = False) -> str:
    """The type name of a config value; a default's interpolation or ``???`` is ``any``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return ANY if default and ("${" in value or value == "???") else "str"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return ANY


def _fits(value: Any, allowed: set[str]) -> bool:
    kind = _kind(value)
    if kind == "null" or ANY in allowed or allowed <= {"null"}:
        return True
    return kind in allowed or (kind == "int" and "float" in allowed)


@functools.cache
def reference(config_name: str) -> _Spec:
    """The union of the packaged ``<config_name>.yaml`` and every file of its groups, as one :class:`_Spec` tree."""
    primary = OmegaConf.load(CONFIG_ROOT / f"{config_name}.yaml")
    root = _Spec()
    root.add(_plain(primary))
    for entry in primary.get("defaults", []):
        if not isinstance(entry, DictConfig):
            continue  # _self_
        for key in entry:
            group = str(key).split()[-1]  # "optional experiment" -> "experiment"
            for file in sorted((CONFIG_ROOT / group).glob("*.yaml")):
                node = _plain(OmegaConf.load(file))
                root.add(node if "@package _global_" in file.read_text().split("\n", 1)[0] else {group: node})
    for key, types in ANNOTATIONS.get(config_name, {}).items():
        spec = root
        for part in key.split("."):
            spec = spec.children.setdefault(part, _Spec())
        spec.types |= types
    return root


def _plain(node: DictConfig) -> dict:
    value = OmegaConf.to_container(node, resolve=False)
    return {k: v for k, v in value.items() if k not in ("defaults", "hydra")}


@functools.cache
def _keywords(owner: str) -> frozenset[str]:
    """Keys beyond the packaged ones that ``trainer.*`` and ``model.*`` take."""
    if owner == "trainer":
        import pytorch_lightning as pl

        return frozenset(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    from sc_foundation.models.configuration import ScFoundationConfig

    return frozenset(inspect.signature(ScFoundationConfig.__init__).parameters) - {"self", "kwargs"}


def check_config(cfg: DictConfig, config_name: str) -> None:
    """Refuse a composed ``pretrain`` or ``finetune`` config that cannot work, before any work starts.

    Raises:
        ConfigError: the first problems found (a missing required value, a value of the wrong type, an unknown key,
            an impossible combination), each with its key and the fix, on one line.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no value (??? in the config): pass "
            + " ".join(f"{key}=..." for key in missing)
        )
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "a config value"
        raise ConfigError(f"{key}: {error.msg if hasattr(error, 'msg') else error}".split("\n")[0]) from None
    problems: list[str] = []
    _check_tree(values, reference(config_name), "", problems)
    if not problems:
        problems += _impossible(values, config_name)
    if problems:
        raise ConfigError("; ".join(problems[:4]) + (f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""))


def _check_tree(values: dict, spec: _Spec, prefix: str, problems: list[str]) -> None:
    for key, value in values.items():
        path = f"{prefix}{key}"
        child = spec.children.get(key)
        if child is None:
            if spec.open or ANY in spec.types or (prefix in ("trainer.", "model.") and key in _keywords(prefix[:-1])):
                continue
            close = difflib.get_close_matches(key, list(spec.children), n=1)
            known = sorted(spec.children)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"the keys here are {known[:12]}"
            where = {"trainer.": "a pytorch_lightning.Trainer argument or ", "model.": "a ScFoundationConfig field or "}
            where = where.get(prefix, "")
            problems.append(f"unknown key {path} (not {where}a key of the packaged configs): {hint}")
            continue
        if not _fits(value, child.types):
            default = f" like the packaged default {child.defaults[0]!r}" if child.defaults else ""
            wanted = " or ".join(TYPE_NAMES.get(t, t) for t in sorted(child.types - {"null", ANY}))
            problems.append(f"{path}={value!r} must be {wanted}{default}: fix the override {path}=...")
            continue
        if isinstance(value, dict) and child.children and not child.open:
            _check_tree(value, child, f"{path}.", problems)
        elif isinstance(value, list) and child.elements and ANY not in child.elements:
            wrong = [item for item in value if not _fits(item, child.elements)]
            if wrong:
                wanted = " or ".join(TYPE_NAMES.get(t, t) for t in sorted(child.elements - {"null"}))
                problems.append(f"{path}: the items {wrong} must each be {wanted}: fix the override {path}=[...]")


# ------------------------------------------------------------------------------------------ impossible combinations
def _impossible(values: dict, config_name: str) -> list[str]:
    problems = _gpu_problems(values.get("trainer") or {})
    if config_name == "pretrain":
        problems += _pretrain_positions(values) + _panel_exclusions(values)
    else:
        problems += _finetune_positions(values) + _missing_columns(values)
    return problems


def _choices() -> str:
    """`` (trainer=gpu, experiment=rank_geneformer)``: the group choices of the running Hydra app, if any."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except (ImportError, ValueError):
        return ""
    named = [f"{group}={choices[group]}" for group in ("trainer", "experiment") if choices.get(group)]
    return f" ({', '.join(named)})" if named else ""


def _gpu_problems(trainer: dict) -> list[str]:
    import torch

    accelerator = str(trainer.get("accelerator", "auto"))
    strategy = trainer.get("strategy")
    fsdp = (isinstance(strategy, dict) and "FSDP" in str(strategy.get("_target_", ""))) or strategy == "fsdp"
    if (accelerator in ("gpu", "cuda") or fsdp) and not torch.cuda.is_available():
        what = f"trainer.accelerator={accelerator}" if accelerator in ("gpu", "cuda") else "trainer.strategy (FSDP)"
        return [
            f"{what}{_choices()} needs a CUDA GPU and torch finds none on this machine: add trainer=cpu "
            "to run on the CPU, or run on a GPU machine"
        ]
    return []


def _pretrain_positions(values: dict) -> list[str]:
    tokenizer = (values.get("data") or {}).get("tokenizer") or {}
    positions = (values.get("model") or {}).get("max_position_embeddings")
    context = tokenizer.get("context_length")
    rank = tokenizer.get("encoding") == "rank"
    if rank and isinstance(positions, int) and isinstance(context, int) and context > positions:
        return [
            f"data.tokenizer.context_length={context} is longer than model.max_position_embeddings={positions} "
            "(the rank encoding's learned positions): lower the context or raise the positions"
        ]
    return []


def _panel_exclusions(values: dict) -> list[str]:
    """``data.panel.exclude`` entries that are neither a gene family nor a known gene (checked before the panel's
    inputs are read)."""
    from sc_foundation.data.gene_panel import excluded_gene_ids

    panel = (values.get("data") or {}).get("panel") or {}
    try:
        excluded_gene_ids(panel.get("exclude") or ())
    except ValueError as error:
        return [str(error)]
    return []


def _finetune_positions(values: dict) -> list[str]:
    """A rank-encoded pretrained model (learned positions) read through a gene panel longer than its positions."""
    panel = (values.get("data") or {}).get("panel_genes")
    folder = Path(str(values.get("pretrained")))
    if not panel or not (folder / "config.json").is_file():
        return []
    try:
        config = json.loads((folder / "config.json").read_text())
        saved = folder / "gene_tokenizer.json"  # absent from a published Geneformer folder
        tokenizer = json.loads(saved.read_text()).get("config", {}) if saved.is_file() else {}
    except (OSError, ValueError, AttributeError):
        return []  # loading the model names the damaged file
    rank = config.get("value_encoding") == "rank" or config.get("model_type") == "bert"
    positions = config.get("max_position_embeddings")
    context = panel + int(tokenizer.get("add_cls", True)) + int(tokenizer.get("add_eos", False))
    if rank and isinstance(positions, int) and context > positions:
        return [
            f"data.panel_genes={panel} reads each cell through {context} tokens, more than the {positions} learned "
            f"positions of the rank-encoded model {folder}: set data.panel_genes={positions - context + panel} or "
            "lower, or data.panel_genes=null"
        ]
    return []


STORE_GROUP_COLUMNS = ("source", "batch")
"""Columns the store gives every cell (its input file's name; its ``batch_key`` value or else the file's name): a
grouped split may name them although no input's obs has them."""


def _missing_columns(values: dict) -> list[str]:
    """``label_key``, ``batch_key`` and ``split.split_by`` columns that an ``.h5ad`` input's obs lacks."""
    split_by = (values.get("split") or {}).get("split_by")
    wanted = {
        key: value
        for key, value in (
            ("label_key", values.get("label_key")),
            ("batch_key", values.get("batch_key")),
            ("split.split_by", None if split_by in STORE_GROUP_COLUMNS else split_by),
        )
        if isinstance(value, str)
    }
    files = (values.get("data") or {}).get("files") or []
    problems = []
    for item in files if wanted else []:
        path = item.get("path") if isinstance(item, dict) else item
        if not isinstance(path, str) or not path.endswith(".h5ad") or not Path(path).is_file():
            continue  # other formats and missing files are named when the inputs are opened
        columns = _obs_columns(Path(path))
        if columns is None:
            continue
        for key, column in wanted.items():
            if column not in columns:
                close = difflib.get_close_matches(column, columns, n=1)
                hint = f"; did you mean {key}={close[0]}?" if close else ""
                problems.append(f"{path}: {key}={column!r} is not an obs column; obs columns: {columns[:20]}{hint}")
    return problems


def _obs_columns(path: Path) -> list[str] | None:
    """The obs column names of an ``.h5ad`` file, read from its HDF5 header without loading it (None if unreadable:
    opening the inputs then names the problem)."""
    import h5py

    try:
        with h5py.File(path, "r") as file:
            obs = file["obs"]
            if not isinstance(obs, h5py.Group):  # the legacy layout: one compound dataset
                return list(obs.dtype.names or ())
            order = obs.attrs.get("column-order")
            columns = [str(c) for c in order] if order is not None else [k for k in obs if not k.startswith("_")]
            return columns
    except (OSError, KeyError):
        return None
