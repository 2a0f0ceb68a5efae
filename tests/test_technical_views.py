"""Technical views: each contrastive view of a cell read as another technical batch would measure it (thinner, other
per-gene capture), and fine-tuning's depth thinning, on hand-made cells whose counts are known and on a real store."""

import numpy as np
import pytest
import torch

from sc_foundation.data.datamodule import CorpusDataModule, DepthThinning, MaskingCollator
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


def with_cls(batch):
    """The batch with a ``<cls>`` token (value -2) first in every cell."""
    n = len(batch["input_ids"])
    return dict(
        batch,
        input_ids=np.hstack([np.full((n, 1), SPECIAL[1]), batch["input_ids"]]),
        values=np.hstack([np.full((n, 1), -2.0, dtype=np.float32), batch["values"]]),
        attention_mask=np.hstack([np.ones((n, 1), dtype=bool), batch["attention_mask"]]),
    )


def test_depth_thinning_gives_each_cell_fewer_molecules_of_its_own_genes_and_drops_the_emptied_ones():
    batch, counts, library = counted_batch(n_cells=200)
    batch = with_cls(batch)
    thinning = DepthThinning(library, TARGET, (0.25, 0.25), SPECIAL, pad_id=0, seed=3)
    out = thinning(batch, epoch=0)
    assert (out["input_ids"][:, 0] == SPECIAL[1]).all() and (out["values"][:, 0] == -2.0).all()  # <cls> untouched
    thinned_library = 0.25 * library
    implied_all, original_all = [], []
    for i in range(len(counts)):
        real = out["attention_mask"][i]
        ids, values = out["input_ids"][i][real][1:], out["values"][i][real][1:]
        own = dict(zip(batch["input_ids"][i][1:].tolist(), counts[i, :].tolist(), strict=True))
        assert set(ids.tolist()) <= {g for g, c in own.items() if c > 0}  # only the cell's genes, in their order
        assert (np.diff([list(own).index(g) for g in ids.tolist()]) > 0).all()
        assert (values > 0).all()  # every shown gene kept molecules; the ones thinned to zero left
        implied_all.append(np.expm1(values.astype(np.float64)) / TARGET * thinned_library[i])
        original_all.append(np.array([own[g] for g in ids.tolist()]))
    implied, original = np.concatenate(implied_all), np.concatenate(original_all)
    # Integer counts of a cell of about a quarter of the molecules, each at most the gene's own count (a little slack:
    # the thinned library is near, not at, a quarter), a quarter of it on average.
    assert np.median(np.abs(implied - np.rint(implied))) < 0.25
    assert (implied <= original * 1.3 + 0.5).all()
    assert 0.2 < implied.sum() / original.sum() < 0.4
    # A gene of c molecules leaves with probability 0.75 ** c: as many genes left as that predicts.
    p_gone = 0.75 ** counts[counts > 0]
    dropped = batch["attention_mask"].sum() - out["attention_mask"].sum()
    assert abs(dropped - p_gone.sum()) < 4 * np.sqrt((p_gone * (1 - p_gone)).sum())


def test_depth_thinning_is_seeded_by_epoch_and_a_cell_thinned_to_nothing_keeps_its_own_tokens():
    batch, _, library = counted_batch(n_cells=20)
    thinning = DepthThinning(library, TARGET, (0.2, 1.0), SPECIAL, pad_id=0, seed=1)
    first, again, later = thinning(batch, 0), thinning(batch, 0), thinning(batch, 1)
    for key in ("input_ids", "values"):
        np.testing.assert_array_equal(first[key], again[key])
    assert first["values"].shape != later["values"].shape or not np.array_equal(first["values"], later["values"])
    # One molecule of one gene, kept with probability 0.001: the cell keeps that token and value.
    single = {
        "input_ids": np.array([[SPECIAL[1], 7]]),
        "values": np.array([[-2.0, np.log1p(TARGET / 5)]], dtype=np.float32),
        "attention_mask": np.ones((1, 2), dtype=bool),
        "cell_index": np.array([0]),
    }
    out = DepthThinning(np.array([5.0]), TARGET, (0.001, 0.001), SPECIAL, pad_id=0)(single, epoch=0)
    for key in ("input_ids", "values", "attention_mask"):
        np.testing.assert_array_equal(out[key], single[key])


def test_fine_tuning_stores_recover_the_counts_the_thinning_needs_and_only_training_batches_are_thinned(
    tmp_path, cellbench
):
    """With library_size=panel the store's library is the panel total, so values x library give back the counts."""
    config = TokenizerConfig(encoding="continuous", context_length=30_000, library_size="panel")
    report = build_store([cellbench], tmp_path / "store", tokenizer_config=config)
    splits = {"train": np.arange(0, 100), "val": np.arange(100, 140)}
    module = CorpusDataModule(report.path, batch_size=16, mask_ratio=None, splits=splits, thin_depth=(0.3, 0.3))
    module.setup()
    cells = np.arange(16)
    plain = module.store.get_batch(cells)
    library = module.store.obs["n_counts"].to_numpy()[cells]
    genes = plain["attention_mask"] & (plain["input_ids"] != module.store.vocab.cls_id)
    counts = np.expm1(plain["values"].astype(np.float64)) * library[:, None] / config.target_sum
    np.testing.assert_allclose(np.where(genes, counts, 0).sum(1), library, rtol=1e-4)  # the panel's whole library
    np.testing.assert_allclose(counts[genes], np.rint(counts[genes]), atol=0.02)  # integer counts
    train = module.train_dataset._arrays(0, cells)
    val = module.dataset._arrays(0, cells)
    np.testing.assert_array_equal(val["values"], plain["values"])
    assert train["attention_mask"].sum() < 0.8 * plain["attention_mask"].sum()
    with pytest.raises(ValueError, match="thin_depth must be"):
        DepthThinning(library, config.target_sum, (0.5, 1.5), SPECIAL, pad_id=0)
    binned = build_store([cellbench], tmp_path / "binned", tokenizer_config=TokenizerConfig(context_length=64))
    with pytest.raises(ValueError, match=r"data\.thin_depth recover counts.*encoding is 'binned'"):
        CorpusDataModule(binned.path, mask_ratio=None, splits=splits, thin_depth=(0.3, 1.0)).setup()
