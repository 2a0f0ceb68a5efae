"""The cell-level pretraining objectives on hand-made batches: each loss's formula, the views, and the head."""

import math

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from sc_foundation.data.datamodule import MaskingCollator
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import (
    ScFoundationForMaskedValueModeling,
    elastic_cell_similarity,
    info_nce,
    keep_tokens,
)

VOCAB = 40
SPECIAL = [0, 1, 2]  # pad, cls, mask


def config(**objectives) -> ScFoundationConfig:
    return ScFoundationConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        value_encoding="continuous",
        pooling="mean",
        **objectives,
    )


def padded_batch(n_cells=6, width=10, seed=0) -> dict[str, np.ndarray]:
    """Cells with distinct genes and log1p values; cell i has width - i % 3 real tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n_cells, width), dtype=np.int64)
    values = np.zeros((n_cells, width), dtype=np.float32)
    real = np.zeros((n_cells, width), dtype=bool)
    for i in range(n_cells):
        n = width - i % 3
        ids[i, :n] = rng.choice(np.arange(3, VOCAB), n, replace=False)
        values[i, :n] = rng.uniform(0.5, 3.0, n)
        real[i, :n] = True
    return {"input_ids": ids, "values": values, "attention_mask": real, "cell_index": np.arange(n_cells)}


def test_info_nce_matches_its_formula():
    first = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    second = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    t = 0.5
    # cosines: row 0 vs (1, 0), (1/sqrt2, 1/sqrt2); row 1 vs (0, 1), (1/sqrt2, 1/sqrt2)
    s = np.array([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]]) / t
    rows = -np.mean([s[i, i] - np.log(np.exp(s[i]).sum()) for i in range(2)])
    cols = -np.mean([s[i, i] - np.log(np.exp(s[:, i]).sum()) for i in range(2)])
    assert info_nce(first, second, t).item() == pytest.approx(0.5 * (rows + cols), rel=1e-5)


def test_info_nce_is_lowest_when_views_agree():
    cells = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    noisy = cells + 0.05 * torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    shuffled = noisy[torch.randperm(8, generator=torch.Generator().manual_seed(2))]
    assert info_nce(cells, noisy, 0.1) < 0.1 < info_nce(cells, shuffled, 0.1)


def test_elastic_cell_similarity_matches_its_formula():
    cells = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    # off-diagonal cosines, negatives clipped to 0: (0,1)=(1,0)=1/sqrt2, (0,2)=(2,0)=0, (1,2)=(2,1)=0
    pairs = np.array([1 / math.sqrt(2)] * 2 + [0.0] * 4)
    expected = np.mean(1 - (pairs - 0.6) ** 2)
    assert elastic_cell_similarity(cells, 0.6).item() == pytest.approx(expected, rel=1e-6)


def test_keep_tokens_closes_the_gaps_in_order():
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    keep = torch.tensor([[True, False, True, False], [False, True, False, False]])
    kept, new_ids, new_values = keep_tokens(keep, 0, ids, values)
    assert new_ids.tolist() == [[5, 7], [10, 0]]
    assert new_values.tolist() == [[1.0, 3.0], [6.0, 0.0]]
    assert kept.tolist() == [[True, True], [True, False]]


def test_reconstruction_target_is_the_whole_cells_expression_over_the_panel():
    model = ScFoundationForMaskedValueModeling(config(reconstruction_weight=1.0, decoder_gene_ids=[5, 7, 9]))
    objectives = model.cell_objectives
    ids = torch.tensor([[7, 5, 30, 0]])
    log_values = torch.tensor([[math.log1p(3.0), math.log1p(1.0), 2.0, 9.0]])
    real = torch.tensor([[True, True, True, False]])
    expression = objectives.panel_expression(ids, log_values, real)
    # panel order 5, 7, 9: gene 30 is off the panel, padding ignored, gene 9 not expressed
    assert expression[0].tolist() == pytest.approx([1.0, 3.0, 0.0])


def test_reconstruction_loss_is_the_multinomial_likelihood_of_the_panel():
    torch.manual_seed(0)
    model = ScFoundationForMaskedValueModeling(config(reconstruction_weight=1.0, masked_weight=0.0)).eval()
    batch = MaskingCollator(0.15, "value", 2, SPECIAL, VOCAB, seed=0)(padded_batch(), epoch=0)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items() if k != "cell_index"}
    output = model(**tensors)
    # by hand: decode the cell embedding, log-softmax over the panel, weigh by each gene's expression share
    panel = model.cell_objectives.panel_ids
    gene_embeddings = model.sc_foundation.embeddings.gene_embeddings
    log_shares = model.cell_objectives.decode(output.cell_embedding, gene_embeddings).log_softmax(-1)
    full = torch.where(tensors["mask"], tensors["labels"], tensors["values"])
    expected = []
    for i in range(len(full)):
        shares = torch.zeros(len(panel))
        for gene, value, real in zip(tensors["input_ids"][i], full[i], tensors["attention_mask"][i], strict=True):
            if real:
                shares[int(gene) - 3] += math.expm1(float(value))
        expected.append(-(shares * log_shares[i]).sum() / shares.sum())
    assert output.reconstruction_loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    assert output.loss.item() == pytest.approx(output.reconstruction_loss.item(), rel=1e-6)  # masked_weight=0


def test_views_are_seeded_keep_special_tokens_and_at_least_one_gene():
    batch = padded_batch(n_cells=32, width=20)
    batch["input_ids"][:, 0] = 1  # a CLS first
    collator = MaskingCollator(0.15, "value", 2, SPECIAL, VOCAB, seed=3, view_keep=(0.2, 0.8))
    views = collator(batch, epoch=1)["view_masks"]
    assert views.shape == (2, 32, 20)
    assert np.array_equal(views, collator(batch, epoch=1)["view_masks"])  # same seed, epoch, cells: same views
    assert not np.array_equal(views, collator(batch, epoch=2)["view_masks"])
    assert views[:, :, 0].all()  # CLS always kept
    genes = batch["attention_mask"] & (batch["input_ids"] > 2)
    kept = (views & genes).sum(-1)  # (2, B)
    assert (kept >= 1).all()
    share = kept / genes.sum(-1)
    assert 0.35 < share.mean() < 0.65  # keep probabilities uniform in [0.2, 0.8]: 0.5 on average
    assert share.std() > 0.1  # how many genes a view shows differs from cell to cell and view to view


def test_the_head_with_two_views_trains_every_term():
    torch.manual_seed(0)
    cfg = config(reconstruction_weight=1.0, contrastive_weight=1.0, ecs_weight=0.5, mvc_weight=1.0)
    model = ScFoundationForMaskedValueModeling(cfg)
    collator = MaskingCollator(0.3, "value", 2, SPECIAL, VOCAB, seed=0, view_keep=(0.4, 0.8))
    tensors = {k: torch.from_numpy(v) for k, v in collator(padded_batch(), 0).items() if k != "cell_index"}
    output = model(**tensors)
    terms = ("masked_loss", "mvc_loss", "reconstruction_loss", "contrastive_loss", "ecs_loss")
    assert all(torch.isfinite(getattr(output, name)) for name in terms)
    expected = output.masked_loss + output.mvc_loss + output.reconstruction_loss + output.contrastive_loss
    assert output.loss.item() == pytest.approx((expected + 0.5 * output.ecs_loss).item(), rel=1e-5)
    output.loss.backward()
    assert model.cell_objectives.projection.fc_in.weight.grad.abs().sum() > 0
    assert model.cell_objectives.decoder.bias.grad.abs().sum() > 0


def test_a_view_sees_only_its_tokens():
    """The first view's embedding is the embedding of the cell cut down to that view's tokens."""
    torch.manual_seed(0)
    model = ScFoundationForMaskedValueModeling(config(contrastive_weight=1.0)).eval()
    collator = MaskingCollator(0.2, "value", 2, SPECIAL, VOCAB, seed=0, view_keep=(0.5, 0.5))
    batch = collator(padded_batch(), 0)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items() if k != "cell_index"}
    output = model(**tensors)
    i = 1
    keep = torch.from_numpy(batch["attention_mask"][i] & batch["view_masks"][0, i])
    alone = model.sc_foundation(
        tensors["input_ids"][i][keep][None], tensors["values"][i][keep][None], mask=tensors["mask"][i][keep][None]
    ).cell_embedding
    torch.testing.assert_close(output.cell_embedding[i], alone[0], atol=1e-5, rtol=1e-5)


def test_refusals():
    with pytest.raises(StrictDataclassError, match="continuous"):
        ScFoundationConfig(vocab_size=VOCAB, value_encoding="binned", reconstruction_weight=1.0)
    with pytest.raises(StrictDataclassError, match="contrastive_weight must be >= 0"):
        config(contrastive_weight=-1.0)
    model = ScFoundationForMaskedValueModeling(config(contrastive_weight=1.0))
    batch = MaskingCollator(0.2, "value", 2, SPECIAL, VOCAB, seed=0)(padded_batch(), 0)
    with pytest.raises(ValueError, match="two views"):
        model(**{k: torch.from_numpy(v) for k, v in batch.items() if k != "cell_index"})
    with pytest.raises(ValueError, match="view_keep"):
        MaskingCollator(0.2, "value", 2, SPECIAL, VOCAB, view_keep=(0.0, 0.5))


def batched_tensors(n_cells=6, seed=0) -> dict[str, torch.Tensor]:
    """A masked batch of hand-made cells with corpus batch ids 0, 1, 0, 1, ..."""
    batch = MaskingCollator(0.3, "value", 2, SPECIAL, VOCAB, seed=seed)(padded_batch(n_cells, seed=seed), 0)
    tensors = {k: torch.from_numpy(v) for k, v in batch.items() if k != "cell_index"}
    tensors["batch_ids"] = torch.arange(n_cells) % 2
    return tensors


def test_the_batch_conditioned_decoder_reads_the_batch_and_the_encoder_does_not():
    torch.manual_seed(0)
    cfg = config(reconstruction_weight=1.0, reconstruction_batch_conditioned=True, corpus_batch_names=["a", "b"])
    model = ScFoundationForMaskedValueModeling(cfg).eval()
    with torch.no_grad():  # weights of a trained decoder's scale (at initialisation the batch's share is ~1e-7)
        for param in model.cell_objectives.parameters():
            param.normal_(0.0, 0.5)
    tensors = batched_tensors()
    output = model(**tensors)
    swapped = model(**{**tensors, "batch_ids": 1 - tensors["batch_ids"]})
    # Another batch changes the reconstruction (the decoder reads it) but not the cell embedding (the encoder does not).
    assert abs(output.reconstruction_loss.item() - swapped.reconstruction_loss.item()) > 1e-6
    torch.testing.assert_close(output.cell_embedding, swapped.cell_embedding)
    output.loss.backward()
    assert model.cell_objectives.batch_embeddings.weight.grad.abs().sum() > 0
    # Inference (no labels) needs no batch.
    unlabelled = {k: v for k, v in tensors.items() if k in ("input_ids", "values", "attention_mask", "mask")}
    torch.testing.assert_close(model(**unlabelled).cell_embedding, output.cell_embedding)


def test_the_adversary_learns_to_read_the_batch_and_counts_in_training_only():
    """The discriminator's own step lowers its cross-entropy on the same embeddings; the term is in the training
    loss and left out of the loss in eval mode (validation)."""
    torch.manual_seed(0)
    cfg = config(adversarial_batch_weight=1.0, masked_weight=0.0, corpus_batch_names=["a", "b"])
    model = ScFoundationForMaskedValueModeling(cfg).train()
    tensors = batched_tensors()
    output = model(**tensors)
    assert output.loss.item() == pytest.approx(output.adversarial_batch_loss.item(), rel=1e-5)
    discriminator = torch.optim.SGD(model.cell_objectives.discriminator.parameters(), lr=0.5)
    output.loss.backward()
    discriminator.step()
    assert model(**tensors).adversarial_batch_loss.item() < output.adversarial_batch_loss.item()
    model.eval()
    assert model(**tensors).loss.item() == pytest.approx(0.0, abs=1e-6)


def test_the_encoder_alone_learns_to_hide_the_batch_from_a_fixed_adversary():
    """The encoder's update through the reversed gradient raises a frozen discriminator's cross-entropy."""
    torch.manual_seed(0)
    cfg = config(adversarial_batch_weight=1.0, masked_weight=0.0, corpus_batch_names=["a", "b"])
    model = ScFoundationForMaskedValueModeling(cfg).train()
    tensors = batched_tensors()
    discriminator = model.cell_objectives.discriminator
    before = model(**tensors).adversarial_batch_loss.item()
    encoder = torch.optim.SGD(model.sc_foundation.parameters(), lr=0.5)
    for _ in range(5):
        encoder.zero_grad()
        model(**tensors).loss.backward()
        encoder.step()  # the discriminator stays fixed
    assert discriminator.fc_in.weight.grad is not None
    assert model(**tensors).adversarial_batch_loss.item() > before


def test_batch_aware_terms_refuse_what_they_cannot_use():
    with pytest.raises(StrictDataclassError, match="corpus_batch_names"):
        config(adversarial_batch_weight=1.0)
    with pytest.raises(StrictDataclassError, match="corpus_batch_names"):
        config(reconstruction_weight=1.0, reconstruction_batch_conditioned=True, corpus_batch_names=["a"])
    with pytest.raises(StrictDataclassError, match="reconstruction_weight"):
        config(reconstruction_batch_conditioned=True, corpus_batch_names=["a", "b"])
    model = ScFoundationForMaskedValueModeling(config(adversarial_batch_weight=1.0, corpus_batch_names=["a", "b"]))
    tensors = batched_tensors()
    del tensors["batch_ids"]
    with pytest.raises(ValueError, match="batch_ids"):
        model(**tensors)
