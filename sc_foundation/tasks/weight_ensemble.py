"""``finetune.weight_ensemble``: a weight-space ensemble of a frozen-backbone head and a full fine-tuning.

The frozen backbone (a linear head on the pretrained embedding) and full fine-tuning fail in opposite places on our
shift rows (BENCHMARKS.md): the frozen head keeps the pretrained features and wins across studies of one technology,
while full fine-tuning adapts them and wins across libraries and protocols. WiSE-FT (Wortsman et al., CVPR 2022)
averages the two models' weights instead of choosing: both start from the same pretrained backbone, so every weight
of ``(1 - alpha) * frozen + alpha * tuned`` lies on the line between two models that agree on what each feature
means, and the result is one model of the usual size (one forward pass, a plain export).

The run trains both from the same seed, the frozen head first (in ``<output_dir>/frozen_head``, its own curves and
export), then the fine-tuning the config asks for (in ``<output_dir>``), and replaces ``export/best`` by the mix.
Each stage is seeded as a run of its own would be, so the two endpoints are the models ``finetune.mode=frozen`` and
the configured mode give on the same split.
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


def check_weight_ensemble(cfg: DictConfig) -> float | None:
    """``cfg.finetune.weight_ensemble`` checked against the task and mode; None when off.

    Raises:
        ValueError: alpha outside (0, 1), a task other than annotation, or a mode with nothing to average.
    """
    alpha = cfg.finetune.get("weight_ensemble")
    if alpha is None:
        return None
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(
            f"finetune.weight_ensemble must be in (0, 1) (the fine-tuned model's share of the weights), got {alpha}; "
            "null turns it off"
        )
    if cfg.task_name != "annotation":
        raise ValueError(
            f"finetune.weight_ensemble is for task=annotation (a head that a frozen backbone can train), not "
            f"task={cfg.task_name}; remove the override"
        )
    if cfg.finetune.mode not in ENSEMBLE_MODES:
        raise ValueError(
            "finetune.weight_ensemble averages a frozen head with a model whose backbone trained: finetune.mode "
            f"must be one of {ENSEMBLE_MODES}, got {cfg.finetune.mode!r}"
        )
    return float(alpha)


def frozen_stage_config(cfg: DictConfig, out: Path) -> DictConfig:
    """``cfg`` for the frozen head: ``finetune.mode=frozen``, its own output folder, no further ensemble."""
    frozen = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    frozen.finetune.mode = "frozen"
    frozen.finetune.weight_ensemble = None
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


def export_weight_ensemble(frozen_dir: Path, tuned_dir: Path, alpha: float, tokenizer: GeneTokenizer) -> Path:
    """Replace the export ``tuned_dir`` by its average with the frozen head's export ``frozen_dir`` (atomically).

    Raises:
        ValueError: the two exports name their classes differently (trained on other labels).
    """
    frozen, tuned = load_pretrained(frozen_dir, device="cpu"), load_pretrained(tuned_dir, device="cpu")
    if frozen.config.id2label != tuned.config.id2label:
        raise ValueError(f"{frozen_dir} and {tuned_dir} were trained on different classes; they cannot be averaged")
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
