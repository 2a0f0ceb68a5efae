"""Configuration of the sc_foundation encoder: every architectural choice, saved as ``config.json``."""

from dataclasses import field, fields
from typing import TYPE_CHECKING, Literal

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

if TYPE_CHECKING:
    from sc_foundation.data.tokenization import GeneTokenizer


@strict
class ScFoundationConfig(PreTrainedConfig):
    r"""Configuration of a gene-token Transformer encoder (scGPT / Geneformer style).

    A transformers v5 config is a strict dataclass: every field below is type-checked when it is set, and the
    ``validate_*`` methods check the fields together when the config is built and again when it is saved. Fields
    left at their default are written to ``config.json`` too (see :meth:`to_diff_dict`).

    Args:
        vocab_size: Size of the gene vocabulary, special tokens included. Must match the tokenizer.
        hidden_size: Width ``h`` of the residual stream and of every embedding.
        num_hidden_layers: Number of Transformer blocks.
        num_attention_heads: Attention heads per block; must divide ``hidden_size``.
        intermediate_size: Width of the hidden layer of each block's MLP.
        hidden_dropout_prob: Dropout on the embeddings and on each residual branch.
        attention_dropout_prob: Dropout on the attention weights. Defaults to 0, as in current encoders
            (ModernBERT); torch's own varlen kernel has no attention dropout.
        layer_norm_eps: Epsilon of every LayerNorm.
        initializer_range: Standard deviation of the normal initialisation of linear and embedding weights.
        norm_placement: ``"pre"``: each block computes x + f(LN(x)) (ours); ``"post"``: LN(x + f(x)), as BERT
            (Geneformer) and ``torch.nn.TransformerEncoderLayer`` (scGPT) do.
        final_norm: A LayerNorm after the last block (pre-norm stacks need one; post-norm stacks have none).
        hidden_act: Activation of the blocks' MLPs, of the continuous value MLP and of the prediction transforms
            of the pretraining heads: ``"gelu"`` (exact, ours and BERT's default) or ``"relu"`` (scGPT, Geneformer).
        embedding_norm: ``"sum"``: one LayerNorm on the sum of the token's embeddings (ours, BERT);
            ``"separate"``: the gene embedding and the value embedding are each normalised before they are added,
            and the sum is not (scGPT's ``encoder.enc_norm`` and value encoder ``norm``).
        bin_embedding: How the ``"binned"`` encoding embeds a bin: ``"table"``, a learned row per bin (ours);
            ``"mlp"``, the bin index as a number through the continuous value MLP (scGPT's released models:
            binned input, ``input_emb_style="continuous"``).
        value_encoding: How a token's expression value enters the model:
            ``"binned"``: ``values`` holds a bin index 0..n_bins-1, embedded by a table;
            ``"continuous"``: ``values`` holds log1p normalised expression, embedded by a small MLP;
            ``"rank"``: genes are ordered by expression and the order is the value, so ``values`` is ignored and
            learned position embeddings are added instead.
        n_bins: Number of expression bins (``"binned"`` only; bin 0 is zero expression and special tokens).
        max_position_embeddings: Longest cell, in tokens, for the learned positions of the ``"rank"`` encoding.
            The other encodings have no positions: their genes are a set.
        pooling: How the cell embedding is read from the last hidden states: ``"cls"`` takes position 0 (the
            tokenizer must put ``cls_token_id`` there), ``"mean"`` averages the real tokens other than CLS (and
            ``eos_token_id``).
        pooling_layer: Which block's output is pooled: -1 the last (after ``final_norm`` where there is one), -2 the
            one before it (Geneformer's convention: its cell embedding is the mean of the second-to-last layer), ...
        normalize_cell_embedding: L2-normalise the cell embedding (scGPT's convention for its ``<cls>`` embedding).
        eos_token_id: Vocabulary id of an end-of-cell token the tokenizer appends (Geneformer V2's ``<eos>``),
            left out of mean pooling; None where there is none.
        condition_vocab_sizes: Condition name (e.g. ``"batch"``) to number of categories. Each condition gets an
            embedding table whose row is added to every token of the cell. Empty by default.
        attention_backend: ``"sdpa"`` runs all attention through ``torch.nn.functional.scaled_dot_product_attention``
            (packed batches use a block-diagonal mask). ``"flash_varlen"`` sends packed batches on CUDA to a
            variable-length kernel (flash-attn if installed, else torch's ``varlen_attn``) and falls back to the
            SDPA path, with a warning, where neither can run. Padded batches always use SDPA.
        mvc_weight: Weight of the masked-value-from-cell term of the masked value objective (scGPT's GEPC/MVC):
            each masked gene's value is predicted from the cell embedding and the gene embedding alone. 0 disables
            it and builds no parameters for it.
        classifier_dropout: Dropout on the cell embedding in front of a classification head
            (:class:`~sc_foundation.models.modeling.ScFoundationForCellClassification`); None takes
            ``hidden_dropout_prob``.
        class_weights: Per-class weights of a classification head's cross-entropy, one per label in ``id2label``
            order (e.g. inverse training-label frequencies for imbalanced classes); None weighs every class alike.
            Kept in the config so that an exported classifier computes the loss it was trained with.
        label_smoothing: The classification head's cross-entropy target smoothing (``torch.nn.functional.
            cross_entropy``'s ``label_smoothing``): the share of each target spread evenly over all classes. It keeps
            a classifier trained on a few hundred cells from driving its training loss to zero. 0 disables it.
        batch_names: The batches of a batch-integration head
            (:class:`~sc_foundation.models.modeling.ScFoundationForBatchIntegration`), in batch-id order; None
            elsewhere.
            Kept in the config so that an export says which batch each id of its batch embedding stands for.
        batch_embedding_size: Width of the learned batch embedding that the integration head's expression decoder
            reads beside the cell embedding.
        dab_weight: Weight of the integration head's adversarial batch discriminator (scGPT's DAB): its
            cross-entropy is added to the loss and its gradient reaches the encoder reversed. 0 disables it and
            builds no parameters for it.
        cross_batch_weight: Weight of the integration head's cross-batch neighbour attraction: the squared distance,
            while training, between each cell's embedding and its target (the mean embedding of its mutual nearest
            neighbours in other batches, given per cell as ``cross_batch_targets``; see
            :mod:`sc_foundation.tasks.cross_batch`), relative to the batch's spread. 0 disables it.
        latent_size: An expression head's variational latent (scVI's, on the cell embedding): the decoder reads a
            sample of ``N(mu, sigma^2)`` whose mean and log-variance are linear maps of the cell embedding, with a
            KL term towards ``N(0, I)``; the cell embedding becomes ``mu`` (``latent_size`` wide). The KL pressure
            drops what the decoder gets elsewhere (the batch), which is how scVI integrates. None: deterministic.
        kl_weight: Weight of that KL term; the loss is then the negative ELBO per count (KL divided by the cell's
            panel counts, like the reconstruction term).
        decoder_gene_ids: Vocabulary ids of the genes whose expression an expression decoder predicts (the panel of
            :class:`~sc_foundation.models.modeling.ScFoundationForImputation` and of the integration head), in the
            order of
            its outputs; None where there is no such decoder. Any vocabulary genes, expressed in a cell or not.
        modality: The second modality of a multimodal head
            (:class:`~sc_foundation.models.modeling.ScFoundationForMultimodal`): ``"protein"`` (CLR-normalised antibody
            counts, predicted by regression) or ``"atac"`` (binary peak accessibility, predicted as probabilities);
            None elsewhere.
        modality_features: The names of that modality's features (antibodies, peaks), in feature-id order.
        modality_dropout: While training a multimodal head, the share of cells whose second modality is withheld
            from the encoder, so that it learns both to predict that modality from RNA alone and to embed both.
        modality_feature_scale: Protein only: each feature's scale (the training cells' standard deviation of its
            CLR values), by which its regression error is divided, so every antibody weighs alike in the loss
            rather than in proportion to its variance (the task is scored per antibody). None: plain MSE.
        masked_weight: Weight of the masked token objective of a pretraining head (masked value or masked gene
            prediction). 0 trains the cell-level objectives below alone (the masked tokens are still hidden).
        reconstruction_weight: Weight of the cell-level count reconstruction of a pretraining head
            (:class:`~sc_foundation.models.modeling.ScFoundationCellObjectives`): the cell's expression over the decoder
            panel (``decoder_gene_ids``, or every vocabulary gene when None), zeros included, decoded from the cell
            embedding with a multinomial likelihood, which is blind to library size (scVI's and scFoundation's
            idea). Needs the continuous encoding, whose values give the expression back. 0 builds nothing.
        reconstruction_decoder: How the reconstruction decodes the panel from the cell embedding: ``"mlp"`` (the
            fine-tuning heads' :class:`~sc_foundation.models.modeling.ScFoundationFeatureDecoder`: an MLP on the cell
            read
            against queries made from the gene embeddings) or ``"linear"`` (one learnt loading vector and bias per
            panel gene, logits = loadings @ cell + bias: with the multinomial likelihood this is GLM-PCA with the
            Transformer as its encoder, so the embedding must hold the panel's main axes of variation).
        contrastive_weight: Weight of the contrastive term: two views of each cell (seeded subsets of its genes,
            ``view_masks`` from the data pipeline) are embedded and InfoNCE pulls a cell's two views together and
            pushes other cells' away. Views keep a random share of the detected genes, so the term also teaches
            the embedding to ignore how many genes were detected. 0 builds nothing.
        contrastive_temperature: Temperature of the InfoNCE softmax over cosine similarities.
        corpus_batch_names: The technical batches of a pretraining corpus (the store's source files, or their
            ``batch_key`` values), in batch-id order, for the batch-aware pretraining terms below; filled at run time
            from the store when one of them is on, None otherwise. Kept apart from ``batch_names`` so that a
            pretrained export never makes a fine-tuning head batch-conditioned.
        reconstruction_batch_conditioned: The reconstruction decoder of a pretraining head reads a learned embedding
            of the cell's corpus batch (``batch_embedding_size`` wide) beside the cell embedding (scVI's idea): what
            is batch-specific in the counts is explained by the batch, so the cell embedding need not carry it. The
            encoder never sees the batch, so the exported embedding needs none.
        adversarial_batch_weight: Weight of an adversarial discriminator that predicts the corpus batch from the
            pretraining head's cell embedding behind a gradient reversal (scGPT's DAB on pretraining): the encoder is
            pushed to remove what the discriminator can read. 0 builds nothing.
        ecs_weight: Weight of scGPT's elastic cell similarity: cosine similarities between the batch's cells are
            pushed away from ``ecs_threshold``, which sharpens clusters.
        ecs_threshold: The similarity that ECS pushes pairs away from.
        pad_token_id: Vocabulary id of padding.
        cls_token_id: Vocabulary id of the CLS token.
        mask_token_id: Vocabulary id that replaces a masked gene (``"rank"`` encoding).
    """

    model_type = "sc_foundation"

    vocab_size: int = 60_000
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_dropout_prob: float | int = 0.1
    attention_dropout_prob: float | int = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    norm_placement: Literal["pre", "post"] = "pre"
    final_norm: bool = True
    hidden_act: Literal["gelu", "relu"] = "gelu"
    embedding_norm: Literal["sum", "separate"] = "sum"
    bin_embedding: Literal["table", "mlp"] = "table"
    value_encoding: Literal["binned", "continuous", "rank"] = "binned"
    n_bins: int = 51
    max_position_embeddings: int = 2048
    pooling: Literal["cls", "mean"] = "cls"
    pooling_layer: int = -1
    normalize_cell_embedding: bool = False
    eos_token_id: int | None = None
    condition_vocab_sizes: dict[str, int] = field(default_factory=dict)
    attention_backend: Literal["sdpa", "flash_varlen"] = "sdpa"
    mvc_weight: float | int = 0.0
    classifier_dropout: float | int | None = None
    class_weights: list[float] | None = None
    label_smoothing: float | int = 0.0
    batch_names: list[str] | None = None
    batch_embedding_size: int = 16
    dab_weight: float | int = 0.0
    cross_batch_weight: float | int = 0.0
    latent_size: int | None = None
    kl_weight: float | int = 1.0
    decoder_gene_ids: list[int] | None = None
    modality: Literal["protein", "atac"] | None = None
    modality_features: list[str] | None = None
    modality_dropout: float | int = 0.5
    modality_feature_scale: list[float] | None = None
    masked_weight: float | int = 1.0
    reconstruction_weight: float | int = 0.0
    reconstruction_decoder: Literal["mlp", "linear"] = "mlp"
    contrastive_weight: float | int = 0.0
    contrastive_temperature: float | int = 0.1
    ecs_weight: float | int = 0.0
    ecs_threshold: float | int = 0.6
    corpus_batch_names: list[str] | None = None
    reconstruction_batch_conditioned: bool = False
    adversarial_batch_weight: float | int = 0.0
    pad_token_id: int = 0
    cls_token_id: int = 1
    mask_token_id: int = 2

    @classmethod
    def from_tokenizer(cls, tokenizer: "GeneTokenizer", **architecture) -> "ScFoundationConfig":
        """A config whose vocabulary size, special token ids, value encoding, bins and positions match
        ``tokenizer``; ``architecture`` (hidden_size, num_hidden_layers, ...) gives the rest and may override any
        field."""
        from sc_foundation.data.genes import EOS_TOKEN

        vocab, settings = tokenizer.vocab, tokenizer.config
        matched = {
            "vocab_size": len(vocab),
            "value_encoding": settings.encoding,
            "n_bins": settings.n_bins,
            "max_position_embeddings": settings.context_length,
            "pad_token_id": vocab.pad_id,
            "cls_token_id": vocab.cls_id,
            "mask_token_id": vocab.mask_id,
            "eos_token_id": vocab[EOS_TOKEN] if settings.add_eos else None,
        }
        return cls(**(matched | architecture))

    def validate_sc_foundation(self):
        """Check the fields together (called by ``@strict`` after ``__init__`` and before saving)."""
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_dropout_prob"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not -self.num_hidden_layers <= self.pooling_layer <= -1:
            raise ValueError(
                f"pooling_layer counts blocks from the end, -1 to -{self.num_hidden_layers}; got {self.pooling_layer}"
            )
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("layer_norm_eps and initializer_range must be positive")
        if self.value_encoding == "binned" and self.n_bins < 3:
            raise ValueError(f"the binned encoding needs n_bins >= 3 (bin 0 and two value bins), got {self.n_bins}")
        if self.mvc_weight < 0:
            raise ValueError(f"mvc_weight must be >= 0, got {self.mvc_weight}")
        if self.mvc_weight > 0 and self.value_encoding == "rank":
            raise ValueError("mvc_weight > 0 predicts expression values; the rank encoding has none")
        if self.classifier_dropout is not None and not 0 <= self.classifier_dropout < 1:
            raise ValueError(f"classifier_dropout must be in [0, 1), got {self.classifier_dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.class_weights is not None:
            if len(self.class_weights) != self.num_labels:
                raise ValueError(f"class_weights has {len(self.class_weights)} entries for {self.num_labels} labels")
            if min(self.class_weights) <= 0:
                raise ValueError(f"class_weights must be positive, got {self.class_weights}")
        if self.batch_names is not None and len(set(self.batch_names)) < 2:
            raise ValueError(f"batch_names needs two or more distinct batches, got {self.batch_names}")
        if self.batch_embedding_size < 1:
            raise ValueError(f"batch_embedding_size must be positive, got {self.batch_embedding_size}")
        if self.dab_weight < 0:
            raise ValueError(f"dab_weight must be >= 0, got {self.dab_weight}")
        if self.latent_size is not None and self.latent_size < 1:
            raise ValueError(f"latent_size must be positive or None, got {self.latent_size}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        loss_weights = (
            "masked_weight",
            "reconstruction_weight",
            "contrastive_weight",
            "ecs_weight",
            "cross_batch_weight",
        )
        for name in loss_weights:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.reconstruction_weight > 0 and self.value_encoding != "continuous":
            raise ValueError(
                "reconstruction_weight > 0 decodes the cell's expression, which only the continuous encoding keeps: "
                f"set data.tokenizer.encoding=continuous (got {self.value_encoding!r})"
            )
        if self.adversarial_batch_weight < 0:
            raise ValueError(f"adversarial_batch_weight must be >= 0, got {self.adversarial_batch_weight}")
        if self.reconstruction_batch_conditioned and self.reconstruction_weight <= 0:
            raise ValueError(
                "reconstruction_batch_conditioned conditions the reconstruction: set reconstruction_weight"
            )
        batch_aware = self.reconstruction_batch_conditioned or self.adversarial_batch_weight > 0
        if batch_aware and (self.corpus_batch_names is None or len(set(self.corpus_batch_names)) < 2):
            raise ValueError(
                "the batch-aware pretraining terms (reconstruction_batch_conditioned, adversarial_batch_weight) need "
                f"corpus_batch_names, two or more distinct batches; got {self.corpus_batch_names}. A corpus of one "
                "batch has nothing to explain away: turn them off, or pretrain on several inputs."
            )
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be positive, got {self.contrastive_temperature}")
        if not -1 <= self.ecs_threshold <= 1:
            raise ValueError(f"ecs_threshold is a cosine similarity in [-1, 1], got {self.ecs_threshold}")
        special = {name: getattr(self, name) for name in ("pad_token_id", "cls_token_id", "mask_token_id")}
        if self.eos_token_id is not None:
            special["eos_token_id"] = self.eos_token_id
        if self.decoder_gene_ids is not None:
            ids = self.decoder_gene_ids
            if not ids or len(set(ids)) != len(ids):
                raise ValueError("decoder_gene_ids must be a non-empty list of distinct vocabulary ids")
            outside = [i for i in ids if not 0 <= i < self.vocab_size or i in special.values()]
            if outside:
                raise ValueError(f"decoder_gene_ids holds ids that are not vocabulary genes: {outside[:10]}")
        if self.modality is not None and (
            not self.modality_features or len(set(self.modality_features)) != len(self.modality_features)
        ):
            raise ValueError(f"modality={self.modality!r} needs modality_features, a list of distinct feature names")
        if not 0 <= self.modality_dropout < 1:
            raise ValueError(f"modality_dropout must be in [0, 1), got {self.modality_dropout}")
        scale = self.modality_feature_scale
        if scale is not None and (
            self.modality != "protein"
            or len(scale) != len(self.modality_features)
            or not all(value > 0 for value in scale)
        ):
            raise ValueError(
                "modality_feature_scale needs modality='protein' and one positive scale per modality feature, got "
                f"{None if scale is None else len(scale)} scales for {len(self.modality_features or [])} features"
            )
        for name, token_id in special.items():
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{name}={token_id} is outside the vocabulary [0, {self.vocab_size})")
        if len(set(special.values())) != len(special):
            raise ValueError(f"special token ids must be distinct, got {special}")
        for name, size in self.condition_vocab_sizes.items():
            # The name becomes a module name: a dot would split it into a submodule path.
            if not name.isidentifier():
                raise ValueError(f"condition name {name!r} must be a Python identifier")
            if size < 1:
                raise ValueError(f"condition {name!r} needs at least one category, got {size}")

    def to_diff_dict(self) -> dict:
        """Serialise every field of this class, also those left at their default.

        transformers writes only the fields that differ from the defaults; then a checkpoint would silently change
        meaning if one of our defaults (a token id, ``n_bins``) changed in a later version of this package. The
        generic transformers fields keep the usual diff, which leaves their boilerplate out of ``config.json``.
        """
        full = self.to_dict()
        own = {f.name for f in fields(ScFoundationConfig)} - {f.name for f in fields(PreTrainedConfig)}
        return super().to_diff_dict() | {name: full[name] for name in sorted(own)}
