"""DataModule pieces: two- and three-way splits, the length-grouped DDP-aware batch sampler, masking, per-cell
labels, loaders (real data slices)."""

import itertools

import numpy as np
import pytest
import torch

from sc_foundation.data.datamodule import (
    CellBatchSampler,
    CorpusDataModule,
    MaskingCollator,
    SharedBatch,
    StoreBatchDataset,
    TokenDropout,
    source_balance_weights,
    split_cells,
    split_train_val_test,
)
from sc_foundation.data.store import CorpusStore, build_store
from sc_foundation.data.tokenization import TokenizerConfig


@pytest.fixture(scope="module")
def store_dirs(tmp_path_factory, real_slice):
    """Two small stores (binned and rank) over 400 Kang cells and 120 CellBench cells (two protocol batches)."""
    folder = tmp_path_factory.mktemp("data_stores")
    kang = real_slice("kang_ifnb/kang_ifnb.h5ad", np.arange(0, 14000, 35))
    cellbench = real_slice("cellbench_3cl/cellbench_3cl.h5ad", np.arange(0, 480, 4))
    kang.write_h5ad(folder / "kang.h5ad")
    cellbench.write_h5ad(folder / "cellbench.h5ad")
    inputs = [str(folder / "kang.h5ad"), {"path": str(folder / "cellbench.h5ad"), "batch_key": "batch"}]
    dirs = {}
    # Context 2048 leaves the Kang cells (about 650 genes each) their natural lengths, so padding is measurable.
    for encoding, context in (("binned", 2048), ("rank", 512)):
        config = TokenizerConfig(encoding=encoding, context_length=context)
        build_store(inputs, folder / encoding, tokenizer_config=config, obs_keys=["condition", "cell_type"])
        dirs[encoding] = folder / encoding
    return dirs


@pytest.fixture(scope="module")
def store(store_dirs):
    return CorpusStore(store_dirs["binned"])


def test_random_split_is_seeded_disjoint_and_complete(store):
    train, val = split_cells(store, 0.2, seed=3)
    again = split_cells(store, 0.2, seed=3)
    other = split_cells(store, 0.2, seed=4)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, other[1])
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(store)
    assert len(val) == round(0.2 * len(store))


def test_grouped_split_keeps_groups_whole(store):
    train, val = split_cells(store, 0.2, seed=0, group_by="batch")
    batches = store.obs["batch"].astype(str).to_numpy()
    assert set(batches[train]).isdisjoint(batches[val])
    assert len(val) > 0 and len(train) > 0
    with pytest.raises(ValueError, match="not a column"):
        split_cells(store, 0.2, group_by="donor")
    with pytest.raises(ValueError, match="too few"):
        split_cells(store, 0.5, group_by="source")


def test_sampler_is_seeded_length_grouped_and_covers_the_split(store):
    indices = np.arange(len(store))
    sampler = CellBatchSampler(indices, store.lengths, batch_size=16, seed=1, mega_batch_factor=4)
    first = [b.tolist() for _, b in sampler]
    assert [b.tolist() for _, b in CellBatchSampler(indices, store.lengths, 16, seed=1, mega_batch_factor=4)] == first
    assert sorted(i for b in first for i in b) == indices.tolist()
    assert len(first) == len(sampler)
    sampler.set_epoch(1)
    assert [b.tolist() for _, b in sampler] != first
    grouped = sampler.padding_fraction()
    sampler.group_by_length = False
    assert grouped < sampler.padding_fraction() / 3


def test_sampler_gives_each_rank_disjoint_cells_and_equal_steps(store):
    indices = np.arange(len(store))
    ranks = [
        [b for _, b in CellBatchSampler(indices, store.lengths, 8, seed=0, num_replicas=3, rank=r, drop_last=True)]
        for r in range(3)
    ]
    assert len({len(r) for r in ranks}) == 1
    seen = [set(np.concatenate(r).tolist()) for r in ranks]
    assert seen[0].isdisjoint(seen[1]) and seen[0].isdisjoint(seen[2]) and seen[1].isdisjoint(seen[2])
    assert sum(len(s) for s in seen) >= len(store) - 3 * 8


def _collator(store, ratio=0.15, objective="value"):
    vocab = store.vocab
    return MaskingCollator(ratio, objective, vocab.mask_id, vocab.special_ids.tolist(), len(vocab), seed=7)


