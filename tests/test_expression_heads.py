"""The expression decoder (imputation, integration) and the multimodal head, on hand-made batches."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError

from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import (
    ScFoundationForBatchIntegration,
    ScFoundationForImputation,
    ScFoundationForMultimodal,
    multinomial_nll,
)

INPUT_IDS = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
VALUES = torch.tensor([[0.0, 3, 1, 2], [0, 4, 1, 0]])
MASK = INPUT_IDS != 0


def tiny(**fields) -> ScFoundationConfig:
    config = ScFoundationConfig(
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        n_bins=5,
        hidden_dropout_prob=0.0,  # train mode then differs from eval mode only where a head makes it
    )
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def test_multinomial_nll_is_the_per_count_negative_log_likelihood():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    counts = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    log_p = logits[0].log_softmax(-1)
    expected = -(log_p[0] + 3 * log_p[2]) / 4 / 2  # the empty second cell adds 0 to the mean over 2 cells
    torch.testing.assert_close(multinomial_nll(logits, counts), expected)


def test_imputation_decodes_every_panel_gene_and_learns_a_profile():
    torch.manual_seed(0)
    model = ScFoundationForImputation(tiny(decoder_gene_ids=[5, 6, 7, 8, 9, 10, 11]))
    assert model.batch_embeddings is None and model.discriminator is None
    counts = torch.tensor([[5.0, 1, 3, 0, 0, 0, 1], [0, 0, 0, 6, 2, 0, 0]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        output = model(INPUT_IDS, VALUES, MASK, counts=counts)
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
        losses.append(output.loss.item())
    assert output.logits.shape == (2, 7)
    assert losses[-1] < 0.8 * losses[0]
    # Each cell's decoded shares follow its own counts: gene 5 for the first cell, gene 8 for the second.
    shares = output.logits.softmax(-1)
    assert shares[0, 0] > shares[1, 0] and shares[1, 3] > shares[0, 3]
    model.eval()
    assert model(INPUT_IDS, VALUES, MASK).loss is None


def test_variational_latent_is_scvis_elbo_per_count():
    """With latent_size, the embedding is the latent mean (fixed in eval mode), training decodes a sample, and the
    loss adds kl_weight times KL(N(mu, sigma^2) || N(0, I)) divided by each cell's panel counts."""
    torch.manual_seed(0)
    config = tiny(decoder_gene_ids=[5, 6, 7, 8], batch_names=["a", "b"], latent_size=3, kl_weight=0.5)
    model = ScFoundationForBatchIntegration(config).eval()
    counts = torch.tensor([[5.0, 1, 3, 0], [0, 0, 2, 6]])
    batch_ids = torch.tensor([0, 1])
    output = model(INPUT_IDS, VALUES, MASK, counts=counts, batch_ids=batch_ids)
    assert output.cell_embedding.shape == (2, 3)
    encoded = model.sc_foundation(INPUT_IDS, VALUES, MASK).cell_embedding
    mean, log_var = model.latent(encoded).chunk(2, dim=-1)
    torch.testing.assert_close(output.cell_embedding, mean)
    kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum(-1)
    torch.testing.assert_close(output.kl_loss, (kl / counts.sum(-1)).mean())
    torch.testing.assert_close(output.loss, output.reconstruction_loss + 0.5 * output.kl_loss)
    again = model(INPUT_IDS, VALUES, MASK, counts=counts, batch_ids=batch_ids)
    torch.testing.assert_close(again.logits, output.logits)  # the mean, not a sample
    model.train()
    sampled = [model(INPUT_IDS, VALUES, MASK, counts=counts, batch_ids=batch_ids).logits for _ in range(2)]
    assert not torch.equal(sampled[0], sampled[1])
    assert torch.equal(model(INPUT_IDS, VALUES, MASK).cell_embedding, model(INPUT_IDS, VALUES, MASK).cell_embedding)
    with pytest.raises(StrictDataclassError, match="latent_size"):
        ScFoundationConfig(vocab_size=20, latent_size=0)


