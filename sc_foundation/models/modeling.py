"""The sc_foundation model: a pre-norm Transformer encoder over gene tokens, and one head per objective.

Shapes: ``B`` cells in a padded batch of length ``L``; a packed batch is one row of ``T`` tokens holding ``n_cells``
cells end to end (``cu_seqlens`` gives their boundaries); ``h`` hidden size, ``nh`` heads, ``hd = h // nh``; ``M``
masked positions; ``V`` vocabulary size.

The backbone (:class:`ScFoundationModel`) maps tokens to hidden states and a cell embedding and knows no objective.
Each objective is a head class ``ScFoundationFor<Objective>`` that returns an output with ``loss``. Importing this
module registers the classes with the transformers Auto classes.
"""

import contextlib
import logging as std_logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from sc_foundation.models.configuration import ScFoundationConfig

try:  # optional extra: pip install sc_foundation[flash]
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:  # torch >= 2.10 ships a flash varlen kernel of its own (CUDA only, no attention dropout)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

logger = logging.get_logger(__name__)


@dataclass
class ScFoundationModelOutput(ModelOutput):
    """Output of :class:`ScFoundationModel`.

    Args:
        last_hidden_state: (B, L, h) after the final LayerNorm (if ``config.final_norm``); (1, T, h) for a packed
            batch.
        cell_embedding: (n_cells, h), pooled by ``config.pooling`` from the block ``config.pooling_layer`` (and
            L2-normalised with ``config.normalize_cell_embedding``); n_cells = B for a padded batch.
        hidden_states: with ``output_hidden_states``, num_hidden_layers + 1 tensors shaped like
            ``last_hidden_state``: the embeddings, then each block's output (before the final LayerNorm).
    """

    last_hidden_state: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class ScFoundationMaskedValueOutput(ModelOutput):
    """Output of :class:`ScFoundationForMaskedValueModeling`.

    Predictions are made at the masked positions, (M, ...) in row-major order of ``mask``, when ``mask`` is given,
    and at every position, (B, L, ...), when it is not.

    With ``view_masks`` (two views of each cell, for the contrastive term) the logits, predictions and cell
    embedding are those of the first view.

    Args:
        loss: scalar, ``masked_weight`` times ``masked_loss`` plus the weighted cell-level terms below; when
            ``labels`` are given.
        logits: binned encoding: (M, n_bins) or (B, L, n_bins) scores over the bins.
        predictions: continuous encoding: (M,) or (B, L) predicted log1p values.
        masked_loss: scalar cross-entropy over bins or MSE of the masked values.
        mvc_loss: scalar, the masked-value-from-cell term, when ``mvc_weight > 0`` and ``labels`` are given.
        reconstruction_loss, contrastive_loss, ecs_loss, adversarial_batch_loss: scalars of
            :class:`ScFoundationCellObjectives`, when their weights are positive and ``labels`` are given (the
            adversarial term is the discriminator's cross-entropy, counted in ``loss`` while training only).
        cell_embedding: (n_cells, h).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    masked_loss: torch.Tensor | None = None
    mvc_loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    ecs_loss: torch.Tensor | None = None
    adversarial_batch_loss: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None


@dataclass
class ScFoundationMaskedGeneOutput(ModelOutput):
    """Output of :class:`ScFoundationForMaskedGeneModeling`.

    Args:
        loss: scalar cross-entropy over the vocabulary at the masked positions, when ``labels`` are given.
        logits: (M, V) at the masked positions when ``mask`` is given, else (B, L, V). Only the masked positions
            are scored in training because (B, L, V) would dwarf every other activation.
        cell_embedding: (n_cells, h).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None


@dataclass
class ScFoundationCellClassificationOutput(ModelOutput):
    """Output of :class:`ScFoundationForCellClassification`.

    Args:
        loss: scalar cross-entropy (weighted by ``config.class_weights`` when set), when ``labels`` are given.
        logits: (n_cells, C) class scores, C = ``config.num_labels``, in ``config.id2label`` order.
        cell_embedding: (n_cells, h), the backbone's cell embedding the classifier reads.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None


@dataclass
class ScFoundationExpressionOutput(ModelOutput):
    """Output of :class:`ScFoundationForImputation` and :class:`ScFoundationForBatchIntegration`.

    Args:
        loss: scalar, ``reconstruction_loss`` plus (in training mode) ``dab_weight`` times ``dab_loss``; when
            ``counts`` are given.
        reconstruction_loss: scalar multinomial negative log-likelihood of the panel counts, per count.
        dab_loss: scalar cross-entropy of the batch discriminator, when ``dab_weight > 0`` and counts are given.
        kl_loss: scalar KL divergence of the variational latent from ``N(0, I)`` per count (with
            ``config.latent_size``), when counts are given; ``loss`` adds ``kl_weight`` times it.
        cross_batch_loss: scalar squared distance of the cell embeddings from their cross-batch targets, relative to
            the batch's spread (:func:`_target_distance`), in training mode when ``cross_batch_weight > 0`` and
            targets are given; ``loss`` adds ``cross_batch_weight`` times it.
        logits: (n_cells, G) scores of the G panel genes (``config.decoder_gene_ids``); their softmax is each gene's
            expected share of the cell's panel counts.
        batch_logits: (n_cells, n_batches) discriminator scores, when ``dab_weight > 0`` and counts are given.
        cell_embedding: (n_cells, h), what the decoder reads (with the batch embedding, when batch-conditioned);
            with ``config.latent_size``, the latent mean (n_cells, latent_size).
    """

    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    dab_loss: torch.Tensor | None = None
    kl_loss: torch.Tensor | None = None
    cross_batch_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    batch_logits: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None


@dataclass
class ScFoundationMultimodalOutput(ModelOutput):
    """Output of :class:`ScFoundationForMultimodal`.

    Args:
        loss: scalar prediction loss of the second modality (MSE for protein, binary cross-entropy for ATAC), when
            ``modality_values`` are given.
        predictions: (n_cells, F) the predicted second modality: CLR values (protein) or open probabilities (ATAC).
        cell_embedding: (n_cells, h), of RNA alone or of both modalities (see ``encode_modality``).
    """

    loss: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    cell_embedding: torch.Tensor | None = None


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient times ``-scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Gradient reversal (Ganin & Lempitsky): ``x`` unchanged forward, its gradient multiplied by ``-scale``
    backward. A discriminator behind it learns to predict its target, and what lies in front of it learns to
    defeat the discriminator, in one minimisation."""
    return _GradientReversal.apply(x, scale)


