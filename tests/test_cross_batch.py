"""Cross-batch neighbour attraction (``task=integration cross_batch_weight=...``): mutual-neighbour targets on
hand-made batches, the model's loss term, and a run whose batch mixing improves with it."""

import numpy as np
import pytest
import torch

from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import ScFoundationForBatchIntegration, _target_distance
from sc_foundation.tasks.cross_batch import CrossBatchTargets, mutual_neighbour_targets, shared_targets
from sc_foundation.tasks.integration import cross_batch_runs
from tests.test_finetune import compose_finetune
from tests.test_integration import run_cellbench_integration


def shifted_batches(seed: int = 0):
    """Two batches of three cell types each in 8 dimensions, the second batch shifted; type 2 exists in the first
    batch only. Returns the (n, 8) cells, their batches and their types."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 8)) * 5
    shift = rng.normal(size=8)
    cells, batches, types = [], [], []
    for batch, present, per_type in ((0, (0, 1, 2), 40), (1, (0, 1), 30)):
        for kind in present:
            cells.append(centres[kind] + batch * shift + rng.normal(scale=0.5, size=(per_type, 8)))
            batches += [batch] * per_type
            types += [kind] * per_type
    return np.vstack(cells).astype(np.float32), np.array(batches), np.array(types)


def test_mutual_neighbours_pair_the_same_type_across_batches_and_leave_a_lone_type_alone():
    cells, batches, types = shifted_batches()
    targets = mutual_neighbour_targets(cells, batches, neighbours=10)
    assert targets.shape == cells.shape and targets.dtype == np.float32
    paired = ~np.isnan(targets).any(axis=1)
    # The type only the first batch has finds no mutual neighbour in the second, so nothing pulls it.
    assert not paired[types == 2].any()
    assert paired[types != 2].mean() > 0.5
    # Each target is a mean of other-batch cells of the cell's own type: nearest to that type's other-batch centre.
    for batch in (0, 1):
        rows = np.flatnonzero(paired & (batches == batch))
        other = [cells[(batches != batch) & (types == kind)].mean(0) for kind in (0, 1)]
        nearest = np.argmin([np.linalg.norm(targets[rows] - centre, axis=1) for centre in other], axis=0)
        np.testing.assert_array_equal(nearest, types[rows])


def test_targets_are_found_between_every_pair_of_batches():
    cells, batches, types = shifted_batches()
    keep = types != 2
    cells, batches = cells[keep], batches[keep]
    third = cells[batches == 1] + 1.0  # a third batch, a copy of the second shifted again
    targets = mutual_neighbour_targets(
        np.vstack([cells, third]), np.concatenate([batches, np.full(len(third), 2)]), neighbours=5
    )
    assert (~np.isnan(targets).any(axis=1)).mean() > 0.5
    with pytest.raises(ValueError, match="at least 1"):
        mutual_neighbour_targets(cells, batches, neighbours=0)
    with pytest.raises(ValueError, match="two or more batches"):
        mutual_neighbour_targets(cells, np.zeros(len(cells)), neighbours=5)


def test_no_targets_before_the_start_epoch():
    targets = shared_targets(6, 4)
    pull = CrossBatchTargets(targets, np.array([0, 0, 0, 1, 1, 1]), np.arange(6), neighbours=2, start_epoch=3)
    trainer = type("Trainer", (), {"current_epoch": 2})()
    pull.on_train_epoch_start(trainer, None)  # returns before it embeds anything
    assert np.isnan(targets).all()


def tiny_integration_model(weight: float) -> ScFoundationForBatchIntegration:
    config = ScFoundationConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, n_bins=5
    )
    config.batch_names, config.decoder_gene_ids, config.cross_batch_weight = ["a", "b"], [5, 6, 7, 8], weight
    torch.manual_seed(0)
    return ScFoundationForBatchIntegration(config)


def test_the_attraction_is_a_training_term_over_the_cells_with_a_target():
    model = tiny_integration_model(2.0)
    input_ids = torch.tensor([[1, 5, 6, 7], [1, 8, 6, 0], [1, 7, 5, 8]])  # each cell after the CLS token
    inputs = {
        "input_ids": input_ids,
        "values": torch.tensor([[0.0, 1, 2, 3], [0, 4, 1, 0], [0, 1, 1, 2]]),
        "attention_mask": input_ids != 0,
        "batch_ids": torch.tensor([0, 1, 1]),
        "counts": torch.tensor([[3.0, 1, 2, 0], [0, 0, 0, 4], [1, 1, 0, 2]]),
    }
    targets = torch.randn(3, 8)
    targets[1] = float("nan")  # the second cell has no mutual neighbour
    output = model(**inputs, cross_batch_targets=targets)
    embedding = output.cell_embedding
    spread = ((embedding - embedding.mean(0)) ** 2).sum(-1).mean()
    expected = ((embedding[[0, 2]] - targets[[0, 2]]) ** 2).sum(-1).mean() / spread
    torch.testing.assert_close(output.cross_batch_loss, expected)
    torch.testing.assert_close(output.loss, output.reconstruction_loss + 2.0 * output.cross_batch_loss)
    (gradient,) = torch.autograd.grad(output.cross_batch_loss, model.sc_foundation.norm.weight)
    assert gradient.abs().sum() > 0
    # Relative to the spread: embeddings shrunk towards the origin score worse against the same targets, where an
    # absolute distance would reward the shrinking (the collapse it caused on CellBench).
    cells, fixed = torch.randn(6, 4), torch.randn(6, 4)
    assert _target_distance(0.1 * cells, fixed) > _target_distance(cells, fixed)
    assert ((0.1 * cells - fixed) ** 2).mean() < ((cells - fixed) ** 2).mean()
    # No cell with a target: a zero term that still back-propagates.
    empty = model(**inputs, cross_batch_targets=torch.full((3, 8), float("nan")))
    assert empty.cross_batch_loss.item() == 0.0 and empty.cross_batch_loss.requires_grad
    model.eval()  # validation and embedding: the reconstruction alone
    evaluated = model(**inputs, cross_batch_targets=targets)
    assert evaluated.cross_batch_loss is None
    torch.testing.assert_close(evaluated.loss, evaluated.reconstruction_loss)


def test_a_run_shorter_than_the_start_epoch_trains_without_the_attraction():
    base = ["pretrained=model", "data.files=[cells.h5ad]", "task=integration", "batch_key=batch"]
    cfg = compose_finetune(base)
    assert cfg.cross_batch_weight == 0.1 and cfg.cross_batch_start_epoch == 20 and cross_batch_runs(cfg)
    assert not cross_batch_runs(compose_finetune([*base, "trainer.max_epochs=20"]))
    assert cross_batch_runs(compose_finetune([*base, "trainer.max_epochs=21"]))
    assert not cross_batch_runs(compose_finetune([*base, "cross_batch_weight=0"]))


def integration_run(pretrained, cellbench, out, *extra):
    return run_cellbench_integration(
        pretrained,
        cellbench,
        out,
        "trainer.max_epochs=3",
        "dab_weight=0",  # the attraction alone against none
        "cross_batch_start_epoch=0",  # from the first epoch: these runs are a few epochs long
        *extra,
    )


def test_a_run_with_the_attraction_gives_targets_to_training_cells_only(pretrained, cellbench, tmp_path):
    result = integration_run(pretrained, cellbench, tmp_path / "run", "trainer.max_epochs=1", "cross_batch_weight=1")
    assert result["metrics"]["cross_batch_weight"] == 1 and result["metrics"]["cross_batch_epochs"] == 1
    targets = result["datamodule"].per_cell["cross_batch_targets"]  # as the last epoch's start left them
    paired = ~np.isnan(targets).any(axis=1)
    assert targets.shape == (499, 16)  # the variational latent's width
    assert not paired[result["splits"]["val"]].any()
    assert paired[result["splits"]["train"]].mean() > 0.2


@pytest.mark.slow
def test_a_short_run_mixes_the_batches_better_with_the_attraction(pretrained, cellbench, tmp_path):
    """Three epochs from the same start: with the attraction the protocols mix better (iLISI, batch score) than
    without."""
    plain = integration_run(pretrained, cellbench, tmp_path / "plain", "cross_batch_weight=0")["metrics"]["model"]
    extra = ("cross_batch_weight=5", "cross_batch_neighbors=10")
    pulled = integration_run(pretrained, cellbench, tmp_path / "pulled", *extra)["metrics"]["model"]
    assert pulled["ilisi"] > plain["ilisi"]
    assert pulled["batch"] > plain["batch"]
