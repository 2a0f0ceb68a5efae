"""The frozen stage: a head trained on the frozen backbone before the fine-tuning, and what uses it.

Two options train it (``finetune.weight_ensemble`` and ``finetune.head_from_frozen``, task=annotation):

- ``weight_ensemble=alpha``: a weight-space ensemble of the frozen head and the fine-tuned model (below);
- ``head_from_frozen=true`` (annotation's default): LP-FT (Kumar et al., ICLR 2022), the fine-tuning starts from the
  frozen stage's head instead of a random one. A random head sends arbitrary gradients into the backbone in the
  first epochs and distorts the pretrained features where the training cells do not reach (another study's cells);
  a head that already reads the features well sends ones that agree with them, so the backbone adapts without
  forgetting as much (measured: BENCHMARKS.md, "The frozen stage").

The frozen backbone (a linear head on the pretrained embedding) and full fine-tuning fail in opposite places on our
shift rows (BENCHMARKS.md): the frozen head keeps the pretrained features and wins across studies of one technology,
while full fine-tuning adapts them and wins across libraries and protocols. WiSE-FT (Wortsman et al., CVPR 2022)
averages the two models' weights instead of choosing: both start from the same pretrained backbone, so every weight
of ``(1 - alpha) * frozen + alpha * tuned`` lies on the line between two models that agree on what each feature
means, and the result is one model of the usual size (one forward pass, a plain export).

Either option trains the frozen head first (in ``<output_dir>/frozen_head``, its own curves and export), then the
fine-tuning the config asks for (in ``<output_dir>``); an ensemble then replaces ``export/best`` by the mix. Each
stage is seeded as a run of its own would be, so without LP-FT the two endpoints are the models
``finetune.mode=frozen`` and the configured mode give on the same split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from sc_foundation.data.tokenization import GeneTokenizer
from sc_foundation.models.export import export_pretrained, load_pretrained

ENSEMBLE_MODES = ("full", "lower_lr", "gradual")
"""Modes whose backbone trains and whose export holds every weight: what the frozen head can be averaged with."""
FROZEN_STAGE = "frozen_head"
"""The frozen head's run folder inside the task's output folder."""


def check_frozen_stage(cfg: DictConfig) -> tuple[float | None, bool]:
    """``(cfg.finetune.weight_ensemble, cfg.finetune.head_from_frozen)`` checked against the task and mode: the
    ensemble's alpha (None when off) and whether the fine-tuning starts from the frozen stage's head.

    ``head_from_frozen`` (on by default for annotation) applies to the modes whose backbone trains after the head
    (:data:`ENSEMBLE_MODES`); ``frozen`` is the frozen head itself and ``lora`` trains its head with the adapters
    from the start, so for them it is False.

    Raises:
        ValueError: alpha outside (0, 1), or with a mode whose backbone does not train (nothing to average); either
            option with a task other than annotation.
    """
    alpha = cfg.finetune.get("weight_ensemble")
    head_first = bool(cfg.finetune.get("head_from_frozen", False))
    if alpha is not None and not 0.0 < float(alpha) < 1.0:
        raise ValueError(
            f"finetune.weight_ensemble must be in (0, 1) (the fine-tuned model's share of the weights), got {alpha}; "
            "null turns it off"
        )
    asked = [name for name, on in (("weight_ensemble", alpha is not None), ("head_from_frozen", head_first)) if on]
    if asked and cfg.task_name != "annotation":
        raise ValueError(
            f"finetune.{asked[0]} is for task=annotation (a head that a frozen backbone can train), not "
            f"task={cfg.task_name}; remove the override"
        )
    if alpha is not None and cfg.finetune.mode not in ENSEMBLE_MODES:
        raise ValueError(
            "finetune.weight_ensemble averages a frozen head with a model whose backbone trained: finetune.mode "
            f"must be one of {ENSEMBLE_MODES}, got {cfg.finetune.mode!r}"
        )
    return (None if alpha is None else float(alpha)), head_first and cfg.finetune.mode in ENSEMBLE_MODES


def frozen_stage_config(cfg: DictConfig, out: Path) -> DictConfig:
    """``cfg`` for the frozen head: ``finetune.mode=frozen``, its own output folder, no further ensemble."""
    frozen = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    frozen.finetune.mode = "frozen"
    frozen.finetune.weight_ensemble = None
    frozen.finetune.head_from_frozen = False
    frozen.output_dir = str(out / FROZEN_STAGE)
    return frozen


def interpolated_state(
    frozen: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * frozen + alpha * tuned`` for every floating-point tensor; the others (integer buffers) from
    ``tuned``.

    Raises:
        ValueError: the two state dicts differ in names or shapes (not two fine-tunings of one model and head).
    """
    if frozen.keys() != tuned.keys():
        differ = sorted(set(frozen) ^ set(tuned))
        raise ValueError(f"cannot average two models with different weights: {differ[:5]} are in only one")
    mixed = {}
    for name, weight in tuned.items():
        if frozen[name].shape != weight.shape:
            raise ValueError(f"cannot average {name}: shapes {tuple(frozen[name].shape)} and {tuple(weight.shape)}")
        mixed[name] = torch.lerp(frozen[name].to(weight.dtype), weight, alpha) if weight.is_floating_point() else weight
    return mixed


