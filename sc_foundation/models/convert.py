"""Published checkpoints as sc_foundation models: scGPT and Geneformer, loaded strictly, without running their code.

Two published layouts are recognised (:func:`detect`):

* **scGPT** (``TransformerModel``): a folder with ``args.json`` (embsize, nlayers, nheads, d_hid, n_bins,
  input_emb_style, pad_value, mask_value, dropout, max_seq_len), ``best_model.pt`` (a torch state dict; attention
  as flash-attn 1's ``self_attn.Wqkv`` or torch's ``self_attn.in_proj_``) and ``vocab.json`` (``{symbol: id}``).
  It becomes a :class:`~sc_foundation.models.modeling.ScFoundationModel` with post-norm ReLU blocks, separately
  normalised
  gene and value embeddings, bins through the value MLP and, as scGPT's ``embed_data``, the L2-normalised
  ``<cls>`` output of the last layer as the cell embedding. The tokenizer bins like scGPT (per-cell quantiles, 51
  bins, ``<cls>`` first with value ``pad_value``, ``max_seq_len`` tokens, gene symbols).
* **Geneformer** (V1 and V2): a transformers ``BertForMaskedLM`` folder (``config.json``, ``model.safetensors`` or
  ``pytorch_model.bin``) with the pickled token dictionary (``{ensembl_id: token id}``) and gene median dictionary
  (``{ensembl_id: median}``) copied beside it (any ``*token_dictionary*.pkl`` and ``*gene_median_dictionary*.pkl``).
  It becomes a :class:`~sc_foundation.models.modeling.ScFoundationForMaskedGeneModeling` (the MLM head carried over)
  with
  learned positions and, as Geneformer's ``EmbExtractor``, the mean of the second-to-last layer over the gene
  tokens as the cell embedding. The tokenizer ranks like Geneformer (counts / total * 10,000 / gene median, highest
  first, ``<cls>``/``<eos>`` for V2, context = the model's positions).

The conversion is strict: every source weight is mapped onto the model, or is one of the source's pretraining
heads that no sc_foundation head reproduces (scGPT's expression, MVC and classification decoders, listed by name in
:attr:`Converted.dropped` and in a warning), or the conversion fails naming the keys; every weight of the model
comes from the source. Nothing from the source runs: ``.pt`` and ``.bin`` files are read with
``torch.load(weights_only=True)`` and Geneformer's pickles with an unpickler that admits only dicts, strings and
numbers.

Token ids stay the source's. Our vocabulary always holds ``<pad>``, ``<cls>`` and ``<mask>``: one that a source
vocabulary lacks (Geneformer V1 has no ``<cls>``, scGPT no ``<mask>``) is appended after the source's tokens, with
a zero gene embedding (and, for Geneformer's MLM head, a -1e4 output bias, so it is never predicted); the source's
tokenizer never emits it.

    python -m sc_foundation.models.convert SRC DST   # writes DST as our export (safetensors), for load_pretrained
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from sc_foundation.data.genes import CLS_TOKEN, EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, VOCAB_FILE, GeneVocab
from sc_foundation.data.tokenization import TOKENIZER_FILE, GeneTokenizer, TokenizerConfig
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import (
    ScFoundationForMaskedGeneModeling,
    ScFoundationModel,
    ScFoundationPreTrainedModel,
)

logger = logging.getLogger(__name__)

SCGPT_FILES = ("args.json", "best_model.pt", "vocab.json")
GENEFORMER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TOKEN_DICTIONARY_GLOB = "*token_dictionary*.pkl"
GENE_MEDIAN_GLOB = "*gene_median_dictionary*.pkl"
SCGPT_DROPPED_HEADS = ("decoder.", "mvc_decoder.", "cls_decoder.", "flag_encoder.", "grad_reverse_discriminator.")
"""scGPT's pretraining and task heads: read by name, reported, not carried (no sc_foundation head computes them)."""
_ABSENT_TOKEN_BIAS = -1e4  # MLM output bias of a special token the source vocabulary lacks: never predicted


