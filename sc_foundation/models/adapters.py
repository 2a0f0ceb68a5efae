"""LoRA adapters on a task head's backbone (``finetune.mode=lora``), through the ``peft`` library.

LoRA adds to chosen projections ``W`` (out, in) of the backbone a low-rank update ``(alpha / r) · B A`` with ``A``
(r, in) and ``B`` (out, r), ``B`` starting at zero, and trains only ``A``, ``B`` and the task's heads: the optimizer
state then covers a few percent of the weights instead of all of them.

An export of a LoRA run is one of two things:

- **merged** (the default): ``W + (alpha / r) · B A`` written into a plain export, which loads and runs like any
  other (no ``peft`` needed to read it);
- **separate**: the export folder holds the task's ``config.json`` and tokenizer, an ``adapters.json`` naming the base
  export and a fingerprint of its backbone, and a ``model.safetensors`` with only the LoRA factors and the task's
  heads (megabytes, not the whole model). :func:`~sc_foundation.models.export.load_pretrained` reads it on top of the
  base: ``load_pretrained(adapter_dir)`` (the recorded base) or ``load_pretrained(base, adapters=adapter_dir)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

ADAPTERS_FILE = "adapters.json"
ADAPTER_NAME = "default"  # peft's name of the one adapter a model carries
BACKBONE_PROJECTIONS = ("qkv", "out", "fc_in", "fc_out")
"""The backbone's projections by their module names: attention (``attn.qkv``, ``attn.out``) and MLP (``mlp.fc_in``,
``mlp.fc_out``)."""


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """How LoRA is attached and exported.

    Args:
        rank: ``r``, the rank of each update.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA branch's input while training.
        target_modules: which backbone projections get an update, among :data:`BACKBONE_PROJECTIONS`.
        merge: export merged weights (a plain export) rather than the adapters on their own.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = BACKBONE_PROJECTIONS
    merge: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.target_modules) - set(BACKBONE_PROJECTIONS))
        if unknown or not self.target_modules:
            raise ValueError(
                f"finetune.lora.target_modules={list(self.target_modules)}: choose one or more of "
                f"{list(BACKBONE_PROJECTIONS)} (unknown: {unknown})"
            )
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"finetune.lora needs rank >= 1, alpha > 0 and 0 <= dropout < 1; got rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}"
            )

    def peft_config(self, prefix: str):
        """The ``peft.LoraConfig``: a regex that matches the chosen projections inside the backbone's blocks only
        (heads have layers named ``fc_in`` too, and they train in full)."""
        from peft import LoraConfig

        names = "|".join(map(re.escape, self.target_modules))
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=rf"{re.escape(prefix)}\.layers\.\d+\.(attn|mlp)\.({names})",
        )


def head_names(model: torch.nn.Module) -> list[str]:
    """The task head's top-level modules beside the backbone (``classifier``, ``decoder``, ...): they train in full."""
    return [name for name, _ in model.named_children() if name != model.base_model_prefix]


def lora_parameter_count(model: torch.nn.Module, settings: LoraSettings) -> int:
    """The weights ``model`` would train under ``settings``: its heads in full and ``r · (in + out)`` per adapted
    projection; counted without attaching anything (for the memory plan)."""
    pattern = re.compile(settings.peft_config(model.base_model_prefix).target_modules)
    heads = sum(p.numel() for name in head_names(model) for p in getattr(model, name).parameters())
    lora = sum(
        settings.rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and pattern.fullmatch(name)
    )
    return heads + lora


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the backbone's weights (names, shapes and bytes, LoRA factors left out): the base an adapter folder
    was trained on must be the one it is loaded on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.base_model.state_dict().items()):
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def attach_lora(model: torch.nn.Module, settings: LoraSettings, base: str | os.PathLike) -> torch.nn.Module:
    """Add LoRA updates to ``model``'s backbone in place: the backbone frozen, its chosen projections carrying
    trainable ``lora_A`` / ``lora_B``, the heads trainable in full. ``base`` (the export the backbone came from) is
    recorded for a separate export. Returns ``model`` (same class, same ``forward``)."""
    from peft import inject_adapter_in_model

    fingerprint = backbone_fingerprint(model)
    model.requires_grad_(False)
    inject_adapter_in_model(settings.peft_config(model.base_model_prefix), model, adapter_name=ADAPTER_NAME)
    for name in head_names(model):
        getattr(model, name).requires_grad_(True)
    model.lora_settings = settings
    model.lora_base = {"path": str(Path(base).absolute()), "backbone_sha256": fingerprint}
    return model


