"""The exported model directory: what fine-tuning, inference and users load (never a Lightning ``.ckpt``).

A directory holds ``config.json`` and ``model.safetensors`` (``save_pretrained``) and the tokenizer it was trained
with beside them (``gene_vocab.json``, ``gene_tokenizer.json``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import AutoConfig

from . import modeling
from .genes import VOCAB_FILE
from .modeling import ScFoundationPreTrainedModel
from .tokenization import TOKENIZER_FILE, GeneTokenizer


def export_pretrained(
    model: ScFoundationPreTrainedModel,
    tokenizer: GeneTokenizer,
    directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``directory`` atomically, replacing an earlier export there.

    Everything is written into a temporary folder beside ``directory`` and renamed into place, so a reader never
    sees a half-written export: at any moment ``directory`` is the old export, the new one, or briefly absent.

    Args:
        state_dict: the weights to save instead of ``model.state_dict()`` (the full state dict an FSDP run gathers).
        extra_files: file name -> text written beside the weights (a model card ``README.md``, ``metrics.json``).
    """
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    retired = None
    try:
        model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        if directory.exists():  # os.replace cannot overwrite a non-empty folder: move the old one aside first
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, retired / directory.name)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and not directory.exists() and (retired / directory.name).exists():
            os.replace(retired / directory.name, directory)  # put the old export back
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    return directory


def load_pretrained(
    path: str | os.PathLike, device: str | torch.device | None = None, **config_overrides
) -> ScFoundationPreTrainedModel:
    """Load an exported directory: the saved head class (strictly), in eval mode, carrying its tokenizer.

    The tokenizer is ``model.gene_tokenizer``: everything that feeds the model AnnData takes it from there. A
    published scGPT or Geneformer folder is converted on the fly (see :mod:`sc_foundation.convert`).

    Args:
        path: a directory written by :func:`export_pretrained` (``save_pretrained`` plus the tokenizer files), or
            a published scGPT or Geneformer folder.
        device: where to put the model; default CUDA when available, else CPU.
        config_overrides: config fields that need no other weights, e.g. ``pooling="mean"``, ``pooling_layer=-1``
            or ``normalize_cell_embedding=False`` to read another cell embedding than the model's own.

    Raises:
        FileNotFoundError: the directory lacks the model or the tokenizer files.
        ValueError: the tokenizer does not fit the model (vocabulary size or value encoding); a published folder
            that cannot be converted exactly (:class:`~sc_foundation.convert.ConversionError`).
    """
    from .convert import convert, detect

    path = Path(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if detect(path) is not None:
        return convert(path, **config_overrides).model.to(device)
    missing = [name for name in ("config.json", VOCAB_FILE, TOKENIZER_FILE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an exported sc_foundation model directory: it lacks {missing}. An export holds "
            f"config.json, model.safetensors, {VOCAB_FILE} and {TOKENIZER_FILE} (see sc_foundation.export)."
        )
    config = AutoConfig.from_pretrained(path)
    architecture = (config.architectures or ["ScFoundationModel"])[0]
    model_class = getattr(modeling, architecture, None)
    if not (isinstance(model_class, type) and issubclass(model_class, ScFoundationPreTrainedModel)):
        raise ValueError(f"{path}: config.json names architecture {architecture!r}, not an sc_foundation model")
    tokenizer = GeneTokenizer.from_pretrained(path)
    if len(tokenizer.vocab) != config.vocab_size or tokenizer.config.encoding != config.value_encoding:
        raise ValueError(
            f"{path}: the tokenizer ({len(tokenizer.vocab)} genes, {tokenizer.config.encoding} encoding) does not fit "
            f"the model ({config.vocab_size} genes, {config.value_encoding} encoding)"
        )
    model = model_class.from_pretrained(path, **config_overrides).to(device)
    model.eval()
    model.gene_tokenizer = tokenizer
    return model