def test_value_masking_hides_values_and_repeats(store):
    batch = store.get_batch(np.arange(40))
    out = _collator(store)(batch, epoch=0)
    mask = out["mask"]
    assert not mask[:, 0].any(), "the <cls> token is never masked"
    assert not mask[~batch["attention_mask"]].any(), "padding is never masked"
    assert mask.any(axis=1).all()
    ratio = mask.sum() / (batch["attention_mask"].sum() - len(mask))
    assert 0.12 < ratio < 0.18
    assert np.array_equal(out["labels"][mask], batch["values"][mask])
    assert (out["values"][mask] == 0).all()
    assert np.array_equal(out["values"][~mask], batch["values"][~mask])
    again = _collator(store)(store.get_batch(np.arange(40)), epoch=0)
    assert np.array_equal(again["mask"], mask)
    assert not np.array_equal(_collator(store)(store.get_batch(np.arange(40)), epoch=1)["mask"], mask)


def test_a_cells_mask_does_not_depend_on_its_batch(store):
    collator = _collator(store)
    alone = collator(store.get_batch([5]), epoch=2)
    n = store.lengths[5]
    mixed = collator(store.get_batch([30, 5, 100]), epoch=2)
    assert np.array_equal(alone["mask"][0, :n], mixed["mask"][1, :n])


def test_gene_masking_for_rank_replaces_ids(store_dirs):
    rank_store = CorpusStore(store_dirs["rank"])
    batch = rank_store.get_batch(np.arange(64))
    out = _collator(rank_store, objective="gene")(batch, epoch=0)
    mask = out["mask"]
    assert np.array_equal(out["labels"][mask], batch["input_ids"][mask])
    assert (out["labels"][~mask] == -100).all()
    assert rank_store.vocab.mask_id == 2
    replaced = out["input_ids"][mask] == rank_store.vocab.mask_id
    assert 0.7 < replaced.mean() < 0.9
    assert np.array_equal(out["input_ids"][~mask], batch["input_ids"][~mask])
    swapped = out["input_ids"][mask & (out["input_ids"] != batch["input_ids"]) & (out["input_ids"] != 2)]
    assert len(swapped) > 0, "about 10% of masked tokens become a random gene"
    assert not np.isin(swapped, rank_store.vocab.special_ids).any(), "a random replacement is never a special token"


def test_packed_batches_hold_the_same_tokens_as_padded(store):
    padded = StoreBatchDataset(store)[(0, np.array([3, 9, 27]))]
    packed = StoreBatchDataset(store, pack=True)[(0, np.array([3, 9, 27]))]
    cu = packed["cu_seqlens"]
    for row in range(3):
        n = int(cu[row + 1] - cu[row])
        assert n == int(padded["attention_mask"][row].sum())
        assert torch.equal(packed["input_ids"][0, cu[row] : cu[row + 1]], padded["input_ids"][row, :n])
        assert torch.equal(packed["values"][0, cu[row] : cu[row + 1]], padded["values"][row, :n])
    assert int(packed["max_seqlen"]) == int(padded["attention_mask"].sum(1).max())


