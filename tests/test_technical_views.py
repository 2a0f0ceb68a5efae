"""Technical views: each contrastive view of a cell read as another technical batch would measure it (thinner, other
per-gene capture), on hand-made cells whose counts are known."""

import numpy as np
import pytest
import torch

from sc_foundation.data.datamodule import CorpusDataModule, MaskingCollator
from sc_foundation.data.store import build_store
from sc_foundation.data.technical_views import TechnicalViews
from sc_foundation.data.tokenization import TokenizerConfig
from sc_foundation.models.modeling import ScFoundationForMaskedValueModeling
from tests.test_cell_objectives import SPECIAL, VOCAB, config

TARGET = 1e4


def counted_batch(n_cells=40, width=30, seed=0):
    """A padded batch of cells with integer counts: (batch with log1p-per-10k values, counts (B, L), libraries (B,)).
    Each cell has counts outside its tokens too (its library exceeds their sum); cell i has width - i % 4 tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((n_cells, width), dtype=np.int64)
    counts = np.zeros((n_cells, width))
    real = np.zeros((n_cells, width), dtype=bool)
    for i in range(n_cells):
        n = width - i % 4
        ids[i, :n] = rng.choice(np.arange(3, VOCAB), n, replace=False)
        counts[i, :n] = rng.integers(1, 40, n)
        real[i, :n] = True
    library = counts.sum(1) + rng.integers(50, 500, n_cells)
    values = np.where(real, np.log1p(counts * TARGET / library[:, None]), 0).astype(np.float32)
    batch = {"input_ids": ids, "values": values, "attention_mask": real, "cell_index": np.arange(n_cells)}
    return batch, counts, library


def collate(technical, batch, epoch=0, view_keep=(1.0, 1.0)):
    collator = MaskingCollator(0.15, "value", 2, SPECIAL, VOCAB, seed=0, view_keep=view_keep, technical=technical)
    return collator(batch, epoch)


def view_counts(out):
    """Counts behind each view's values, up to each cell's library: expm1(value) / 1e4 is count / library."""
    return np.expm1(out["view_values"].astype(np.float64)) / TARGET


def log_factors(out, view, counts, library):
    """(B, L) log of each gene's share in the view over its share in the cell; NaN or -inf where it has none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log(view_counts(out)[view] / (counts / library[:, None]))


def test_thinning_keeps_that_share_of_the_molecules_and_drops_the_genes_it_empties():
    batch, counts, library = counted_batch(n_cells=200)
    technical = TechnicalViews(library, TARGET, depth=(0.25, 0.25))
    out = collate(technical, batch)
    shares = view_counts(out)  # (2, B, L): each gene's share of its thinned cell
    genes, mask = batch["attention_mask"], out["mask"]
    for view in (0, 1):
        shown = out["view_masks"][view] & genes & ~mask
        # A shown gene has molecules left, a gene thinned to zero left the view, a masked gene stays (hidden).
        assert (out["view_values"][view][shown] > 0).all()
        assert (out["view_masks"][view] | ~mask | ~genes).all()
        assert not (out["view_masks"][view] & genes & ~mask & (out["view_values"][view] == 0)).any()
        # The shares of the shown genes, against the unthinned ones: near 1 on average (thinning is unbiased) but
        # not equal (binomial noise), and fewer genes are shown than the cell has.
        original = counts / library[:, None]
        ratio = shares[view][shown] / original[shown]
        assert 0.9 < np.median(ratio) < 1.1
        assert ratio.std() > 0.1
        assert shown.sum() < (genes & ~mask).sum() * 0.95
    # The values are what the tokenizer makes of integer counts of a cell of a quarter of the molecules: shares times
    # a library near 0.25 x the cell's are integers.
    thinned_library = 0.25 * library
    implied = shares[0] * thinned_library[:, None]
    shown = out["view_masks"][0] & genes & ~mask
    assert np.median(np.abs(implied[shown] - np.rint(implied[shown]))) < 0.25