class ConversionError(ValueError):
    """A published checkpoint that cannot be converted exactly: the message names the file, key and fix."""


@dataclass
class Converted:
    """A converted checkpoint: the model (eval mode, ``gene_tokenizer`` attached) and what was left out."""

    model: ScFoundationPreTrainedModel
    tokenizer: GeneTokenizer
    source: Literal["scgpt", "geneformer"]
    dropped: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- detection
def detect(path: str | os.PathLike) -> Literal["scgpt", "geneformer"] | None:
    """Which published layout the folder ``path`` holds, or None (e.g. one of our own exports).

    Raises:
        FileNotFoundError: some but not all of the scGPT files are there (the missing ones named).
    """
    path = Path(path)
    if not path.is_dir():
        return None
    scgpt = [name for name in SCGPT_FILES if (path / name).is_file()]
    if len(scgpt) == len(SCGPT_FILES):
        return "scgpt"
    if scgpt and not (path / "config.json").exists():
        missing = ", ".join(name for name in SCGPT_FILES if name not in scgpt)
        raise FileNotFoundError(
            f"{path} looks like a published scGPT folder ({', '.join(scgpt)}) but lacks {missing}: copy the whole "
            f"checkpoint folder ({', '.join(SCGPT_FILES)})"
        )
    config = path / "config.json"
    if config.is_file() and not (path / TOKENIZER_FILE).exists():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None  # not a Geneformer config; loading it as our export then names the damaged file
        if model_type == "bert":
            return "geneformer"
    return None


def convert(
    path: str | os.PathLike,
    *,
    token_dictionary: str | os.PathLike | None = None,
    gene_median_dictionary: str | os.PathLike | None = None,
    **config_overrides,
) -> Converted:
    """Convert the published checkpoint folder ``path`` in memory (see the module docstring).

    Args:
        token_dictionary, gene_median_dictionary: Geneformer's pickles, when they are not in ``path``.
        config_overrides: :class:`~sc_foundation.models.configuration.ScFoundationConfig` fields to change, e.g.
            ``pooling="mean"`` or ``pooling_layer=-1`` to read another cell embedding than the source's.

    Raises:
        ConversionError: not a published layout, or a file, key or shape that cannot be converted exactly.
    """
    path = Path(path)
    kind = detect(path)
    if kind == "scgpt":
        converted = _convert_scgpt(path, config_overrides)
    elif kind == "geneformer":
        dictionaries = _geneformer_dictionaries(path, token_dictionary, gene_median_dictionary)
        converted = _convert_geneformer(path, *dictionaries, config_overrides)
    else:
        raise ConversionError(
            f"{path} is neither a published scGPT folder ({', '.join(SCGPT_FILES)}) nor a Geneformer folder "
            "(a BertForMaskedLM config.json with its weights and the two dictionary pickles)"
        )
    if converted.dropped:
        warnings.warn(
            f"{path}: {kind} weights not carried over (pretraining heads no sc_foundation head computes): "
            f"{converted.dropped}",
            stacklevel=2,
        )
    converted.model.eval()
    converted.model.gene_tokenizer = converted.tokenizer
    return converted


def export_converted(src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> Path:
    """Convert ``src`` and write it to ``dst`` as our export (``config.json``, ``model.safetensors``, tokenizer)."""
    from sc_foundation.models.export import export_pretrained

    converted = convert(src, **kwargs)
    return export_pretrained(converted.model, converted.tokenizer, dst)


# ------------------------------------------------------------------------------------------ safe reading
def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from ``.safetensors``, or from ``.pt`` / ``.bin`` through
    ``torch.load(weights_only=True)``, which builds tensors and containers only, never arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path}: refused by torch.load(weights_only=True), which loads tensors only: {error}"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kinds = sorted({type(v).__name__ for v in state.values()}) if isinstance(state, dict) else type(state).__name__
        raise ConversionError(f"{path}: expected a flat state dict of tensors, found {kinds}")
    return state