def test_datamodule_batches_are_identical_with_and_without_workers(store_dirs):
    """Workers hand over groups of 4 batches (the last group shorter): the same batches, in the same order, and the
    loader's length still counts batches."""
    batches = []
    for workers in (0, 2):
        datamodule = CorpusDataModule(
            store_dirs["binned"], batch_size=16, num_workers=workers, worker_batches=4, seed=5
        )
        datamodule.setup()
        loader = datamodule.train_dataloader()
        batches.append(list(loader))
        assert len(loader) == len(batches[-1]) and len(loader) % 4 != 0
    for a, b in zip(*batches, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    first = batches[0][0]
    assert first["input_ids"].dtype == torch.int64 and first["attention_mask"].dtype == torch.bool
    assert first["input_ids"].shape[1] % 8 == 0
    assert {"mask", "labels", "values", "cell_index"} <= first.keys()


def test_shared_batch_packs_every_array_into_one_buffer_and_unpacks_views():
    rng = np.random.default_rng(0)
    arrays = {
        "attention_mask": rng.random((3, 5)) < 0.5,  # 15 bytes: the next array must be realigned
        "input_ids": rng.integers(0, 60000, (3, 5)),
        "values": rng.random((3, 5)).astype(np.float32),
        "max_seqlen": np.asarray(7),
        "cell_index": np.arange(3, dtype=np.int64),
    }
    second = {key: array[::-1].copy() for key, array in arrays.items() if key != "max_seqlen"}
    shared = SharedBatch([arrays, second])
    assert shared.buffer.is_shared() and shared.buffer.dtype == torch.uint8
    tensors, tensors_of_second = shared.batches()
    assert list(tensors) == list(arrays) and list(tensors_of_second) == list(second)
    assert all(np.array_equal(tensors_of_second[key].numpy(), second[key]) for key in second)
    for (key, _, _, offset), array in zip(shared.layout[0], arrays.values(), strict=True):
        assert tensors[key].numpy().dtype == array.dtype and tuple(tensors[key].shape) == array.shape
        assert np.array_equal(tensors[key].numpy(), array)
        # A view of the one buffer at its aligned offset, not a copy.
        assert offset % 8 == 0
        assert tensors[key].data_ptr() == shared.buffer.data_ptr() + offset


def test_datamodule_without_masking_for_finetuning(store_dirs):
    datamodule = CorpusDataModule(store_dirs["binned"], batch_size=8, mask_ratio=None, val_fraction=0.1)
    datamodule.setup()
    batch = next(iter(datamodule.val_dataloader()))
    assert "mask" not in batch and "labels" not in batch
    report = datamodule.padding_report()
    assert report["length_grouped"] < report["random"]


def test_token_dropout_drops_genes_in_training_batches_only(store):
    """Training batches show a seeded, per-epoch subset of each cell's genes (their original order and values kept);
    validation batches show every gene."""
    labels = np.arange(len(store)) % 3
    splits = {"train": np.arange(0, len(store), 2), "val": np.arange(1, len(store), 2)}
    module = CorpusDataModule(
        store.path, batch_size=16, mask_ratio=None, splits=splits, per_cell={"labels": labels}, token_dropout=0.4
    )
    module.setup()
    epoch, cells = next(iter(module.train_dataloader().sampler))
    full = store.get_batch(cells)
    kept = {e: module.train_dataset[(e, cells)] for e in (epoch, epoch + 1)}
    again = module.train_dataset[(epoch, cells)]
    assert torch.equal(kept[epoch]["input_ids"], again["input_ids"])  # a function of seed, epoch and cell
    assert not torch.equal(kept[epoch]["input_ids"], kept[epoch + 1]["input_ids"])  # anew each epoch
    shares = []
    for row in range(len(cells)):
        n_full = int(full["attention_mask"][row].sum())
        n_kept = int(kept[epoch]["attention_mask"][row].sum())
        ids = kept[epoch]["input_ids"][row, :n_kept].numpy()
        values = kept[epoch]["values"][row, :n_kept].numpy()
        # The kept tokens are a subsequence of the cell's tokens, with their own values, and padding after them.
        where = np.searchsorted(full["input_ids"][row, :n_full], ids)
        assert np.all(np.diff(where) > 0) and np.array_equal(full["values"][row, where], values)
        assert np.all(kept[epoch]["input_ids"][row, n_kept:].numpy() == store.vocab.pad_id)
        assert n_kept >= 1
        shares.append(n_kept / n_full)
    assert 0.5 < np.mean(shares) < 0.7  # about 1 - 0.4 of each cell's genes
    assert torch.equal(kept[epoch]["labels"], torch.as_tensor(labels[cells]))
    _, val_cells = next(iter(module.val_dataloader().sampler))
    val_batch = next(iter(module.val_dataloader()))
    assert torch.equal(val_batch["input_ids"], torch.as_tensor(store.get_batch(val_cells)["input_ids"]))


def test_token_dropout_keeps_a_gene_per_cell():
    ids = np.array([[1, 10, 0, 0], [1, 20, 21, 22]])
    batch = {"input_ids": ids, "values": (ids > 2).astype(np.float32), "attention_mask": ids != 0}
    batch["cell_index"] = np.array([4, 9])
    dropout = TokenDropout(0.99, special_ids=[0, 1, 2, 3], pad_id=0)
    out = dropout(batch, epoch=0)
    assert out["input_ids"][:, 0].tolist() == [1, 1]  # <cls> stays
    assert out["attention_mask"].sum(axis=1).tolist() == [2, 2]  # and one gene token per cell
    with pytest.raises(ValueError, match="token_dropout must lie"):
        TokenDropout(1.0, special_ids=[0], pad_id=0)


def test_packed_and_padded_batches_get_the_same_masks(store_dirs):
    for encoding, objective in (("binned", "value"), ("rank", "gene")):
        corpus = CorpusStore(store_dirs[encoding])
        collator = _collator(corpus, objective=objective)
        cells = np.array([4, 17, 250, 301])
        padded = collator(corpus.get_batch(cells), epoch=3)
        packed = collator(corpus.get_packed(cells), epoch=3)
        bounds = packed["cu_seqlens"]
        for row in range(len(cells)):
            n = bounds[row + 1] - bounds[row]
            for key in ("mask", "labels", "input_ids", "values"):
                assert np.array_equal(packed[key][0, bounds[row] : bounds[row + 1]], padded[key][row, :n]), key
        assert packed["mask"].shape == packed["input_ids"].shape


def test_sampler_skips_the_batches_a_resumed_run_already_trained_on(store):
    sampler = CellBatchSampler(np.arange(len(store)), store.lengths, batch_size=16, seed=2)
    sampler.set_epoch(4)
    full = [b.tolist() for _, b in sampler]
    sampler.skip_batches = 5
    assert [b.tolist() for _, b in sampler] == full[5:]
    assert [b.tolist() for _, b in sampler] == full, "the skip applies once"


def test_three_way_split_is_seeded_stratified_or_grouped(store):
    labels = store.obs["source"].cat.codes.to_numpy().astype(np.int64)  # 400 Kang and 120 CellBench cells
    splits = split_train_val_test(store, 0.2, 0.2, seed=1, labels=labels)
    again = split_train_val_test(store, 0.2, 0.2, seed=1, labels=labels)
    assert all(np.array_equal(splits[name], again[name]) for name in ("train", "val", "test"))
    assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(len(store)))
    assert len(splits["test"]) == round(0.2 * len(store))
    for rows in splits.values():  # every split keeps the label proportions
        assert labels[rows].mean() == pytest.approx(labels.mean(), abs=0.02)
    # Three batches (the Kang file, two CellBench protocols): each split takes whole ones.
    grouped = split_train_val_test(store, 0.1, 0.1, seed=0, group_by="batch")
    batches = store.obs["batch"].astype(str).to_numpy()
    sides = [set(batches[grouped[name]]) for name in ("train", "val", "test")]
    assert all(sides) and all(a.isdisjoint(b) for a, b in itertools.combinations(sides, 2))
    with pytest.raises(ValueError, match="summing below 1"):
        split_train_val_test(store, 0.5, 0.5)