def test_training_applies_the_warm_up_share_of_the_kl_weight_and_evaluation_all_of_it():
    """``kl_share`` (set by the KL warm-up) scales the KL term while training only: validation losses of a warm-up's
    epochs price the latent alike."""
    torch.manual_seed(0)
    config = tiny(decoder_gene_ids=[5, 6, 7, 8], batch_names=["a", "b"], latent_size=3, kl_weight=0.5)
    model = ScFoundationForBatchIntegration(config)
    counts = torch.tensor([[5.0, 1, 3, 0], [0, 0, 2, 6]])
    batch_ids = torch.tensor([0, 1])
    assert model.kl_share == 1.0  # without a warm-up, the whole weight from the first step
    model.kl_share = 0.25
    trained = model(INPUT_IDS, VALUES, MASK, counts=counts, batch_ids=batch_ids)
    assert trained.kl_loss > 0
    torch.testing.assert_close(trained.loss, trained.reconstruction_loss + 0.25 * 0.5 * trained.kl_loss)
    model.kl_share = 0.0
    unpriced = model(INPUT_IDS, VALUES, MASK, counts=counts, batch_ids=batch_ids)
    torch.testing.assert_close(unpriced.loss, unpriced.reconstruction_loss)
    model.eval()
    evaluated = model(INPUT_IDS, VALUES, MASK, counts=counts, batch_ids=batch_ids)
    torch.testing.assert_close(evaluated.loss, evaluated.reconstruction_loss + 0.5 * evaluated.kl_loss)


def test_decoder_genes_must_be_vocabulary_genes():
    with pytest.raises(StrictDataclassError, match="not vocabulary genes: \\[1\\]"):
        ScFoundationConfig(vocab_size=20, decoder_gene_ids=[1, 5])  # 1 is <cls>
    with pytest.raises(ValueError, match="decoder_gene_ids"):
        ScFoundationForImputation(tiny())


@pytest.mark.parametrize("kind", ["protein", "atac"])
def test_multimodal_predicts_from_rna_and_embeds_both(kind):
    torch.manual_seed(0)
    model = ScFoundationForMultimodal(tiny(modality=kind, modality_features=["f0", "f1", "f2"], modality_dropout=0.5))
    target = (
        torch.tensor([[1.0, 0, 1], [0, 1, 0]]) if kind == "atac" else torch.tensor([[1.5, -0.5, -1], [-1, 2, -1.0]])
    )
    model.eval()
    rna_only = model(INPUT_IDS, VALUES, MASK, modality_values=target)
    joint = model(INPUT_IDS, VALUES, MASK, modality_values=target, encode_modality=True)
    assert rna_only.predictions.shape == (2, 3)
    expected = F.binary_cross_entropy_with_logits if kind == "atac" else F.mse_loss
    scores = torch.logit(rna_only.predictions) if kind == "atac" else rna_only.predictions
    torch.testing.assert_close(rna_only.loss, expected(scores, target), rtol=1e-4, atol=1e-5)
    # RNA-only predictions do not see the target; the joint embedding does read it.
    other = model(INPUT_IDS, VALUES, MASK, modality_values=torch.zeros_like(target))
    torch.testing.assert_close(other.cell_embedding, rna_only.cell_embedding)
    assert not torch.allclose(joint.cell_embedding, rna_only.cell_embedding)
    # A cell's joint embedding does not depend on the other cells of its batch (their modality tokens pad to K).
    alone = model(INPUT_IDS[1:], VALUES[1:], MASK[1:], modality_values=target[1:], encode_modality=True)
    torch.testing.assert_close(alone.cell_embedding, joint.cell_embedding[1:], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs the cells' modality_values"):
        model(INPUT_IDS, VALUES, MASK, encode_modality=True)


def test_multimodal_training_withholds_the_modality_from_some_cells():
    torch.manual_seed(0)
    model = ScFoundationForMultimodal(tiny(modality="protein", modality_features=["a", "b"], modality_dropout=0.5))
    target = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    model.eval()
    rna_only = model(INPUT_IDS, VALUES, MASK, modality_values=target).cell_embedding
    joint = model(INPUT_IDS, VALUES, MASK, modality_values=target, encode_modality=True).cell_embedding
    model.train()  # no dropout in this config: only the modality dropout differs between draws
    seen = set()
    for _ in range(20):
        embedding = model(INPUT_IDS, VALUES, MASK, modality_values=target).cell_embedding.detach()
        for cell in range(2):
            if torch.allclose(embedding[cell], rna_only[cell], atol=1e-5):
                seen.add("withheld")
            elif torch.allclose(embedding[cell], joint[cell], atol=1e-5):
                seen.add("given")
    assert seen == {"withheld", "given"}
    assert np.isfinite(float(model(INPUT_IDS, VALUES, MASK, modality_values=target).loss))