def _cell_layout(
    input_ids: torch.Tensor, cu_seqlens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each cell lies in a padded (B, L) or packed (1, T) batch.

    Returns:
        cell_ids: (B, L) or (1, T) long, the cell of every token (0..n_cells-1).
        positions: same shape, the token's position inside its cell.
        starts: (n_cells,) long, the flat index (into ``input_ids.flatten()``) of each cell's first token.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if cu_seqlens is None:
        cell_ids = torch.arange(batch, device=device)[:, None].expand(batch, length)  # (B, L)
        positions = torch.arange(length, device=device)[None, :].expand(batch, length)  # (B, L)
        return cell_ids, positions, torch.arange(batch, device=device) * length
    starts = cu_seqlens[:-1].long()  # (n_cells,)
    cells = torch.arange(starts.numel(), device=device)
    cell_ids = torch.repeat_interleave(cells, cu_seqlens.diff().long(), output_size=length)  # (T,)
    positions = torch.arange(length, device=device) - starts[cell_ids]  # (T,)
    return cell_ids[None, :], positions[None, :], starts  # (1, T), (1, T), (n_cells,)


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _mlp(in_features: int, hidden_features: int, out_features: int, activation: str = "gelu") -> nn.Sequential:
    """Linear -> activation -> Linear, with named layers so that checkpoint keys read ``fc_in`` / ``fc_out``."""
    return nn.Sequential(
        OrderedDict(
            fc_in=nn.Linear(in_features, hidden_features),
            act=_ACTIVATIONS[activation](),
            fc_out=nn.Linear(hidden_features, out_features),
        )
    )


VARLEN_DTYPES = (torch.float16, torch.bfloat16)
"""The only dtypes the varlen kernels (flash-attn's and torch's, both FlashAttention-2) compute in."""


def varlen_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why no varlen kernel can run attention in ``dtype`` on ``device``, or None when one can.

    Both kernels are FlashAttention-2: CUDA only, fp16 or bf16 only (an fp32 run, ``--precision fp32`` or
    ``trainer.precision=32-true``, must fall back rather than crash) and compute capability 8.0 or newer (Ampere;
    a V100 or T4 must fall back too).
    """
    if flash_attn_varlen_func is None and varlen_attn is None:
        return "neither flash-attn nor torch's varlen_attn is installed"
    if device.type != "cuda":
        return f"the varlen kernels run on CUDA only, not on {device.type}"
    if dtype not in VARLEN_DTYPES:
        return f"the varlen kernels compute in fp16 or bf16 only, not {dtype} (train in bf16-mixed to use them)"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"the varlen kernels need a GPU of compute capability 8.0 (Ampere) or newer, this one has {capability}"
    return None


def _varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float,
) -> torch.Tensor:
    """Attention inside each packed cell on CUDA: q, k, v (T, nh, hd) -> (T, nh, hd)."""
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout_p)
    if dropout_p > 0:
        raise ValueError(
            "torch's varlen_attn has no attention dropout: install flash-attn or set attention_dropout_prob=0"
        )
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


class ScFoundationEmbeddings(nn.Module):
    """Gene embedding + value embedding (+ rank positions) + condition embeddings, normalised.

    The value embedding follows ``config.value_encoding`` (and ``bin_embedding``); where ``mask`` is True the value
    is replaced by a learned mask-value embedding, so the model cannot read the value it is asked to predict.
    Conditions (e.g. the batch) are added to every token rather than to CLS alone: it works under mean pooling too,
    where there may be no CLS, and every gene can shift by condition directly (detection differs gene by gene
    between technologies). The LayerNorm (on the sum, or on the gene and value embeddings apart, by
    ``config.embedding_norm``) keeps the sum on one scale even where the continuous value MLP sees large values.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__()
        h = config.hidden_size
        self.value_encoding = config.value_encoding
        self.value_mlp = config.value_encoding == "continuous" or (
            config.value_encoding == "binned" and config.bin_embedding == "mlp"
        )
        self.gene_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        if self.value_mlp:  # the value (log1p expression, or a bin index as a number) through a small MLP
            self.value_embeddings = _mlp(1, h, h, config.hidden_act)
            self.mask_value = nn.Parameter(torch.empty(h))
        elif config.value_encoding == "binned":
            self.mask_bin = config.n_bins
            self.value_embeddings = nn.Embedding(config.n_bins + 1, h)  # the extra last row is the hidden value
        else:  # rank: the order is the value, so positions carry it
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.condition_embeddings = nn.ModuleDict(
            {name: nn.Embedding(size, h) for name, size in config.condition_vocab_sizes.items()}
        )
        if config.embedding_norm == "sum":
            self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        else:
            self.gene_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
            if config.value_encoding != "rank":
                self.value_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _norm(self, name: str, embedding: torch.Tensor) -> torch.Tensor:
        """The LayerNorm ``name`` (``norm``, ``gene_norm``, ``value_norm``) where this model has it, else identity."""
        norm = getattr(self, name, None)
        return embedding if norm is None else norm(embedding)

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None,
        mask: torch.Tensor | None,
        condition_ids: dict[str, torch.Tensor] | None,
        cell_ids: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """Embed a batch.

        Args:
            input_ids: (B, L) gene ids.
            values: (B, L) float, bin indices or log1p values; unused by the rank encoding.
            mask: (B, L) bool, positions whose value is hidden, or None.
            condition_ids: name -> (n_cells,) category ids, or None.
            cell_ids: (B, L), the cell of every token (indexes the condition ids).
            positions: (B, L), position inside the cell (rank encoding only).

        Returns:
            (B, L, h).
        """
        embedding = self._norm("gene_norm", self.gene_embeddings(input_ids))  # (B, L, h)
        if self.value_mlp:
            value_embedding = self.value_embeddings(values.unsqueeze(-1).to(embedding.dtype))  # (B, L, 1) -> (B, L, h)
            value_embedding = self._norm("value_norm", value_embedding)
            if mask is not None:
                value_embedding = torch.where(mask.unsqueeze(-1), self.mask_value, value_embedding)
            embedding = embedding + value_embedding
        elif self.value_encoding == "binned":
            bins = values.long()
            if mask is not None:
                bins = bins.masked_fill(mask, self.mask_bin)
            embedding = embedding + self._norm("value_norm", self.value_embeddings(bins))
        else:
            embedding = embedding + self.position_embeddings(positions)
        for name, table in self.condition_embeddings.items():
            embedding = embedding + table(condition_ids[name])[cell_ids]  # (n_cells, h) -> (B, L, h)
        return self.dropout(self._norm("norm", embedding))


class ScFoundationAttention(nn.Module):
    """Bidirectional multi-head self-attention; one fused qkv projection serves every kernel."""

    def __init__(self, config: ScFoundationConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout_p = config.attention_dropout_prob
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            hidden: (B, L, h); (1, T, h) for a packed batch.
            attn_mask: bool, broadcastable to (B, nh, L, L), True where a query may attend to a key; None lets
                every token see every token. Used by the SDPA path.
            cu_seqlens: (n_cells + 1,) int32, given only to take the varlen kernel (packed batch on CUDA).
            max_seqlen: longest cell of the packed batch, with ``cu_seqlens``.

        Returns:
            (B, L, h).
        """
        batch, length, width = hidden.shape
        dropout_p = self.dropout_p if self.training else 0.0
        qkv = self.qkv(hidden).view(batch, length, 3, self.num_heads, self.head_dim)  # (B, L, 3, nh, hd)
        if cu_seqlens is None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, nh, L, hd)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, nh, L, hd)
            out = out.transpose(1, 2)  # (B, L, nh, hd)
        else:
            q, k, v = qkv[0].unbind(1)  # each (T, nh, hd): the varlen kernels take a flat row of tokens
            out = _varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p)  # (T, nh, hd)
        return self.out(out.reshape(batch, length, width))  # (B, L, nh, hd) -> (B, L, h)


class ScFoundationBlock(nn.Module):
    """Transformer block, (B, L, h) -> (B, L, h). Pre-norm: x + attn(LN(x)), then x + MLP(LN(x)); post-norm
    (``config.norm_placement``): LN(x + attn(x)), then LN(x + MLP(x))."""

    def __init__(self, config: ScFoundationConfig):
        super().__init__()
        h = config.hidden_size
        self.pre_norm = config.norm_placement == "pre"
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.attn = ScFoundationAttention(config)
        self.mlp_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.mlp = _mlp(h, config.intermediate_size, h, config.hidden_act)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> torch.Tensor:
        """See :meth:`ScFoundationAttention.forward` for the arguments."""
        if self.pre_norm:
            hidden = hidden + self.dropout(self.attn(self.attn_norm(hidden), attn_mask, cu_seqlens, max_seqlen))
            return hidden + self.dropout(self.mlp(self.mlp_norm(hidden)))
        hidden = self.attn_norm(hidden + self.dropout(self.attn(hidden, attn_mask, cu_seqlens, max_seqlen)))
        return self.mlp_norm(hidden + self.dropout(self.mlp(hidden)))


def _prediction_transform(config: ScFoundationConfig) -> nn.Sequential:
    """The token-wise transform in front of an output projection (as in BERT's MLM head): (..., h) -> (..., h)."""
    h = config.hidden_size
    return nn.Sequential(
        OrderedDict(
            dense=nn.Linear(h, h),
            act=_ACTIVATIONS[config.hidden_act](),
            norm=nn.LayerNorm(h, eps=config.layer_norm_eps),
        )
    )


class ScFoundationValueHead(nn.Module):
    """Scores the bins (binned) or regresses the value (continuous) of each token: (..., h) -> (..., out)."""

    def __init__(self, config: ScFoundationConfig):
        super().__init__()
        self.transform = _prediction_transform(config)
        self.proj = nn.Linear(config.hidden_size, config.n_bins if config.value_encoding == "binned" else 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., h) -> (..., n_bins) logits or (..., 1) values."""
        return self.proj(self.transform(hidden))


class ScFoundationGeneDecoder(nn.Module):
    """Scores every vocabulary gene, with the output weights tied to the gene embeddings: (..., h) -> (..., V).

    The tie is by construction (the embedding matrix is passed in), so there is one parameter, one checkpoint key
    and nothing for transformers' weight-tying machinery to do.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__()
        self.transform = _prediction_transform(config)
        self.bias = nn.Parameter(torch.empty(config.vocab_size))

    def forward(self, hidden: torch.Tensor, gene_embeddings: torch.Tensor) -> torch.Tensor:
        """hidden (..., h), gene_embeddings (V, h) -> logits (..., V)."""
        return F.linear(self.transform(hidden), gene_embeddings, self.bias)


class ScFoundationMVCHead(nn.Module):
    """Predicts a gene's value from the cell embedding and the gene embedding alone (scGPT's GEPC/MVC idea).

    ``value = <GELU(W_g gene), W_c cell>``: a per-gene query read against the cell embedding, which therefore
    has to carry the cell's expression profile. ``cell_size`` is the width of what stands for the cell: ``h``, or
    more where the cell embedding comes with other cell-level inputs (a batch embedding, for integration).
    """

    def __init__(self, config: ScFoundationConfig, cell_size: int | None = None):
        super().__init__()
        self.gene_query = nn.Linear(config.hidden_size, config.hidden_size)
        self.cell_proj = nn.Linear(cell_size or config.hidden_size, config.hidden_size)

    def forward(self, gene_embedding: torch.Tensor, cell_embedding: torch.Tensor) -> torch.Tensor:
        """gene_embedding (M, h), cell_embedding (M, cell_size) of each gene's cell -> (M,) predicted values."""
        return (F.gelu(self.gene_query(gene_embedding)) * self.cell_proj(cell_embedding)).sum(-1)


class ScFoundationFeatureDecoder(nn.Module):
    """Scores every feature of a panel (genes, antibodies, peaks) for each cell, from what stands for the cell.

    ``logits[c, f] = <MLP(cell_c), GELU(W_q feature_f)> + b_f``: the features are queries built from their own
    embeddings (the gene embeddings for a gene panel), so the decoder has one bias per feature and no (h, F) output
    matrix to learn from scratch. Like scVI's decoder, it reads only the cell-level representation, so that
    representation has to carry the cell's whole profile, zeros included.
    """

    def __init__(self, config: ScFoundationConfig, cell_size: int, n_features: int):
        super().__init__()
        h = config.hidden_size
        self.cell_mlp = _mlp(cell_size, h, h)
        self.feature_query = nn.Linear(h, h)
        self.bias = nn.Parameter(torch.empty(n_features))

    def forward(self, cells: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """cells (n_cells, cell_size), features (F, h) embeddings -> logits (n_cells, F)."""
        return self.cell_mlp(cells) @ F.gelu(self.feature_query(features)).T + self.bias


def multinomial_nll(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean over cells of the multinomial negative log-likelihood per count.

    Per cell ``-sum_g x_g log softmax(z)_g / sum_g x_g``; logits (n_cells, G), counts (n_cells, G) raw counts ->
    scalar. A cell without counts adds 0.
    """
    log_shares = logits.float().log_softmax(-1)
    counts = counts.float()
    return (-(counts * log_shares).sum(-1) / counts.sum(-1).clamp(min=1)).mean()


def info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views: row i of ``first`` and of ``second`` (n, d) are the same cell, every
    other row of the batch a negative. Cosine similarities over ``temperature``; scalar."""
    first, second = F.normalize(first.float(), dim=-1), F.normalize(second.float(), dim=-1)
    logits = first @ second.T / temperature  # (n, n)
    target = torch.arange(len(first), device=first.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def elastic_cell_similarity(cells: torch.Tensor, threshold: float) -> torch.Tensor:
    """scGPT's elastic cell similarity: ``mean(1 - (relu(cos_ij) - threshold)^2)`` over the pairs i != j of the
    batch's cell embeddings (n, d); minimising it pushes each pair's similarity away from ``threshold``. Scalar."""
    unit = F.normalize(cells.float(), dim=-1)
    similarity = (unit @ unit.T).relu()  # (n, n)
    off_diagonal = ~torch.eye(len(cells), dtype=torch.bool, device=cells.device)
    return (1 - (similarity[off_diagonal] - threshold) ** 2).mean()


def keep_tokens(keep: torch.Tensor, pad_token_id: int, input_ids: torch.Tensor, *others: torch.Tensor):
    """Drop the tokens where ``keep`` (B, L) is False and close the gaps: every row keeps its tokens in order,
    then padding, in the shortest width that holds the longest row.

    Returns ``(attention_mask, input_ids, *others)``, each (B, L'); dropped and padded slots hold ``pad_token_id``
    in ``input_ids`` and zeros (False) in the others. A view of a cell is computed at the cost of its own tokens.
    """
    width = max(int(keep.sum(dim=1).max()), 1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions first, in order
    kept = keep.gather(1, order)  # (B, L')
    ids = input_ids.gather(1, order).masked_fill(~kept, pad_token_id)
    rest = [t.gather(1, order).masked_fill(~kept, 0) for t in others]
    return (kept, ids, *rest)


class ScFoundationCellObjectives(nn.Module):
    """Cell-level pretraining terms on the cell embedding, beside the masked token objective of a pretraining head.

    * reconstruction (``config.reconstruction_weight``): a :class:`ScFoundationFeatureDecoder` scores every gene of
      the panel (``config.decoder_gene_ids``, else every vocabulary id but padding, CLS and mask) from the cell
      embedding; the multinomial likelihood of the cell's expression over the panel, zeros included, is the loss.
      Being a likelihood of shares, it does not depend on the library size: depth need not be encoded.
    * contrastive (``config.contrastive_weight``): :func:`info_nce` between the projected embeddings of two views of
      each cell (a SimCLR-style MLP projection, so that the embedding itself keeps what the views do not share).
    * elastic cell similarity (``config.ecs_weight``): :func:`elastic_cell_similarity` of the first view.
    * batch-aware terms, over the corpus batches ``config.corpus_batch_names`` (``batch_ids`` in the batch):
      ``config.reconstruction_batch_conditioned`` makes the reconstruction decoder read a learned embedding of the
      cell's batch beside the cell embedding (scVI's idea: the batch explains its own part of the counts, so the
      cell embedding need not); ``config.adversarial_batch_weight`` adds a discriminator that predicts the batch from
      each view's cell embedding behind a gradient reversal (scGPT's DAB), counted in the loss while training only.

    Shapes: ``n`` cells, ``G`` panel genes, ``h`` hidden size, ``e`` batch embedding size, ``K`` corpus batches.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__()
        h = config.hidden_size
        self.config = config
        self.decoder = None
        n_batches = len(config.corpus_batch_names or ())
        conditioned = config.reconstruction_batch_conditioned
        self.batch_embeddings = nn.Embedding(n_batches, config.batch_embedding_size) if conditioned else None
        cell_size = h + (config.batch_embedding_size if conditioned else 0)
        if config.reconstruction_weight > 0:
            special = {config.pad_token_id, config.cls_token_id, config.mask_token_id}
            panel = config.decoder_gene_ids or [i for i in range(config.vocab_size) if i not in special]
            column = torch.full((config.vocab_size,), -1, dtype=torch.long)
            column[torch.as_tensor(panel)] = torch.arange(len(panel))
            # Derived from the config, so not saved: a checkpoint holds only learnt weights.
            self.register_buffer("panel_ids", torch.as_tensor(panel), persistent=False)
            self.register_buffer("panel_column", column, persistent=False)
            if config.reconstruction_decoder == "linear":
                self.decoder = nn.Linear(cell_size, len(panel))  # GLM-PCA's loadings (G, h) and per-gene offsets
            else:
                self.decoder = ScFoundationFeatureDecoder(config, cell_size, len(panel))
        self.projection = _mlp(h, h, h) if config.contrastive_weight > 0 else None
        self.discriminator = _mlp(h, h, n_batches) if config.adversarial_batch_weight > 0 else None

    def panel_expression(self, input_ids: torch.Tensor, log_values: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(B, G) expression (counts per ``target_sum``) over the panel from a padded batch's tokens: input_ids,
        log1p values and real-token mask (B, L). Panel genes the cell does not list are 0."""
        column = self.panel_column[input_ids]  # (B, L), -1 off the panel
        hit = real & (column >= 0)
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(input_ids)
        expression = log_values.new_zeros(len(input_ids), len(self.panel_ids), dtype=torch.float32)
        expression[rows[hit], column[hit]] = torch.expm1(log_values[hit].float())
        return expression

    def forward(
        self,
        views: Sequence[torch.Tensor],
        gene_embeddings: nn.Embedding,
        expression: torch.Tensor | None,
        batch_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The weighted-in terms whose weights are positive.

        Args:
            views: one or two (n, h) cell embeddings of the same cells; the contrastive term needs two.
            gene_embeddings: the backbone's gene embedding table (the decoder's queries).
            expression: (n, G) expression over the panel, for the reconstruction.
            batch_ids: (n,) long ids into ``config.corpus_batch_names``, for the batch-aware terms.
        Returns:
            ``reconstruction_loss``, ``contrastive_loss``, ``ecs_loss``, ``adversarial_batch_loss`` -> scalar, as
            configured.
        """
        config, losses = self.config, {}
        if (self.batch_embeddings is not None or self.discriminator is not None) and batch_ids is None:
            raise ValueError(
                "the batch-aware pretraining terms need batch_ids, each cell's corpus batch: pretrain.run adds them "
                "to the batches (per_cell={'batch_ids': ...} for a CorpusDataModule of your own)"
            )
        if self.decoder is not None:
            losses["reconstruction_loss"] = torch.stack(
                [multinomial_nll(self.decode(cells, gene_embeddings, batch_ids), expression) for cells in views]
            ).mean()
        if self.projection is not None:
            if len(views) != 2:
                raise ValueError("contrastive_weight > 0 needs two views of each cell: pass view_masks")
            losses["contrastive_loss"] = info_nce(
                self.projection(views[0]), self.projection(views[1]), config.contrastive_temperature
            )
        if config.ecs_weight > 0:
            losses["ecs_loss"] = elastic_cell_similarity(views[0], config.ecs_threshold)
        if self.discriminator is not None:
            losses["adversarial_batch_loss"] = torch.stack(
                [F.cross_entropy(self.discriminator(grad_reverse(cells)).float(), batch_ids.long()) for cells in views]
            ).mean()
        return losses

    def decode(
        self, cells: torch.Tensor, gene_embeddings: nn.Embedding, batch_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Panel logits (n, G) from cell embeddings (n, h) (and, for a batch-conditioned decoder, the cells' (n,)
        batch ids)."""
        if self.batch_embeddings is not None:
            cells = torch.cat([cells, self.batch_embeddings(batch_ids).to(cells.dtype)], dim=-1)  # (n, h + e)
        if isinstance(self.decoder, nn.Linear):
            return self.decoder(cells)
        return self.decoder(cells, gene_embeddings(self.panel_ids))

    def weighted_sum(self, losses: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """sum of each term of :meth:`forward` times its config weight. The adversarial term counts in training mode
        only: its value rises as the encoder wins, so in a validation loss it would reward nothing."""
        weights = {
            "reconstruction_loss": self.config.reconstruction_weight,
            "contrastive_loss": self.config.contrastive_weight,
            "ecs_loss": self.config.ecs_weight,
            "adversarial_batch_loss": self.config.adversarial_batch_weight if self.training else 0.0,
        }
        return sum(weights[name] * value for name, value in losses.items())


def _not_a_load_report(record: std_logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def transformers_quiet():
    """transformers' progress bars ("Loading weights", "Writing model shards") off and its LOAD REPORT dropped while
    we load or save a model: our loading is strict and says itself what happened (one INFO line, or an error).

    ``logging.getLogger("sc_foundation").setLevel(logging.DEBUG)`` lets transformers' full report and bars through.
    """
    if logger.isEnabledFor(std_logging.DEBUG):
        yield
        return
    bars = logging.is_progress_bar_enabled()
    # A filter, not a level: transformers runs extra checks, with warnings of their own, when this logger's level
    # is WARNING or above.
    loader = std_logging.getLogger("transformers.modeling_utils")
    logging.disable_progress_bar()
    loader.addFilter(_not_a_load_report)
    try:
        yield
    finally:
        loader.removeFilter(_not_a_load_report)
        if bars:
            logging.enable_progress_bar()


class ScFoundationPreTrainedModel(PreTrainedModel):
    """Weight initialisation and strict loading, shared by the backbone and every head.

    Strict loading: :meth:`from_pretrained` raises on missing or unexpected weights, naming them, where
    transformers would only log them.

    - The backbone must match the checkpoint key for key.
    - A head of this model must be in the checkpoint in full, or be wholly absent and named in ``new_heads``
      (the caller declares it new on purpose, e.g. a fine-tuning head on a pretrained backbone). A head that is
      partly there is an error even when declared.
    - Checkpoint weights under a top-level module this model does not have are another objective's head (a
      pretraining export carries its pretraining heads): they are dropped and logged, which is how the bare
      backbone or a new task is taken out of any export. Any other unexpected weight is an error.
    """

    config_class = ScFoundationConfig
    base_model_prefix = "sc_foundation"
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults (normal linear and embedding weights, zero biases and padding row, unit
        LayerNorms) plus our own parameters."""
        super()._init_weights(module)
        if isinstance(module, ScFoundationEmbeddings) and module.value_mlp:
            init.normal_(module.mask_value, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ScFoundationGeneDecoder | ScFoundationFeatureDecoder):
            init.zeros_(module.bias)
        elif isinstance(module, ScFoundationModalityEmbeddings):
            init.normal_(module.modality_embedding, mean=0.0, std=self.config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        """The gene embedding table, (V, h)."""
        return self.base_model.embeddings.gene_embeddings

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, new_heads: Sequence[str] = (), **kwargs):
        """``PreTrainedModel.from_pretrained`` with strict loading (see the class docstring).

        Args:
            new_heads: names of this model's heads (top-level modules beside ``sc_foundation``) that are new on
                purpose and start from their initialisation when the checkpoint has none of their weights.
            kwargs: as for transformers; ``output_loading_info=True`` also returns the loading report. Weights of
                other shapes are an error whatever ``ignore_mismatched_sizes`` says.
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        kwargs.pop("ignore_mismatched_sizes", None)
        with transformers_quiet():
            # transformers would raise on mismatched shapes with a hint about a flag the caller never set; it
            # loads the rest here and _check_loading names the shapes instead.
            model, info = super().from_pretrained(
                pretrained_model_name_or_path,
                *model_args,
                output_loading_info=True,
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        model._check_loading(info, set(new_heads), pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model

    def _check_loading(self, info: dict, new_heads: set[str], source) -> None:
        """Raise on what the checkpoint lacks or holds beyond this model, apart from declared and foreign heads;
        log one line saying what was loaded otherwise."""
        children = {name for name, _ in self.named_children()}
        heads = children - {self.base_model_prefix} if self.base_model is not self else set()
        if new_heads - heads:
            raise ValueError(
                f"new_heads {sorted(new_heads - heads)} are not heads of {type(self).__name__}; "
                f"its heads are {sorted(heads)}"
            )
        missing = set(info["missing_keys"])
        for name in new_heads:
            head_keys = {f"{name}.{key}" for key in getattr(self, name).state_dict()}
            if head_keys <= missing:  # wholly absent: new on purpose
                missing -= head_keys
        # A checkpoint names the backbone with or without the prefix, whichever class saved it.
        owned = children | {self.base_model_prefix} | {name for name, _ in self.base_model.named_children()}
        unexpected = {key for key in info["unexpected_keys"] if key.split(".")[0] in owned}
        foreign = set(info["unexpected_keys"]) - unexpected
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {sorted(missing)}")
        if unexpected:
            problems.append(f"unexpected in the checkpoint: {sorted(unexpected)}")
        if info["mismatched_keys"]:
            problems.append(
                f"with other shapes in the checkpoint: {sorted(info['mismatched_keys'])} (config.json and the "
                "weights file disagree, e.g. an edited hidden_size: restore config.json from the export)"
            )
        if problems:
            hint = f". Heads new on purpose are declared with new_heads=[...]; heads: {sorted(heads)}" if heads else ""
            raise ValueError(f"{type(self).__name__} does not match {source}: weights {'; '.join(problems)}{hint}")
        fresh = sorted(name for name in new_heads if any(key.startswith(f"{name}.") for key in info["missing_keys"]))
        dropped = sorted({key.split(".")[0] for key in foreign})
        logger.info(
            f"Loaded {type(self).__name__} from {source} strictly: every weight of the checkpoint matched"
            + (f"; new heads {fresh} start from their initialisation" if fresh else "")
            + (f"; dropped the checkpoint's heads {dropped}, which {type(self).__name__} lacks" if dropped else "")
        )


class ScFoundationModel(ScFoundationPreTrainedModel):
    """The backbone: gene tokens -> hidden states and a cell embedding.

    Padded batches run through SDPA with a key-padding mask. Packed batches (``cu_seqlens`` given) run through a
    varlen kernel when ``config.attention_backend == "flash_varlen"`` and one can run (CUDA, flash-attn or torch's
    ``varlen_attn``); otherwise through SDPA with a block-diagonal mask, which is exact but O(T^2) in memory.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__(config)
        self.embeddings = ScFoundationEmbeddings(config)
        self.layers = nn.ModuleList(ScFoundationBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.final_norm else None
        # Switched by transformers' activation_checkpointing_enable(), which also sets its own checkpoint function.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        condition_ids: dict[str, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        output_hidden_states: bool = False,
        extra_embeddings: torch.Tensor | None = None,
        extra_attention_mask: torch.Tensor | None = None,
    ) -> ScFoundationModelOutput:
        """Encode a padded (B, L) or packed (1, T) batch.

        Args:
            input_ids: (B, L) or (1, T) long gene ids.
            values: same shape, float; bin indices (binned) or log1p values (continuous). Ignored by rank.
            attention_mask: (B, L) bool, True at real tokens; None means no padding. Not allowed when packed.
            mask: same shape as input_ids, bool; values hidden behind the mask-value embedding (value encodings).
            condition_ids: name -> (n_cells,) long, one entry per name in ``config.condition_vocab_sizes``.
            cu_seqlens: (n_cells + 1,) int, cumulative cell lengths from 0; marks a packed batch.
            max_seqlen: the longest cell of a packed batch.
            output_hidden_states: also return every block's output.
            extra_embeddings: (B, K, h) tokens of another kind (a second modality's features, already embedded and
                normalised) appended after each cell's gene tokens; padded batches only. They are attended to and
                pooled like gene tokens, so ``last_hidden_state`` is (B, L + K, h).
            extra_attention_mask: (B, K) bool, True at real extra tokens; required with ``extra_embeddings``.

        Returns:
            :class:`ScFoundationModelOutput`.
        """
        self._check_inputs(input_ids, values, attention_mask, mask, condition_ids, cu_seqlens, max_seqlen)
        cell_ids, positions, starts = _cell_layout(input_ids, cu_seqlens)
        hidden = self.embeddings(input_ids, values, mask, condition_ids, cell_ids, positions)  # (B, L, h)
        if extra_embeddings is not None:
            if cu_seqlens is not None or extra_attention_mask is None:
                raise ValueError("extra_embeddings need a padded batch and their extra_attention_mask")
            hidden = torch.cat([hidden, extra_embeddings.to(hidden.dtype)], dim=1)  # (B, L + K, h)
            if attention_mask is None:
                attention_mask = input_ids.new_ones(input_ids.shape, dtype=torch.bool)
            attention_mask = torch.cat([attention_mask.bool(), extra_attention_mask.bool()], dim=1)  # (B, L + K)
            # Pad ids stand for the extra tokens in the pooling, which reads only "not CLS" and the mask.
            filler = input_ids.new_full(extra_attention_mask.shape, self.config.pad_token_id)
            input_ids = torch.cat([input_ids, filler], dim=1)  # (B, L + K)
            cell_ids, _, starts = _cell_layout(input_ids, None)

        attn_mask, varlen_cu_seqlens = None, None
        if cu_seqlens is None:
            if attention_mask is not None:
                attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): mask padded keys
        elif self._use_varlen_kernel(hidden):
            varlen_cu_seqlens = cu_seqlens.to(torch.int32)
        else:
            attn_mask = (cell_ids[0, :, None] == cell_ids[0, None, :])[None, None]  # (1, 1, T, T) block diagonal

        all_hidden = [hidden]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer, hidden, attn_mask, varlen_cu_seqlens, max_seqlen)
            else:
                hidden = layer(hidden, attn_mask, varlen_cu_seqlens, max_seqlen)
            all_hidden.append(hidden)
        if self.norm is not None:
            hidden = self.norm(hidden)
        pooled = hidden if self.config.pooling_layer == -1 else all_hidden[self.config.pooling_layer]
        cell_embedding = self._pool(pooled, input_ids, attention_mask, cell_ids, starts)
        if self.config.normalize_cell_embedding:
            cell_embedding = F.normalize(cell_embedding, dim=-1)
        return ScFoundationModelOutput(
            last_hidden_state=hidden,
            cell_embedding=cell_embedding,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
        )

    def _use_varlen_kernel(self, hidden: torch.Tensor) -> bool:
        if self.config.attention_backend != "flash_varlen":
            return False
        # Under autocast the attention's q, k, v come out of the projection in the autocast dtype, whatever the
        # dtype of the embeddings' output.
        autocast = hidden.device.type == "cuda" and torch.is_autocast_enabled("cuda")
        reason = varlen_unavailable(hidden.device, torch.get_autocast_dtype("cuda") if autocast else hidden.dtype)
        if reason is None:
            return True
        logger.warning_once(
            f"attention_backend='flash_varlen': {reason}; packed batches fall back to SDPA with a block-diagonal "
            "mask (exact, but O(T^2) memory)"
        )
        return False

    def _pool(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cell_ids: torch.Tensor,
        starts: torch.Tensor,
    ) -> torch.Tensor:
        """Cell embeddings (n_cells, h) from hidden (B, L, h): the CLS token, or the mean of the real tokens other
        than CLS and EOS.

        A padded batch is handled as a packed one, its rows laid end to end, so both take one code path.
        """
        flat = hidden.flatten(0, 1)  # (B * L, h)
        if self.config.pooling == "cls":
            return flat[starts]
        weight = input_ids != self.config.cls_token_id  # (B, L)
        if self.config.eos_token_id is not None:
            weight = weight & (input_ids != self.config.eos_token_id)
        if attention_mask is not None:
            weight = weight & attention_mask.bool()
        weight = weight.flatten().to(flat.dtype)  # (B * L,)
        n_cells, flat_cells = starts.numel(), cell_ids.flatten()
        sums = flat.new_zeros(n_cells, flat.shape[1]).index_add_(0, flat_cells, flat * weight[:, None])
        counts = flat.new_zeros(n_cells).index_add_(0, flat_cells, weight)
        return sums / counts.clamp(min=1)[:, None]

    def _check_inputs(self, input_ids, values, attention_mask, mask, condition_ids, cu_seqlens, max_seqlen) -> None:
        """Reject malformed batches with a clear message rather than an indexing error deep in the model."""
        config = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L) or (1, T), got shape {tuple(input_ids.shape)}")
        if config.value_encoding != "rank" and values is None:
            raise ValueError(f"the {config.value_encoding} encoding needs values")
        for name, tensor in (("values", values), ("attention_mask", attention_mask), ("mask", mask)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, input_ids {tuple(input_ids.shape)}")
        if set(condition_ids or {}) != set(config.condition_vocab_sizes):
            raise ValueError(
                f"condition_ids must have exactly the conditions {sorted(config.condition_vocab_sizes)}, "
                f"got {sorted(condition_ids or {})}"
            )
        longest = input_ids.shape[1]
        if cu_seqlens is not None:
            if input_ids.shape[0] != 1 or attention_mask is not None or max_seqlen is None:
                raise ValueError("a packed batch is input_ids (1, T) with cu_seqlens and max_seqlen, no attention_mask")
            if int(cu_seqlens[-1]) != input_ids.shape[1]:
                raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the batch has {input_ids.shape[1]}")
            longest = max_seqlen
        if config.value_encoding == "rank" and longest > config.max_position_embeddings:
            raise ValueError(f"a cell of {longest} tokens exceeds max_position_embeddings")
        # Reads token values: not under the fake tensors of a memory plan (sc_foundation.training.memory), which
        # have shapes only.
        if config.pooling == "cls" and not isinstance(input_ids, FakeTensor):
            first = input_ids[:, 0] if cu_seqlens is None else input_ids[0, cu_seqlens[:-1].long()]
            if not bool((first == config.cls_token_id).all()):
                raise ValueError("pooling='cls' needs cls_token_id at the start of every cell")


class ScFoundationForMaskedValueModeling(ScFoundationPreTrainedModel):
    """Pretraining on values: predict the hidden values at masked positions (binned: cross-entropy over bins;
    continuous: MSE), plus the cell-level terms that the config switches on.

    With ``config.mvc_weight > 0`` the loss adds the masked-value-from-cell term: each masked gene's value is
    predicted from the cell embedding and its gene embedding alone (:class:`ScFoundationMVCHead`). Its target is
    the label, scaled to [0, 1] by ``n_bins - 1`` for bins so that its MSE sits on the scale of the main loss.
    ``reconstruction_weight``, ``contrastive_weight`` and ``ecs_weight`` add the terms of
    :class:`ScFoundationCellObjectives`; the contrastive term needs ``view_masks``.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__(config)
        if config.value_encoding not in ("binned", "continuous"):
            raise ValueError(
                f"masked value modeling needs a binned or continuous encoding, not {config.value_encoding}"
            )
        self.sc_foundation = ScFoundationModel(config)
        self.value_head = ScFoundationValueHead(config)
        self.mvc_head = ScFoundationMVCHead(config) if config.mvc_weight > 0 else None
        has_cell_terms = (
            config.reconstruction_weight > 0
            or config.contrastive_weight > 0
            or config.ecs_weight > 0
            or config.adversarial_batch_weight > 0
        )
        self.cell_objectives = ScFoundationCellObjectives(config) if has_cell_terms else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        condition_ids: dict[str, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        view_masks: torch.Tensor | None = None,
        batch_ids: torch.Tensor | None = None,
        view_values: torch.Tensor | None = None,
    ) -> ScFoundationMaskedValueOutput:
        """Args as for :meth:`ScFoundationModel.forward`, plus ``labels``: same shape as input_ids, float, the
        true value (bin index or log1p value) at the ``mask`` positions and ignored elsewhere; ``view_masks``:
        (2, B, L) bool, the tokens each of two views of a padded batch keeps (their masked tokens are scored in both
        views); ``view_values``: (2, B, L) float, each view's own values (technical views: thinner, other capture),
        else both views read ``values``, while the masked targets and the reconstructed expression stay the cell's
        own; ``batch_ids``: (B,) long corpus batch of each cell, for the batch-aware terms (training only: the
        encoder never reads it)."""
        if labels is not None and mask is None:
            raise ValueError("labels need the mask of the positions to predict")
        if view_masks is not None and (cu_seqlens is not None or mask is None or labels is None):
            raise ValueError("view_masks need a padded batch with its mask and labels (pretraining batches)")
        if labels is None or view_masks is None:
            return self._forward_view(
                attention_mask,
                input_ids,
                values,
                mask,
                labels,
                condition_ids,
                cu_seqlens,
                max_seqlen,
                with_cell_terms=True,
                batch_ids=batch_ids,
            )
        real = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
        per_view = [values, values] if view_values is None else view_values.to(values.dtype)
        views = [
            self._forward_view(
                *keep_tokens(real & keep, self.config.pad_token_id, input_ids, seen, mask, labels),
                condition_ids=condition_ids,
            )
            for keep, seen in zip(view_masks.bool(), per_view, strict=True)
        ]
        output = views[0]
        output.masked_loss = torch.stack([view.masked_loss for view in views]).mean()
        output.loss = self.config.masked_weight * output.masked_loss
        if self.mvc_head is not None:
            output.mvc_loss = torch.stack([view.mvc_loss for view in views]).mean()
            output.loss = output.loss + self.config.mvc_weight * output.mvc_loss
        if self.cell_objectives is not None:
            views = [view.cell_embedding for view in views]
            self._add_cell_terms(output, views, input_ids, values, real, mask, labels, batch_ids)
        return output

    def _forward_view(
        self,
        attention_mask: torch.Tensor | None,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        condition_ids: dict[str, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        with_cell_terms: bool = False,
        batch_ids: torch.Tensor | None = None,
    ) -> ScFoundationMaskedValueOutput:
        """One pass of the encoder and the token-level terms (and, with ``with_cell_terms``, the single-view cell
        terms). Arguments as for :meth:`forward`, ``attention_mask`` first (the order of :func:`keep_tokens`)."""
        encoded = self.sc_foundation(input_ids, values, attention_mask, mask, condition_ids, cu_seqlens, max_seqlen)
        hidden = encoded.last_hidden_state if mask is None else encoded.last_hidden_state[mask]  # (B, L, h) or (M, h)
        scores = self.value_head(hidden)  # (..., n_bins) or (..., 1)
        binned = self.config.value_encoding == "binned"
        output = ScFoundationMaskedValueOutput(
            logits=scores if binned else None,
            predictions=None if binned else scores.squeeze(-1),
            cell_embedding=encoded.cell_embedding,
        )
        if labels is None:
            return output
        target = labels[mask].float()  # (M,)
        if not len(target):  # a view may keep none of its cells' masked tokens
            output.masked_loss = scores.sum() * 0.0
        elif binned:
            output.masked_loss = F.cross_entropy(scores.float(), target.long())
        else:
            output.masked_loss = F.mse_loss(output.predictions.float(), target)
        output.loss = self.config.masked_weight * output.masked_loss
        if self.mvc_head is not None:
            cell_ids, _, _ = _cell_layout(input_ids, cu_seqlens)
            genes = self.sc_foundation.embeddings.gene_embeddings(input_ids[mask])  # (M, h)
            predicted = self.mvc_head(genes, encoded.cell_embedding[cell_ids[mask]])  # (M,)
            mvc_target = target / (self.config.n_bins - 1) if binned else target
            output.mvc_loss = F.mse_loss(predicted.float(), mvc_target) if len(target) else predicted.sum() * 0.0
            output.loss = output.loss + self.config.mvc_weight * output.mvc_loss
        if with_cell_terms and self.cell_objectives is not None:
            if cu_seqlens is not None:
                raise ValueError("the cell-level objectives need padded batches: set data.loader.pack=false")
            real = input_ids != self.config.pad_token_id if attention_mask is None else attention_mask.bool()
            self._add_cell_terms(output, [encoded.cell_embedding], input_ids, values, real, mask, labels, batch_ids)
        return output

    def _add_cell_terms(self, output, views, input_ids, values, real, mask, labels, batch_ids=None) -> None:
        """Add the cell-level terms of the embeddings ``views`` (each (B, h)) to ``output``; the reconstruction target
        is the whole cell's expression, masked values restored from ``labels``."""
        expression = None
        if self.cell_objectives.decoder is not None:
            log_values = torch.where(mask, labels, values)  # (B, L): every token's true log1p value
            expression = self.cell_objectives.panel_expression(input_ids, log_values, real)
        terms = self.cell_objectives(views, self.sc_foundation.embeddings.gene_embeddings, expression, batch_ids)
        for name, value in terms.items():
            setattr(output, name, value)
        output.loss = output.loss + self.cell_objectives.weighted_sum(terms)


class ScFoundationForMaskedGeneModeling(ScFoundationPreTrainedModel):
    """Predict the gene at masked positions of a rank-encoded cell (Geneformer's objective).

    The data pipeline has put ``mask_token_id`` into input_ids at the masked positions; the decoder scores the
    whole vocabulary with weights tied to the gene embeddings.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__(config)
        if config.value_encoding != "rank":
            raise ValueError(f"masked gene modeling needs the rank encoding, not {config.value_encoding}")
        self.sc_foundation = ScFoundationModel(config)
        self.gene_decoder = ScFoundationGeneDecoder(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        condition_ids: dict[str, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> ScFoundationMaskedGeneOutput:
        """Args as for :meth:`ScFoundationModel.forward` (``values`` ignored), plus ``mask``: the positions to
        score, and ``labels``: same shape as input_ids, long, the original gene id at masked positions, -100
        elsewhere."""
        encoded = self.sc_foundation(input_ids, values, attention_mask, None, condition_ids, cu_seqlens, max_seqlen)
        hidden = encoded.last_hidden_state if mask is None else encoded.last_hidden_state[mask]  # (B, L, h) or (M, h)
        logits = self.gene_decoder(hidden, self.sc_foundation.embeddings.gene_embeddings.weight)  # (..., V)
        output = ScFoundationMaskedGeneOutput(logits=logits, cell_embedding=encoded.cell_embedding)
        if labels is not None:
            target = labels if mask is None else labels[mask]
            output.loss = F.cross_entropy(logits.flatten(0, -2).float(), target.flatten(), ignore_index=-100)
        return output


class ScFoundationForCellClassification(ScFoundationPreTrainedModel):
    """Cell-level classification (e.g. cell-type annotation): dropout and a linear layer on the cell embedding.

    The labels are ``config.id2label`` / ``config.label2id`` (transformers conventions; ``num_labels`` follows from
    them). A linear read-out keeps the head's capacity small, so what it learns must come from the embedding (and
    from the backbone, when that is fine-tuned too). A pretrained export loads into it with
    ``from_pretrained(path, new_heads=["classifier"])``; the pretraining heads are dropped.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__(config)
        self.sc_foundation = ScFoundationModel(config)
        dropout = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.classifier = nn.Sequential(
            OrderedDict(dropout=nn.Dropout(dropout), proj=nn.Linear(config.hidden_size, config.num_labels))
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        condition_ids: dict[str, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> ScFoundationCellClassificationOutput:
        """Args as for :meth:`ScFoundationModel.forward` (nothing masked), plus ``labels``: (n_cells,) long class
        ids."""
        encoded = self.sc_foundation(input_ids, values, attention_mask, None, condition_ids, cu_seqlens, max_seqlen)
        logits = self.classifier(encoded.cell_embedding)  # (n_cells, h) -> (n_cells, C)
        output = ScFoundationCellClassificationOutput(logits=logits, cell_embedding=encoded.cell_embedding)
        if labels is not None:
            weight = None
            if self.config.class_weights is not None:
                weight = torch.tensor(self.config.class_weights, dtype=torch.float32, device=logits.device)
            output.loss = F.cross_entropy(
                logits.float(), labels.long(), weight=weight, label_smoothing=float(self.config.label_smoothing)
            )
        return output


class ScFoundationForImputation(ScFoundationPreTrainedModel):
    """Expression of a gene panel, zeros included, decoded from the cell embedding (imputation; scVI's objective).

    The encoder reads a cell's tokens (its detected genes); :class:`ScFoundationFeatureDecoder` scores every panel
    gene (``config.decoder_gene_ids``) from the cell embedding, and the softmax of those scores is each gene's expected
    share of the cell's panel counts. The loss is the multinomial likelihood of the observed panel counts, so genes
    the cell did not detect are targets too (at zero): the decoder learns expected expression, which is what
    imputation reads back at genes whose counts dropped out. Works with every value encoding.

    With ``config.batch_names``, the decoder also reads a learned embedding of the cell's batch (``batch_ids``), and
    with ``config.dab_weight > 0`` an adversarial batch discriminator (scGPT's DAB) reads the cell embedding behind a
    gradient reversal (:func:`grad_reverse`): see :class:`ScFoundationForBatchIntegration`, which requires them.
    A pretrained export loads into it with ``from_pretrained(path, new_heads=["decoder"], decoder_gene_ids=[...])``.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__(config)
        if config.decoder_gene_ids is None:
            raise ValueError("an expression decoder needs config.decoder_gene_ids, the vocabulary ids of its genes")
        h = config.hidden_size
        self.sc_foundation = ScFoundationModel(config)
        # The variational latent: mean and log-variance, both from the pooled cell embedding.
        self.latent = nn.Linear(h, 2 * config.latent_size) if config.latent_size else None
        # The share of kl_weight that training applies: a KL warm-up (sc_foundation.tasks.integration.KLWarmup)
        # raises it from 0 to 1 over the first epochs. Evaluation always applies the whole weight, so the validation
        # losses of different epochs (early stopping, the best checkpoint) price the latent alike.
        self.kl_share = 1.0
        embedding_size = config.latent_size or h
        batched = config.batch_names is not None
        self.batch_embeddings = nn.Embedding(len(config.batch_names), config.batch_embedding_size) if batched else None
        cell_size = embedding_size + (config.batch_embedding_size if batched else 0)
        self.decoder = ScFoundationFeatureDecoder(config, cell_size, len(config.decoder_gene_ids))
        has_discriminator = batched and config.dab_weight > 0
        self.discriminator = _mlp(embedding_size, h, len(config.batch_names)) if has_discriminator else None
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        batch_ids: torch.Tensor | None = None,
        condition_ids: dict[str, torch.Tensor] | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cross_batch_targets: torch.Tensor | None = None,
    ) -> ScFoundationExpressionOutput:
        """Args as for :meth:`ScFoundationModel.forward` (nothing masked), plus ``counts``: (n_cells, G) raw counts
        of the panel genes, the targets; ``batch_ids``: (n_cells,) long ids into ``config.batch_names``, needed by
        a batch-conditioned decoder. Without ``batch_ids`` such a model returns only the cell embedding.
        ``cross_batch_targets``: (n_cells, d) float, where each cell's embedding is pulled while training (NaN rows:
        no target), read when ``config.cross_batch_weight > 0``."""
        encoded = self.sc_foundation(input_ids, values, attention_mask, None, condition_ids, cu_seqlens, max_seqlen)
        cells = encoded.cell_embedding  # (n_cells, h)
        kl = None
        if self.latent is not None:
            mean, log_var = self.latent(cells).float().clamp(-10, 10).chunk(2, dim=-1)  # (n_cells, d) each
            kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(-1)  # (n_cells,) KL(N(mean, var) || N(0, I))
            # Sampled while training (the reparameterisation trick); the mean otherwise, so embeddings are fixed.
            cells = mean + torch.randn_like(mean) * (0.5 * log_var).exp() if self.training else mean
            cells = cells.to(encoded.cell_embedding.dtype)
            output = ScFoundationExpressionOutput(cell_embedding=mean.to(cells.dtype))
        else:
            output = ScFoundationExpressionOutput(cell_embedding=cells)
        if self.batch_embeddings is not None:
            if batch_ids is None:
                if counts is not None:
                    raise ValueError("this decoder is batch-conditioned: pass batch_ids with the counts")
                return output
            cells = torch.cat([cells, self.batch_embeddings(batch_ids)], dim=-1)  # (n_cells, h + e)
        genes = torch.as_tensor(self.config.decoder_gene_ids, device=input_ids.device)
        output.logits = self.decoder(cells, self.sc_foundation.embeddings.gene_embeddings(genes))  # (n_cells, G)
        if counts is None:
            return output
        output.reconstruction_loss = multinomial_nll(output.logits, counts)
        output.loss = output.reconstruction_loss
        if kl is not None:  # per count, as the reconstruction term: together the negative ELBO per count
            output.kl_loss = (kl / counts.float().sum(-1).clamp(min=1)).mean()
            share = self.kl_share if self.training else 1.0
            output.loss = output.loss + share * self.config.kl_weight * output.kl_loss
        if self.discriminator is not None:
            output.batch_logits = self.discriminator(grad_reverse(output.cell_embedding))  # (n_cells, n_batches)
            output.dab_loss = F.cross_entropy(output.batch_logits.float(), batch_ids.long())
            # Only training minimises the adversarial sum; in eval mode (validation, early stopping) the loss is the
            # reconstruction alone, since a falling or rising discriminator loss says nothing of a better model.
            if self.training:
                output.loss = output.loss + self.config.dab_weight * output.dab_loss
        if self.training and self.config.cross_batch_weight > 0 and cross_batch_targets is not None:
            output.cross_batch_loss = _target_distance(output.cell_embedding, cross_batch_targets)
            output.loss = output.loss + self.config.cross_batch_weight * output.cross_batch_loss
        return output


def _target_distance(embedding: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The squared distance of each cell's embedding from its target, over the cells with one, relative to the
    spread of the batch's embeddings: ``mean_i |e_i - t_i|^2 / mean_j |e_j - mean(e)|^2``.

    Relative, because an absolute distance is smallest when every embedding shrinks towards zero, which the KL term
    also favours: measured on CellBench, an absolute pull (weight 1) shrank the latent's spread from 1.0 to 0.15 per
    dimension and the cell lines merged (NMI 0.89 to 0.16). Shrinking now raises the term.

    Args:
        embedding: (n, d); targets: (n, d), NaN rows where a cell has none.
    Returns:
        scalar; 0 (with a gradient path) when no cell has a target or the batch has a single cell.
    """
    embedding = embedding.float()
    if len(embedding) < 2:
        return embedding.sum() * 0.0
    # No data-dependent branch: the memory plan traces this under fake tensors, which cannot read a value.
    has_target = ~targets.isnan().any(-1, keepdim=True)  # (n, 1)
    aimed = torch.where(has_target, targets.float(), embedding.detach())  # a cell without a target is its own
    spread = ((embedding - embedding.mean(0)) ** 2).sum(-1).mean().clamp(min=1e-8)
    distance = ((embedding - aimed) ** 2).sum(-1).sum() / has_target.sum().clamp(min=1)
    return distance / spread


class ScFoundationForBatchIntegration(ScFoundationForImputation):
    """A cell embedding free of batch effects: the encoder is trained to make its batch information redundant.

    1. The expression decoder of :class:`ScFoundationForImputation`, conditioned on a learned embedding of the
       cell's batch (scVI's idea): the batch embedding explains what is batch-specific in the counts, so the cell
       embedding need not carry it. The encoder itself gets no batch.
    2. With ``config.dab_weight > 0``, an adversarial batch discriminator (scGPT's DAB): an MLP predicts the batch
       from the cell embedding behind a gradient reversal, so the encoder is pushed to remove what it can read.

    The batches are ``config.batch_names``; a pretrained export loads into it with ``from_pretrained(path,
    new_heads=["batch_embeddings", "decoder", "discriminator"], batch_names=[...], decoder_gene_ids=[...])``.
    """

    def __init__(self, config: ScFoundationConfig):
        if config.batch_names is None:
            raise ValueError("batch integration needs config.batch_names, the batches in batch-id order")
        super().__init__(config)


class ScFoundationModalityEmbeddings(nn.Module):
    """A second modality's features as tokens: feature embedding + value embedding + the modality's embedding.

    The modality embedding marks every token of that modality apart from the gene tokens, the way a token-type
    embedding marks a segment; the LayerNorm puts the sum on the scale of the gene tokens' embeddings.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__()
        h = config.hidden_size
        self.feature_embeddings = nn.Embedding(len(config.modality_features), h)
        self.value_embeddings = _mlp(1, h, h)
        self.modality_embedding = nn.Parameter(torch.empty(h))
        self.norm = nn.LayerNorm(h, eps=config.layer_norm_eps)

    def forward(self, feature_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """feature_ids (B, K) long, values (B, K) float -> (B, K, h)."""
        embedding = self.feature_embeddings(feature_ids) + self.value_embeddings(values.unsqueeze(-1))
        return self.norm(embedding + self.modality_embedding)


class ScFoundationForMultimodal(ScFoundationPreTrainedModel):
    """RNA and a second modality (protein or ATAC) in one encoder: predict the second from RNA, or embed both.

    The gene tokens come from the tokenizer as always; the second modality's features enter as extra tokens
    (:class:`ScFoundationModalityEmbeddings`, appended after the gene tokens; see ``extra_embeddings`` of
    :meth:`ScFoundationModel.forward`): every antibody for protein, the open peaks for ATAC. A decoder with one
    query per feature (:class:`ScFoundationFeatureDecoder`, its queries tied to the feature embeddings) predicts the
    second modality from the cell embedding: CLR values by MSE (protein) or open probabilities by binary
    cross-entropy (ATAC).

    While training, each cell's second modality is withheld from the encoder with probability
    ``config.modality_dropout``: the model learns to predict it from RNA alone (what :func:`predict_modality` does)
    and to embed cells from both modalities (the joint embedding, ``encode_modality=True``). In eval mode the
    second modality is an input only when ``encode_modality`` says so.
    A pretrained export loads into it with ``from_pretrained(path, new_heads=["modality_embeddings",
    "modality_decoder"], modality="protein", modality_features=[...])``.
    """

    def __init__(self, config: ScFoundationConfig):
        super().__init__(config)
        if config.modality is None:
            raise ValueError("a multimodal head needs config.modality ('protein' or 'atac') and modality_features")
        self.sc_foundation = ScFoundationModel(config)
        self.modality_embeddings = ScFoundationModalityEmbeddings(config)
        self.modality_decoder = ScFoundationFeatureDecoder(config, config.hidden_size, len(config.modality_features))
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        modality_values: torch.Tensor | None = None,
        encode_modality: bool = False,
        condition_ids: dict[str, torch.Tensor] | None = None,
    ) -> ScFoundationMultimodalOutput:
        """Args as for :meth:`ScFoundationModel.forward` (padded batches only), plus ``modality_values``:
        (B, F) float, the cells' second modality (CLR protein values or 0/1 accessibility), the target and, where
        the cell is given it, an input; ``encode_modality``: in eval mode, give every cell its second modality as
        input (the joint embedding) rather than none (prediction from RNA)."""
        extra, extra_mask = None, None
        if modality_values is not None:
            if self.training:
                given = torch.rand(modality_values.shape[0], device=input_ids.device) >= self.config.modality_dropout
            else:
                given = torch.full((modality_values.shape[0],), encode_modality, device=input_ids.device)
            if given.any():
                extra, extra_mask = self._modality_tokens(modality_values, given)
        elif encode_modality:
            raise ValueError("encode_modality=True needs the cells' modality_values")
        encoded = self.sc_foundation(
            input_ids,
            values,
            attention_mask,
            condition_ids=condition_ids,
            extra_embeddings=extra,
            extra_attention_mask=extra_mask,
        )
        features = self.modality_embeddings.feature_embeddings.weight  # (F, h)
        scores = self.modality_decoder(encoded.cell_embedding, features)  # (B, F)
        atac = self.config.modality == "atac"
        output = ScFoundationMultimodalOutput(
            predictions=scores.sigmoid() if atac else scores, cell_embedding=encoded.cell_embedding
        )
        if modality_values is not None:
            target = modality_values.float()
            if atac:
                output.loss = F.binary_cross_entropy_with_logits(scores.float(), target)
            elif self.config.modality_feature_scale is not None:  # every antibody weighs alike
                scale = torch.tensor(self.config.modality_feature_scale, device=scores.device)
                output.loss = (((scores.float() - target) / scale) ** 2).mean()
            else:
                output.loss = F.mse_loss(scores.float(), target)
        return output

    def _modality_tokens(self, modality_values: torch.Tensor, given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The second modality's tokens of the ``given`` (B,) cells: (B, K, h) embeddings and a (B, K) mask.

        Protein: every antibody. ATAC: the open peaks only (non-zero values), which keeps K to the most open peaks
        of a cell in the batch rather than the whole panel.
        """
        present = given[:, None].expand(modality_values.shape)  # (B, F)
        if self.config.modality == "atac":
            present = present & (modality_values != 0)
        width = max(int(present.sum(-1).max()), 1)
        # A stable sort puts each cell's present features first, in feature order.
        order = torch.sort(present.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :width]
        mask = present.gather(-1, order)  # (B, K)
        values = modality_values.gather(-1, order).to(self.dtype) * mask
        return self.modality_embeddings(order, values), mask


AutoConfig.register(ScFoundationConfig.model_type, ScFoundationConfig, exist_ok=True)
AutoModel.register(ScFoundationConfig, ScFoundationModel, exist_ok=True)
AutoModelForMaskedLM.register(ScFoundationConfig, ScFoundationForMaskedGeneModeling, exist_ok=True)
AutoModelForSequenceClassification.register(ScFoundationConfig, ScFoundationForCellClassification, exist_ok=True)