def attach_lora_like(model: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    """Give ``model``, a fresh copy of ``source``'s class, the adapters ``source`` carries (same projections, same
    settings, same base record), so that ``source``'s state dict loads into it: FSDP gathers a sharded LoRA model's
    weights into such a copy to export it. Returns ``model``."""
    from peft import inject_adapter_in_model

    settings = source.lora_settings
    inject_adapter_in_model(settings.peft_config(model.base_model_prefix), model, adapter_name=ADAPTER_NAME)
    model.lora_settings, model.lora_base = settings, source.lora_base
    return model


def has_lora(model: torch.nn.Module) -> bool:
    return getattr(model, "lora_settings", None) is not None


def _lora_layers(model: torch.nn.Module) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def merged_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain state dict from a LoRA model's ``state``: each adapted weight becomes ``W + (alpha / r) · B A``, the
    factors are dropped and the keys lose peft's ``base_layer``. The model itself is left as it is (training goes on
    after an export of the best epoch)."""
    layers = _lora_layers(model)
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            module, parameter = key.split(".base_layer.")
            if parameter == "weight":
                delta = layers[module].get_delta_weight(ADAPTER_NAME)
                value = (value.float() + delta.float().to(value.device)).to(value.dtype)
            key = f"{module}.{parameter}"
        merged[key] = value
    return merged


def adapter_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a separate adapter folder stores of ``state``: the LoRA factors and the heads' weights."""
    heads = tuple(f"{name}." for name in head_names(model))
    return {key: value for key, value in state.items() if ".lora_" in key or key.startswith(heads)}


def export_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """The weights to export for ``model`` (a LoRA model or not) and the extra files beside them: for LoRA merged
    weights, or with ``merge=False`` the adapters and heads with ``adapters.json``."""
    if not has_lora(model):
        return state, {}
    settings = model.lora_settings
    if settings.merge:
        return merged_weights(model, state), {}
    record = {"lora": dataclasses.asdict(settings), "base": model.lora_base, "heads": head_names(model)}
    return adapter_weights(model, state), {ADAPTERS_FILE: json.dumps(record, indent=1)}


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTERS_FILE).is_file()


def read_record(adapters: str | os.PathLike) -> dict:
    path = Path(adapters) / ADAPTERS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read ({error}); export the adapters again") from None


def recorded_base(adapters: str | os.PathLike) -> Path:
    """The base export an adapter folder was trained on, as recorded; refused when it is gone."""
    base = Path(read_record(adapters)["base"]["path"])
    if not base.is_dir():
        raise FileNotFoundError(
            f"{adapters} holds LoRA adapters trained on {base}, which is not there any more: load them on their base "
            f"with load_pretrained(BASE, adapters={str(adapters)!r})"
        )
    return base


def load_adapters(model: torch.nn.Module, adapters: str | os.PathLike, heads: Sequence[str]) -> torch.nn.Module:
    """``model`` (the task head loaded from the base export, its ``heads`` fresh) with an adapter folder's LoRA
    factors and heads loaded and merged: a plain model, the same class.

    Raises:
        ValueError: the backbone is not the one the adapters were trained on (fingerprint), or the adapter weights do
            not fit the model (names listed).
    """
    from peft import inject_adapter_in_model

    adapters = Path(adapters)
    record = read_record(adapters)
    fingerprint = backbone_fingerprint(model)
    if fingerprint != record["base"]["backbone_sha256"]:
        raise ValueError(
            f"{adapters} was trained on another backbone than the one given (fingerprint {fingerprint[:12]} against "
            f"{record['base']['backbone_sha256'][:12]}, recorded from {record['base']['path']}): load the adapters "
            "on the base export they were fine-tuned from"
        )
    settings = LoraSettings(**{**record["lora"], "target_modules": tuple(record["lora"]["target_modules"])})
    inject_adapter_in_model(settings.peft_config(model.base_model_prefix), model, adapter_name=ADAPTER_NAME)
    weights = load_file(adapters / "model.safetensors")
    expected = set(adapter_weights(model, model.state_dict()))
    if set(weights) != expected:
        raise ValueError(
            f"{adapters}/model.safetensors does not fit the model: missing {sorted(expected - set(weights))[:5]}, "
            f"unexpected {sorted(set(weights) - expected)[:5]}"
        )
    model.load_state_dict(weights, strict=False)
    plain = merged_weights(model, model.state_dict())
    _unwrap(model)
    model.load_state_dict(plain, strict=True)
    return model


def _unwrap(model: torch.nn.Module) -> None:
    """Replace every LoRA-wrapped layer by its base layer (the weights are then overwritten by merged ones)."""
    for name, layer in _lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.get_base_layer())


def load_with_adapters(base: str | os.PathLike, adapters: str | os.PathLike, **config_overrides) -> torch.nn.Module:
    """The task model of an adapter folder on its ``base`` export, merged, in eval mode, carrying the adapter folder's
    tokenizer (the task's own, e.g. its gene panel). ``config_overrides`` as for ``load_pretrained``."""
    from transformers import AutoConfig

    from sc_foundation.data.tokenization import GeneTokenizer
    from sc_foundation.models import modeling
    from sc_foundation.models.export import check_export_files

    base, adapters = Path(base), Path(adapters)
    check_export_files(base)
    check_export_files(adapters)
    config = AutoConfig.from_pretrained(adapters, **config_overrides)
    model_class = getattr(modeling, config.architectures[0])
    heads = read_record(adapters)["heads"]
    model = model_class.from_pretrained(base, config=config, new_heads=heads)
    model = load_adapters(model, adapters, heads)
    model.eval()
    model.gene_tokenizer = GeneTokenizer.from_pretrained(adapters)
    return model
