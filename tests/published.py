"""Stand-ins for the published checkpoints: small random models in the exact published layouts, written as the
published folders, with the reference forward passes the conversion is checked against.

* scGPT: :class:`ScGPTReference` is scGPT's ``TransformerModel`` encoder path rebuilt from torch modules with its
  module names (``encoder.embedding`` + ``encoder.enc_norm``, ``value_encoder.linear1/linear2/norm``, post-norm ReLU
  ``torch.nn.TransformerEncoderLayer``s, ``decoder.fc`` and ``mvc_decoder`` heads). :func:`write_scgpt_folder`
  saves it as ``args.json``, ``best_model.pt`` (attention as flash-attn's ``Wqkv`` or torch's ``in_proj_``) and
  ``vocab.json``.
* Geneformer: transformers' own ``BertForMaskedLM`` (:func:`write_geneformer_folder`) saved with
  ``save_pretrained`` beside pickled token and gene-median dictionaries.

The benchmarks (benchmarks/inference.py) build the same references at the published sizes.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn

SCGPT_SPECIALS = ("<pad>", "<cls>", "<eoc>")
SCGPT_ARGS = {"n_bins": 51, "input_emb_style": "continuous", "pad_value": -2, "mask_value": -1, "max_seq_len": 1200}


class ScGPTReference(nn.Module):
    """scGPT's encoder path, (B, L) gene ids and values -> hidden states, with its parameter names."""

    def __init__(self, ntoken: int, d_model: int, nhead: int, d_hid: int, nlayers: int):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.embedding = nn.Embedding(ntoken, d_model)
        self.encoder.enc_norm = nn.LayerNorm(d_model)
        self.value_encoder = nn.Module()
        self.value_encoder.linear1 = nn.Linear(1, d_model)
        self.value_encoder.linear2 = nn.Linear(d_model, d_model)
        self.value_encoder.norm = nn.LayerNorm(d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, d_hid, dropout=0.0, batch_first=True)  # post-norm, ReLU
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.decoder = nn.Module()  # ExprDecoder
        hidden = [nn.Linear(d_model, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model), nn.LeakyReLU()]
        self.decoder.fc = nn.Sequential(*hidden, nn.Linear(d_model, 1))
        self.mvc_decoder = nn.Module()  # MVCDecoder, "inner product"
        self.mvc_decoder.gene2query = nn.Linear(d_model, d_model)
        self.mvc_decoder.W = nn.Linear(d_model, d_model, bias=False)

    def forward(self, genes: torch.Tensor, values: torch.Tensor, padding: torch.Tensor) -> list[torch.Tensor]:
        """genes (B, L) long, values (B, L) float, padding (B, L) bool True at padding -> the embeddings and each
        layer's output, (B, L, h) each."""
        x = self.encoder.enc_norm(self.encoder.embedding(genes))
        v = values.unsqueeze(-1).clamp(max=512)  # scGPT's ContinuousValueEncoder clips at max_value=512
        v = self.value_encoder.norm(self.value_encoder.linear2(torch.relu(self.value_encoder.linear1(v))))
        hidden = [x + v]
        for layer in self.transformer_encoder.layers:
            hidden.append(layer(hidden[-1], src_key_padding_mask=padding))
        return hidden


def randomize(module: nn.Module, seed: int, scale: float) -> nn.Module:
    """Every parameter random (LayerNorm weights around 1), so that no mapping error can hide behind an init;
    ``scale`` ~ width ** -0.5 keeps the activations (and the attention logits) of a trained model's order."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            is_norm_weight = name.endswith("weight") and parameter.dim() == 1
            parameter.copy_(1 + noise if is_norm_weight else noise)
    return module.eval()


def write_scgpt_folder(
    directory: Path,
    genes: list[str],
    *,
    d_model: int = 32,
    nhead: int = 4,
    d_hid: int = 48,
    nlayers: int = 2,
    attention_naming: str = "Wqkv",
    seed: int = 0,
) -> ScGPTReference:
    """Write a random scGPT checkpoint folder over gene symbols ``genes`` (specials last); return its reference."""
    tokens = [*genes, *SCGPT_SPECIALS]
    reference = randomize(ScGPTReference(len(tokens), d_model, nhead, d_hid, nlayers), seed, d_model**-0.5)
    state = reference.state_dict()
    if attention_naming == "Wqkv":  # the released checkpoints: flash-attn 1's FlashMHA packs q, k, v in Wqkv
        state = {key.replace("self_attn.in_proj_", "self_attn.Wqkv."): value for key, value in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "best_model.pt")
    args = SCGPT_ARGS | {"embsize": d_model, "nheads": nhead, "d_hid": d_hid, "nlayers": nlayers, "dropout": 0.2}
    (directory / "args.json").write_text(json.dumps(args | {"pad_token": "<pad>", "fast_transformer": True}))
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    return reference


def geneformer_v1_tokens(shared_data: Path) -> list[str]:
    """Geneformer V1's 25,426 tokens (``<pad>``, ``<mask>``, then Ensembl ids), from the Genecorpus sample."""
    lines = (shared_data / "genecorpus_tokenized" / "vocab.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip()]


def geneformer_v2_tokens(shared_data: Path, size: int = 20_275) -> list[str]:
    """A V2-shaped token list: ``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``, then ``size - 4`` Ensembl ids."""
    genes = [token for token in geneformer_v1_tokens(shared_data) if token.startswith("ENSG")]
    return ["<pad>", "<mask>", "<cls>", "<eos>", *genes[: size - 4]]


def write_geneformer_folder(
    directory: Path,
    tokens: list[str],
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 2048,
    seed: int = 0,
):
    """Write a random Geneformer folder (BertForMaskedLM, token and median dictionaries); return the BERT model
    and the medians ``{ensembl_id: float}`` (seeded, exact in float32)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(tokens),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        hidden_act="relu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.02,
        attention_probs_dropout_prob=0.02,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    bert = BertForMaskedLM(config)
    randomize(bert, seed, hidden_size**-0.5)
    bert.tie_weights()  # randomize() replaced the tied decoder's values through the shared tensor
    bert.save_pretrained(directory)
    rng = np.random.default_rng(seed)
    genes = [token for token in tokens if not token.startswith("<")]
    medians = {gene: float(np.float32(m)) for gene, m in zip(genes, rng.lognormal(0.5, 0.8, len(genes)), strict=True)}
    with open(directory / "token_dictionary_stand_in.pkl", "wb") as handle:
        pickle.dump({token: i for i, token in enumerate(tokens)}, handle)
    with open(directory / "gene_median_dictionary_stand_in.pkl", "wb") as handle:
        pickle.dump(medians, handle)
    return bert.eval(), medians