class _DataUnpickler(pickle.Unpickler):
    """Admits only what a gene dictionary needs: dicts, strings and numbers (numpy numeric scalars included).

    ``find_class`` is where a pickle names code to call (``os.system``, a class to build); only numpy's scalar
    reconstruction is let through, and only for numeric dtypes.
    """

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _numeric_scalar
        if module == "numpy" and name == "dtype":
            return np.dtype
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only dicts, strings and numbers are admitted")


def _numeric_scalar(dtype: np.dtype, data: bytes = b"") -> np.generic:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refused a numpy scalar of dtype {dtype!r}: only numeric scalars are admitted")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def load_gene_dictionary(path: str | os.PathLike, value_type: type) -> dict[str, int | float]:
    """A Geneformer dictionary pickle, ``{gene or special token: value}``, read without running code.

    Raises:
        ConversionError: the pickle names anything but dicts, strings and numbers, or is not such a dict.
    """
    path = Path(path)
    try:
        data = _DataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise ConversionError(f"{path}: not loaded: {error}") from error
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        raise ConversionError(f"{path}: expected a dict keyed by gene ids, found {type(data).__name__}")
    bad = [key for key, value in data.items() if not isinstance(value, int | float | np.number)]
    if bad:
        raise ConversionError(f"{path}: values must be numbers, not at {bad[:5]}")
    return {key: value_type(value) for key, value in data.items()}