def test_shift_split_tests_on_named_groups_and_stratifies_the_rest(store):
    # The store holds a Kang file and CellBench's two protocols as three batches: test on one protocol.
    batches = store.obs["batch"].astype(str).to_numpy()
    held_out = sorted(set(batches))[-1]
    labels = (store.obs["source"].astype(str).to_numpy() == store.obs["source"].astype(str).iloc[0]).astype(np.int64)
    splits = split_train_val_test(store, 0.2, 0.3, seed=3, labels=labels, group_by="batch", test_groups=[held_out])
    assert np.array_equal(splits["test"], np.flatnonzero(batches == held_out))
    assert held_out not in set(batches[splits["train"]]) | set(batches[splits["val"]])
    rest = np.flatnonzero(batches != held_out)
    assert np.array_equal(np.sort(np.concatenate([splits["train"], splits["val"]])), rest)
    assert len(splits["val"]) == pytest.approx(0.2 * len(rest), abs=1)  # test_fraction is unused
    assert labels[splits["val"]].mean() == pytest.approx(labels[rest].mean(), abs=0.03)
    other = split_train_val_test(store, 0.2, 0.3, seed=4, labels=labels, group_by="batch", test_groups=[held_out])
    assert np.array_equal(other["test"], splits["test"]) and not np.array_equal(other["val"], splits["val"])
    with pytest.raises(ValueError, match=r"\['nope'\] are not values of 'batch'"):
        split_train_val_test(store, 0.2, 0.2, group_by="batch", test_groups=["nope"])
    with pytest.raises(ValueError, match="needs split_by"):
        split_train_val_test(store, 0.2, 0.2, test_groups=[held_out])
    with pytest.raises(ValueError, match="hold every cell"):
        split_train_val_test(store, 0.2, 0.2, group_by="batch", test_groups=sorted(set(batches)))


def test_stratified_split_takes_classes_too_rare_for_every_split(store):
    labels = store.obs["source"].cat.codes.to_numpy().astype(np.int64)
    labels[[3, 10, 50]] = [7, 8, 8]  # a class of one cell and one of two: scikit-learn alone refuses these
    splits = split_train_val_test(store, 0.2, 0.2, seed=1, labels=labels)
    assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(len(store)))
    for rows in splits.values():  # the common classes stay stratified
        assert (labels[rows] == 0).mean() == pytest.approx((labels == 0).mean(), abs=0.02)