def load_frozen_head(frozen_dir: Path, id2label: Mapping) -> torch.nn.Module:
    """The frozen stage's export ``frozen_dir`` on the CPU, checked to name the classes ``id2label`` names.

    Raises:
        ValueError: it was trained on other classes than the model it is to start or be averaged with.
    """
    frozen = load_pretrained(frozen_dir, device="cpu")
    if frozen.config.id2label != id2label:
        raise ValueError(f"{frozen_dir} was trained on other classes than this run's model; it cannot be used with it")
    return frozen


def start_from_frozen_head(model: torch.nn.Module, frozen_dir: Path) -> None:
    """Copy the frozen stage's head (every weight outside ``model.base_model``) from the export ``frozen_dir`` into
    ``model``, whose backbone stays the pretrained one.

    Raises:
        ValueError: the export names its classes differently from ``model`` (:func:`load_frozen_head`).
    """
    frozen = load_frozen_head(frozen_dir, model.config.id2label)
    prefix = model.base_model_prefix + "."
    head = {name: value for name, value in frozen.state_dict().items() if not name.startswith(prefix)}
    missing, unexpected = model.load_state_dict(head, strict=False)
    if unexpected or any(not name.startswith(prefix) for name in missing):
        raise ValueError(f"the head of {frozen_dir} does not fit this model: {sorted(unexpected) or sorted(missing)}")


def export_weight_ensemble(frozen_dir: Path, tuned_dir: Path, alpha: float, tokenizer: GeneTokenizer) -> Path:
    """Replace the export ``tuned_dir`` by its average with the frozen head's export ``frozen_dir`` (atomically).

    Raises:
        ValueError: the two exports name their classes differently (trained on other labels).
    """
    tuned = load_pretrained(tuned_dir, device="cpu")
    frozen = load_frozen_head(frozen_dir, tuned.config.id2label)
    state = interpolated_state(frozen.state_dict(), tuned.state_dict(), alpha)
    return export_pretrained(tuned, tokenizer, tuned_dir, state_dict=state)


def fit_frozen_stage(
    cfg: DictConfig, out: Path, build_model: Callable[[], torch.nn.Module], fit_model: Callable[..., tuple]
) -> Path:
    """Train the frozen head of ``cfg`` (seeded as its own run) and return its ``export/best``.

    Args:
        build_model: a fresh head on the pretrained backbone, as the task builds it.
        fit_model: ``fit_model(cfg, out, model)`` fine-tunes ``model`` by ``cfg`` into ``out`` and returns the
            export directory last.
    """
    frozen = frozen_stage_config(cfg, out)
    pl.seed_everything(cfg.seed, workers=True)
    return fit_model(frozen, Path(frozen.output_dir), build_model())[-1]