# -------------------------------------------------------------------------------------------- mapping
class _Weights:
    """The source state dict, consumed key by key, so that what is left over can be named."""

    def __init__(self, state: dict[str, torch.Tensor], source: Path):
        self.state = {key: value.float() for key, value in state.items()}
        self.source = source
        self.used: set[str] = set()

    def take(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise ConversionError(f"{self.source}: the weight {key!r} is missing")
        self.used.add(key)
        return self.state[key]

    def first(self, *keys: str) -> torch.Tensor:
        """The first of ``keys`` the source has (one tensor under alternative names)."""
        found = [key for key in keys if key in self.state]
        if len(found) != 1:
            raise ConversionError(f"{self.source}: expected exactly one of {list(keys)}, found {found}")
        return self.take(found[0])

    def leftover(self) -> list[str]:
        return sorted(set(self.state) - self.used)


def _pad_rows(weight: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    """``weight`` (V_src, ...) with rows appended up to ``rows`` (our appended special tokens)."""
    extra = weight.new_full((rows - weight.shape[0], *weight.shape[1:]), fill)
    return torch.cat([weight, extra])


def _build(model_class: type, config: ScFoundationConfig, mapped: dict[str, torch.Tensor], source: Path):
    """``model_class(config)`` holding exactly ``mapped``: every model weight filled, every shape equal."""
    model = model_class(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    shapes = [
        f"{key}: {tuple(mapped[key].shape)} for {tuple(value.shape)}"
        for key, value in expected.items()
        if key in mapped and mapped[key].shape != value.shape
    ]
    if missing or unexpected or shapes:
        raise ConversionError(
            f"{source}: the converted weights do not fit {model_class.__name__}: missing {missing}, "
            f"unexpected {unexpected}, other shapes {shapes}"
        )
    model.load_state_dict(mapped, strict=True)
    return model


# ------------------------------------------------------------------------------------------------ scGPT
def _scgpt_vocab(path: Path, rows: int) -> GeneVocab:
    """The ``vocab.json`` tokens in id order (ids must be 0..n-1, n the embedding rows) plus our specials."""
    mapping = json.loads(path.read_text())
    if not isinstance(mapping, dict):
        raise ConversionError(f"{path}: expected {{token: id}}, found {type(mapping).__name__}")
    missing = "the vocabulary lacks {token}, which scGPT's embedding needs"
    return _vocab_in_id_order(path, mapping, rows, "encoder.embedding.weight", (PAD_TOKEN, CLS_TOKEN), missing)


def _vocab_in_id_order(
    source: Path, mapping: dict, rows: int, embedding: str, required: tuple[str, ...], missing: str
) -> GeneVocab:
    """A published ``{token: id}`` mapping as our vocabulary, ids kept: they must be 0..n-1 without gaps, n the
    ``rows`` of ``embedding``, and the ``required`` tokens present (else ``missing`` names the one absent)."""
    ids = sorted(mapping.values())
    if ids != list(range(len(ids))):
        raise ConversionError(f"{source}: token ids must be 0..{len(ids) - 1} without gaps")
    if len(ids) != rows:
        raise ConversionError(f"{source}: {len(ids)} tokens, but {embedding} has {rows} rows")
    for token in required:
        if token not in mapping:
            raise ConversionError(f"{source}: {missing.format(token=token)}")
    return GeneVocab(sorted(mapping, key=mapping.get))


def _convert_scgpt(path: Path, overrides: dict) -> Converted:
    args = json.loads((path / "args.json").read_text())
    required = ("embsize", "nlayers", "nheads", "d_hid", "n_bins", "pad_value", "mask_value")
    absent = [key for key in required if key not in args]
    if absent:
        raise ConversionError(f"{path / 'args.json'}: lacks {absent}")
    style = args.get("input_emb_style", "continuous")
    if style != "continuous":
        raise ConversionError(
            f"{path / 'args.json'}: input_emb_style={style!r} is not supported; the released scGPT models use "
            "'continuous' (bins through the value MLP)"
        )
    if args.get("cell_emb_style", "cls") != "cls":
        raise ConversionError(f"{path / 'args.json'}: cell_emb_style={args['cell_emb_style']!r}; only 'cls' is known")
    weights = _Weights(load_state_dict(path / "best_model.pt"), path / "best_model.pt")
    refused = [key for key in weights.state if key.startswith(("dsbn.", "bn."))]
    if refused:
        raise ConversionError(f"{path}: batch-specific normalisation of the input ({refused[:4]}) is not supported")
    vocab = _scgpt_vocab(path / "vocab.json", weights.state["encoder.embedding.weight"].shape[0])
    config = ScFoundationConfig(
        **{
            "vocab_size": len(vocab),
            "hidden_size": args["embsize"],
            "num_hidden_layers": args["nlayers"],
            "num_attention_heads": args["nheads"],
            "intermediate_size": args["d_hid"],
            "hidden_dropout_prob": args.get("dropout", 0.0),
            "attention_dropout_prob": args.get("dropout", 0.0),
            "layer_norm_eps": 1e-5,
            "norm_placement": "pre" if args.get("pre_norm", False) else "post",
            "final_norm": False,
            "hidden_act": "relu",
            "embedding_norm": "separate",
            "value_encoding": "binned",
            "bin_embedding": "mlp",
            "n_bins": args["n_bins"],
            "max_position_embeddings": args.get("max_seq_len", 1200),
            "pooling": "cls",
            "normalize_cell_embedding": True,
            "pad_token_id": vocab.pad_id,
            "cls_token_id": vocab.cls_id,
            "mask_token_id": vocab.mask_id,
        }
        | overrides
    )
    if config.norm_placement == "pre":
        raise ConversionError(f"{path / 'args.json'}: pre_norm=true models are not supported (no final norm)")
    mapped = {
        "embeddings.gene_embeddings.weight": _pad_rows(weights.take("encoder.embedding.weight"), len(vocab)),
        "embeddings.gene_norm.weight": weights.take("encoder.enc_norm.weight"),
        "embeddings.gene_norm.bias": weights.take("encoder.enc_norm.bias"),
    }
    for ours, theirs in (("fc_in", "linear1"), ("fc_out", "linear2")):
        for part in ("weight", "bias"):
            mapped[f"embeddings.value_embeddings.{ours}.{part}"] = weights.take(f"value_encoder.{theirs}.{part}")
    for part in ("weight", "bias"):
        mapped[f"embeddings.value_norm.{part}"] = weights.take(f"value_encoder.norm.{part}")
    for i in range(config.num_hidden_layers):
        theirs, ours = f"transformer_encoder.layers.{i}", f"layers.{i}"
        for part in ("weight", "bias"):
            mapped[f"{ours}.attn.qkv.{part}"] = weights.first(
                f"{theirs}.self_attn.Wqkv.{part}", f"{theirs}.self_attn.in_proj_{part}"
            )
            mapped[f"{ours}.attn.out.{part}"] = weights.take(f"{theirs}.self_attn.out_proj.{part}")
            mapped[f"{ours}.mlp.fc_in.{part}"] = weights.take(f"{theirs}.linear1.{part}")
            mapped[f"{ours}.mlp.fc_out.{part}"] = weights.take(f"{theirs}.linear2.{part}")
            mapped[f"{ours}.attn_norm.{part}"] = weights.take(f"{theirs}.norm1.{part}")
            mapped[f"{ours}.mlp_norm.{part}"] = weights.take(f"{theirs}.norm2.{part}")
    # scGPT hides a masked value by feeding mask_value to its value encoder: our mask embedding is that output.
    mapped["embeddings.mask_value"] = _scgpt_value_embedding(mapped, float(args["mask_value"]), config)
    leftover = weights.leftover()
    unknown = [key for key in leftover if not key.startswith(SCGPT_DROPPED_HEADS)]
    if unknown:
        raise ConversionError(f"{path / 'best_model.pt'}: weights the conversion does not know: {unknown[:20]}")
    model = _build(ScFoundationModel, config, mapped, path)
    tokenizer = GeneTokenizer(
        vocab,
        TokenizerConfig(
            encoding="binned",
            n_bins=args["n_bins"],
            context_length=args.get("max_seq_len", 1200),
            truncation="random",
            add_cls=True,
            cls_value=float(args["pad_value"]),
            bin_edges="quantile",
            gene_id_type="symbol",
        ),
    )
    return Converted(model, tokenizer, "scgpt", leftover)


def _scgpt_value_embedding(mapped: dict[str, torch.Tensor], value: float, config: ScFoundationConfig) -> torch.Tensor:
    """scGPT's ``value_encoder(value)``: LayerNorm(linear2(ReLU(linear1(value)))), (h,)."""
    w = {key.removeprefix("embeddings."): tensor for key, tensor in mapped.items()}
    hidden = F.linear(torch.tensor([value]), w["value_embeddings.fc_in.weight"], w["value_embeddings.fc_in.bias"])
    out = F.linear(hidden.relu(), w["value_embeddings.fc_out.weight"], w["value_embeddings.fc_out.bias"])
    norm = (w["value_norm.weight"], w["value_norm.bias"])
    return F.layer_norm(out, (config.hidden_size,), *norm, eps=config.layer_norm_eps)


# ------------------------------------------------------------------------------------------- Geneformer
def _geneformer_dictionaries(path: Path, tokens: str | os.PathLike | None, medians: str | os.PathLike | None):
    def find(given, pattern: str, what: str) -> Path:
        if given is not None:
            return Path(given)
        found = sorted(path.glob(pattern))
        if len(found) != 1:
            raise ConversionError(
                f"{path}: needs exactly one {what} pickle ({pattern}) beside config.json, found "
                f"{[f.name for f in found]}. Copy Geneformer's (token_dictionary_gc104M.pkl and "
                "gene_median_dictionary_gc104M.pkl for V2, the gc30M ones for V1) into the folder, or pass it"
            )
        return found[0]

    return find(tokens, TOKEN_DICTIONARY_GLOB, "token dictionary"), find(medians, GENE_MEDIAN_GLOB, "gene median")


def _geneformer_vocab(token_file: Path, rows: int) -> tuple[GeneVocab, int]:
    """Our vocabulary of Geneformer's token dictionary (ids kept) and how many tokens the source has."""
    mapping = load_gene_dictionary(token_file, int)
    required = (PAD_TOKEN, MASK_TOKEN)
    vocab = _vocab_in_id_order(token_file, mapping, rows, "the word embedding", required, "lacks {token}")
    return vocab, len(mapping)


def _convert_geneformer(path: Path, token_file: Path, median_file: Path, overrides: dict) -> Converted:
    bert = json.loads((path / "config.json").read_text())
    if bert.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"{path / 'config.json'}: position_embedding_type must be 'absolute'")
    if bert.get("hidden_act") not in ("gelu", "relu"):
        raise ConversionError(f"{path / 'config.json'}: hidden_act={bert.get('hidden_act')!r}; gelu or relu only")
    weights_file = next((path / name for name in GENEFORMER_WEIGHTS if (path / name).is_file()), None)
    if weights_file is None:
        raise ConversionError(f"{path}: no weights ({' or '.join(GENEFORMER_WEIGHTS)})")
    state = load_state_dict(weights_file)
    # The encoder is under "bert." in a BertForMaskedLM; position_ids is a buffer of older transformers, not a weight.
    state = {key.removeprefix("bert."): value for key, value in state.items() if not key.endswith("position_ids")}
    weights = _Weights(state, weights_file)
    vocab, n_source = _geneformer_vocab(token_file, weights.state["embeddings.word_embeddings.weight"].shape[0])
    medians_by_gene = load_gene_dictionary(median_file, float)
    medians = np.full(len(vocab), np.nan)
    known = vocab.lookup(list(medians_by_gene))
    medians[known[known >= 0]] = np.asarray(list(medians_by_gene.values()))[known >= 0]
    has_cls, has_eos = CLS_TOKEN in vocab.tokens[:n_source], EOS_TOKEN in vocab.tokens[:n_source]
    config = ScFoundationConfig(
        **{
            "vocab_size": len(vocab),
            "hidden_size": bert["hidden_size"],
            "num_hidden_layers": bert["num_hidden_layers"],
            "num_attention_heads": bert["num_attention_heads"],
            "intermediate_size": bert["intermediate_size"],
            "hidden_dropout_prob": bert.get("hidden_dropout_prob", 0.1),
            "attention_dropout_prob": bert.get("attention_probs_dropout_prob", 0.1),
            "layer_norm_eps": bert.get("layer_norm_eps", 1e-12),
            "norm_placement": "post",
            "final_norm": False,
            "hidden_act": bert["hidden_act"],
            "value_encoding": "rank",
            "max_position_embeddings": bert["max_position_embeddings"],
            "pooling": "mean",
            "pooling_layer": -2 if bert["num_hidden_layers"] > 1 else -1,
            "pad_token_id": vocab.pad_id,
            "cls_token_id": vocab.cls_id,
            "mask_token_id": vocab.mask_id,
            "eos_token_id": vocab[EOS_TOKEN] if has_eos else None,
        }
        | overrides
    )
    words = weights.take("embeddings.word_embeddings.weight")
    # Geneformer gives every token type 0: that row is a constant added to every position, folded in here.
    token_type = weights.take("embeddings.token_type_embeddings.weight")[0]
    mapped = {
        "embeddings.gene_embeddings.weight": _pad_rows(words, len(vocab)),
        "embeddings.position_embeddings.weight": weights.take("embeddings.position_embeddings.weight") + token_type,
        "embeddings.norm.weight": weights.take("embeddings.LayerNorm.weight"),
        "embeddings.norm.bias": weights.take("embeddings.LayerNorm.bias"),
    }
    for i in range(config.num_hidden_layers):
        theirs, ours = f"encoder.layer.{i}", f"layers.{i}"
        for part in ("weight", "bias"):
            qkv = [weights.take(f"{theirs}.attention.self.{name}.{part}") for name in ("query", "key", "value")]
            mapped[f"{ours}.attn.qkv.{part}"] = torch.cat(qkv)  # (3h, h): q, k, v stacked as our fused projection
            mapped[f"{ours}.attn.out.{part}"] = weights.take(f"{theirs}.attention.output.dense.{part}")
            mapped[f"{ours}.attn_norm.{part}"] = weights.take(f"{theirs}.attention.output.LayerNorm.{part}")
            mapped[f"{ours}.mlp.fc_in.{part}"] = weights.take(f"{theirs}.intermediate.dense.{part}")
            mapped[f"{ours}.mlp.fc_out.{part}"] = weights.take(f"{theirs}.output.dense.{part}")
            mapped[f"{ours}.mlp_norm.{part}"] = weights.take(f"{theirs}.output.LayerNorm.{part}")
    model_class = ScFoundationModel
    if any(key.startswith("cls.predictions.") for key in weights.state):
        model_class = ScFoundationForMaskedGeneModeling
        mapped = {f"sc_foundation.{key}": value for key, value in mapped.items()}
        mapped |= _geneformer_mlm_head(weights, words, len(vocab))
    leftover = weights.leftover()
    if leftover:
        raise ConversionError(f"{weights_file}: weights the conversion does not know: {leftover[:20]}")
    model = _build(model_class, config, mapped, path)
    tokenizer = GeneTokenizer(
        vocab,
        TokenizerConfig(
            encoding="rank",
            context_length=bert["max_position_embeddings"],
            truncation="top",
            add_cls=has_cls,
            add_eos=has_eos,
            target_sum=10_000,
            gene_id_type="ensembl",
        ),
        medians,
    )
    return Converted(model, tokenizer, "geneformer", [])


def _geneformer_mlm_head(weights: _Weights, words: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
    """BERT's MLM head onto our gene decoder; its output weights must be the (tied) word embeddings."""
    head = {}
    for ours, theirs in (("dense", "dense"), ("norm", "LayerNorm")):
        for part in ("weight", "bias"):
            head[f"gene_decoder.transform.{ours}.{part}"] = weights.take(f"cls.predictions.transform.{theirs}.{part}")
    bias = weights.take("cls.predictions.bias")
    if "cls.predictions.decoder.bias" in weights.state and not torch.equal(
        weights.take("cls.predictions.decoder.bias"), bias
    ):
        raise ConversionError(f"{weights.source}: cls.predictions.decoder.bias differs from cls.predictions.bias")
    if "cls.predictions.decoder.weight" in weights.state and not torch.equal(
        weights.take("cls.predictions.decoder.weight"), words
    ):
        raise ConversionError(
            f"{weights.source}: the MLM decoder weight is not tied to the word embeddings; our decoder is tied"
        )
    head["gene_decoder.bias"] = _pad_rows(bias, rows, _ABSENT_TOKEN_BIAS)
    return head


# ---------------------------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Convert a published scGPT or Geneformer folder into our export.")
    parser.add_argument("src", type=Path, help="the published folder")
    parser.add_argument("dst", type=Path, help="the export folder to write (replaced if it exists)")
    parser.add_argument("--token-dictionary", type=Path, help="Geneformer: the token dictionary pickle")
    parser.add_argument("--gene-median-dictionary", type=Path, help="Geneformer: the gene median pickle")
    args = parser.parse_args(argv)
    extra: dict[str, Path] = {}
    if args.token_dictionary:
        extra["token_dictionary"] = args.token_dictionary
    if args.gene_median_dictionary:
        extra["gene_median_dictionary"] = args.gene_median_dictionary
    out = export_converted(args.src, args.dst, **extra)
    print(f"{detect(args.src)} checkpoint {args.src} -> {out} ({VOCAB_FILE}, {TOKENIZER_FILE}, model.safetensors)")
    return out


if __name__ == "__main__":
    main()