def test_datamodule_adds_per_cell_labels_by_store_row(store_dirs):
    store = CorpusStore(store_dirs["binned"])
    labels = np.arange(len(store), dtype=np.int64) * 10
    splits = split_train_val_test(store, 0.2, 0.2)
    per_cell = {"labels": labels, "batch_ids": labels + 1}
    datamodule = CorpusDataModule(store_dirs["binned"], 16, mask_ratio=None, per_cell=per_cell, splits=splits)
    datamodule.setup()
    predicted = torch.cat([batch["cell_index"] for batch in datamodule.predict_dataloader()])
    assert sorted(predicted.tolist()) == list(range(len(store)))
    for loader, name in ((datamodule.train_dataloader(), "train"), (datamodule.test_dataloader(), "test")):
        batch = next(iter(loader))
        assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == batch["cell_index"].shape
        assert torch.equal(batch["labels"], batch["cell_index"] * 10)
        assert torch.equal(batch["batch_ids"], batch["labels"] + 1)
        assert set(batch["cell_index"].tolist()) <= set(splits[name].tolist())
    with pytest.raises(ValueError, match="exclude each other"):
        CorpusDataModule(store_dirs["binned"], 16, per_cell={"labels": labels}).setup()
    unsplit = CorpusDataModule(store_dirs["binned"], 16, mask_ratio=None)
    unsplit.setup()
    with pytest.raises(ValueError, match="no test split"):
        unsplit.test_dataloader()


def test_evaluation_loaders_are_whole_on_every_rank(store_dirs, monkeypatch):
    """Under DDP (rank 1 of 2, faked) the training and validation loaders give this rank its share of the batches,
    while the test and predict loaders, which serve evaluation on one process after training, give every cell."""
    store = CorpusStore(store_dirs["binned"])
    splits = split_train_val_test(store, 0.2, 0.2)
    datamodule = CorpusDataModule(store_dirs["binned"], 8, mask_ratio=None, splits=splits)
    datamodule.setup()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)

    def cells(loader):
        return sorted(torch.cat([batch["cell_index"] for batch in loader]).tolist())

    assert len(cells(datamodule.val_dataloader())) < 0.6 * len(splits["val"])
    assert cells(datamodule.test_dataloader()) == sorted(splits["test"].tolist())
    assert cells(datamodule.predict_dataloader()) == list(range(len(store)))


def test_source_balance_weights_give_each_input_its_share():
    sources = np.array(["big"] * 900 + ["small"] * 100)
    for power, small_share in ((0.0, 0.1), (0.5, 0.25), (1.0, 0.5)):  # 100**0.5 / (900**0.5 + 100**0.5) = 0.25
        weights = source_balance_weights(sources, power)
        assert weights[sources == "small"].sum() / weights.sum() == pytest.approx(small_share)
    with pytest.raises(ValueError, match="source_balance"):
        source_balance_weights(sources, 1.5)


def test_balanced_sampling_evens_out_the_inputs_of_the_training_batches(store_dirs):
    """Kang (400 cells) and CellBench (120): balanced, CellBench fills about half of the training batches instead of
    its 23% of the cells; the draw is seeded, and validation keeps every cell once."""
    shares = {}
    for balance in (0.0, 1.0):
        datamodule = CorpusDataModule(store_dirs["binned"], 16, seed=3, source_balance=balance, val_fraction=0.2)
        datamodule.setup()
        sources = datamodule.store.obs["source"].astype(str).to_numpy()
        cellbench = datamodule.store.obs["source"].value_counts().idxmin()  # the smaller input
        drawn = np.concatenate([b["cell_index"].numpy() for b in datamodule.train_dataloader()])
        again = np.concatenate([b["cell_index"].numpy() for b in datamodule.train_dataloader()])
        assert np.array_equal(drawn, again)
        assert set(drawn) <= set(datamodule.train_indices.tolist())
        shares[balance] = (sources[drawn] == cellbench).mean()
        validation = np.concatenate([b["cell_index"].numpy() for b in datamodule.val_dataloader()])
        assert sorted(validation.tolist()) == sorted(datamodule.val_indices.tolist())
    assert shares[0.0] == pytest.approx(120 / 520, abs=0.05)
    assert shares[1.0] == pytest.approx(0.5, abs=0.08)