def test_each_view_is_a_synthetic_batch_one_capture_factor_per_gene_for_all_its_cells():
    batch, counts, library = counted_batch(n_cells=60, width=30)
    out = collate(TechnicalViews(library, TARGET, gene_scale=0.5), batch)
    genes = batch["attention_mask"] & ~out["mask"]
    ratio = log_factors(out, 0, counts, library)  # (B, L): log factor - log cell normaliser
    # Within a view, gene g's log factor minus gene h's is the same in every cell that shows both.
    ids = batch["input_ids"]
    differences = {}
    for i in range(len(ids)):
        present = {g: ratio[i, j] for j, g in enumerate(ids[i]) if genes[i, j]}
        for g, h in [(g, h) for g in present for h in present if g < h]:
            differences.setdefault((g, h), []).append(present[g] - present[h])
    shared = [np.ptp(d) for d in differences.values() if len(d) > 1]
    assert len(shared) > 100 and max(shared) < 1e-3
    spread = [d[0] for d in differences.values()]
    assert 0.4 < np.std(spread) < 1.0  # the difference of two N(0, 0.5^2) log factors: sd 0.71
    # The two views are two batches: their factors differ.
    other = log_factors(out, 1, counts, library)
    both = genes & (out["view_values"][1] > 0) & (out["view_values"][0] > 0)
    assert np.std(ratio[both] - other[both]) > 0.2


def test_views_are_seeded_special_tokens_untouched_and_every_cell_keeps_a_gene():
    batch, counts, library = counted_batch(n_cells=50)
    batch["input_ids"][:, 0] = 1  # a <cls> first, with its own value
    batch["values"][:, 0] = 7.0
    tiny = library.copy()
    tiny[:10] = counts[:10].sum(1)  # cells with no molecule outside their tokens
    technical = TechnicalViews(tiny, TARGET, depth=(0.01, 0.05), gene_scale=0.3, seed=4)
    out = collate(technical, batch, epoch=2, view_keep=(0.4, 0.8))
    again = collate(technical, batch, epoch=2, view_keep=(0.4, 0.8))
    assert np.array_equal(out["view_values"], again["view_values"])
    assert np.array_equal(out["view_masks"], again["view_masks"])
    later = collate(technical, batch, epoch=3, view_keep=(0.4, 0.8))
    assert not np.array_equal(out["view_values"], later["view_values"])
    assert (out["view_values"][:, :, 0] == 7.0).all() and out["view_masks"][:, :, 0].all()
    gene_tokens = batch["attention_mask"] & (batch["input_ids"] > 2)
    assert ((out["view_masks"] & gene_tokens).sum(-1) >= 1).all()  # even at 1-5% of the molecules
    # A cell thinned to nothing shows its own values (not zeros) at the tokens it keeps.
    shown = out["view_masks"] & gene_tokens & ~out["mask"]
    assert (out["view_values"][shown] > 0).all()


def test_the_model_reads_each_views_values_and_scores_the_cells_own():
    batch, _, library = counted_batch(n_cells=8, width=12)
    out = collate(TechnicalViews(library, TARGET, depth=(0.3, 0.6)), batch, view_keep=(0.5, 0.9))
    tensors = {k: torch.from_numpy(v) for k, v in out.items() if k != "cell_index"}
    torch.manual_seed(0)
    model = ScFoundationForMaskedValueModeling(config(contrastive_weight=1.0)).eval()
    technical = model(**tensors)
    plain = model(**{k: v for k, v in tensors.items() if k != "view_values"})
    assert not torch.allclose(technical.contrastive_loss, plain.contrastive_loss)
    # Both views reading the cell's own values is the plain forward pass.
    same = dict(tensors, view_values=torch.stack([tensors["values"], tensors["values"]]))
    torch.testing.assert_close(model(**same).loss, plain.loss)
    # The first view's embedding is the encoder's on that view's tokens with that view's values.
    i = 2
    keep = torch.from_numpy(out["attention_mask"][i] & out["view_masks"][0, i])
    alone = model.sc_foundation(
        tensors["input_ids"][i][keep][None],
        tensors["view_values"][0, i][keep][None],
        mask=tensors["mask"][i][keep][None],
    ).cell_embedding
    torch.testing.assert_close(technical.cell_embedding[i], alone[0], atol=1e-5, rtol=1e-5)


def test_refusals(tmp_path, cellbench):
    with pytest.raises(ValueError, match="view_depth must be"):
        TechnicalViews(np.ones(3), TARGET, depth=(0.0, 0.5))
    with pytest.raises(ValueError, match="view_gene_scale"):
        TechnicalViews(np.ones(3), TARGET, gene_scale=-1.0)
    with pytest.raises(ValueError, match=r"set data\.loader\.view_keep, or view_depth=null"):
        MaskingCollator(0.2, "value", 2, SPECIAL, VOCAB, technical=TechnicalViews(np.ones(3), TARGET, gene_scale=0.1))
    report = build_store([cellbench], tmp_path / "store", tokenizer_config=TokenizerConfig(context_length=64))
    module = CorpusDataModule(report.path, batch_size=8, view_keep=(0.4, 0.8), view_depth=(0.2, 1.0))
    with pytest.raises(ValueError, match=r"encoding is 'binned'.*data\.tokenizer\.encoding=continuous"):
        module.setup()
