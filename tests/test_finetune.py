"""finetune.py: cell-type annotation from a pretrained export, with splits, metrics, baselines and a loadable export."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForSequenceClassification

from sc_foundation import tasks
from sc_foundation.data.io import InvalidInputError
from sc_foundation.data.store import CorpusStore
from sc_foundation.inference import call_classes
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.modeling import ScFoundationForCellClassification
from sc_foundation.tasks.convergence import EarlyStoppingFrom, GradualUnfreezing
from tests.conftest import CELLBENCH, TINY_ARCHITECTURE

ROOT = Path(__file__).parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "~logger"]


def compose_finetune(overrides=()):
    return tasks.compose_config(overrides)


def overrides(pretrained, files, out, *extra):
    # A 200-gene panel keeps the tests' contexts near the tiny export's 256 (the default 1000 is for real runs).
    panel = "data.panel_genes=200"
    return [f"pretrained={pretrained}", f"data.files={files}", f"output_dir={out}", panel, *QUIET, *extra]


@pytest.fixture(scope="module")
def annotation(pretrained, cellbench, tmp_path_factory):
    out = tmp_path_factory.mktemp("annotation")
    files = f"[{{path: {cellbench}, batch_key: batch}}]"
    cfg = compose_finetune(overrides(pretrained, files, out, "trainer.max_epochs=12"))
    return tasks.run(cfg)


def test_conf_composes():
    cfg = compose_finetune(["pretrained=x", "data.files=[a.h5ad]", "task=annotation", "finetune.mode=lower_lr"])
    assert cfg.label_key == "cell_type" and cfg.class_weights == "balanced" and cfg.unknown_threshold is None
    assert cfg.early_stopping.patience > 0 and cfg.trainer.max_epochs > 0 and cfg.trainer.accelerator == "cpu"
    assert (cfg.early_stopping.monitor, cfg.early_stopping.mode) == ("val/macro_f1_then_loss", "max")
    assert cfg.early_stopping.start_epoch == 0
    integration = compose_finetune(["pretrained=x", "data.files=[a.h5ad]", "task=integration", "batch_key=b"])
    assert integration.early_stopping.start_epoch == 30  # the task's own, not overridden by finetune.yaml
    # A task file's budget replaces finetune.yaml's (annotation keeps its 60 epochs); the command line replaces both.
    assert (cfg.trainer.max_epochs, integration.trainer.max_epochs, integration.dab_weight) == (60, 100, 0.0)
    shorter = compose_finetune(["pretrained=x", "data.files=[a.h5ad]", "task=integration", "trainer.max_epochs=7"])
    assert shorter.trainer.max_epochs == 7


def test_annotates_cellbench_cell_lines(annotation):
    out, metrics = annotation["output_dir"], annotation["metrics"]
    store = CorpusStore(annotation["store"])
    splits = json.loads((out / "splits.json").read_text())
    for name in ("train", "test"):  # a stratified split by cell keeps both protocols on each side
        assert set(store.obs["batch"].iloc[splits[name]["store_index"]]) == set(store.obs["batch"])
    assert store.obs["batch"].nunique() == 2
    assert sum(metrics["n_cells"].values()) == len(store)
    model = metrics["model"]
    assert model["macro_f1"] >= 0.9, model
    assert len(model["per_class_f1"]) == 3 and np.asarray(model["confusion_matrix"]).shape == (3, 3)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model"] == model
    for baseline in ("hvg_logreg", "pca_logreg"):
        assert np.isfinite(saved["baselines"][baseline]["macro_f1"])
        assert saved["baselines"][baseline]["n_cells"] == model["n_cells"] == metrics["n_cells"]["test"]


def test_depth_thinning_is_left_out_for_a_model_that_reads_bins(annotation, capsys):
    """The tiny export reads binned values: asked for, the thinning is announced off instead of failing the run."""
    cfg = compose_finetune(["pretrained=x", "data.files=[x]", "data.thin_depth=[0.2,1.0]"])
    splits = {"train": np.arange(10), "val": np.arange(10, 20)}
    module = tasks.common.task_datamodule(cfg, annotation["store"], {}, splits)
    assert module.thin_depth is None
    assert "data.thin_depth is off for this model: its tokenizer reads binned values" in capsys.readouterr().out


def test_learning_curves_follow_the_task_metric(annotation):
    """One curves.csv row per epoch with the training loss, val/loss and val/macro_f1; the export is the epoch with
    the best validation macro-F1; a PNG of the curves."""
    out, metrics = annotation["output_dir"], annotation["metrics"]
    curves = pd.read_csv(out / "curves.csv")
    assert list(curves["epoch"]) == list(range(len(curves))) and len(curves) == metrics["epochs"]
    assert {"wall_s", "train_loss", "lr", "val/loss", "val/macro_f1", "val/macro_f1_then_loss"} <= set(curves.columns)
    assert curves["wall_s"].is_monotonic_increasing
    assert curves["val/macro_f1"].between(0, 1).all() and np.isfinite(curves["train_loss"]).all()
    assert curves["train_loss"].iloc[-1] < curves["train_loss"].iloc[0]
    # macro-F1 first, then the lower loss: the selection score orders epochs by both
    expected = curves["val/macro_f1"] - 1e-4 * curves["val/loss"]
    np.testing.assert_allclose(curves["val/macro_f1_then_loss"], expected, rtol=0, atol=1e-6)
    best = curves["val/macro_f1_then_loss"].idxmax()
    assert best == metrics["best_epoch"] and curves["val/macro_f1"][best] == curves["val/macro_f1"].max()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["steps"] > 0 and isinstance(metrics["stopped_early"], bool)


def test_gradual_mode_freezes_the_backbone_for_its_first_epochs():
    """The backbone's gradients are dropped before the optimiser steps of the first unfreeze_epoch epochs (AdamW then
    leaves it unchanged); every parameter keeps requires_grad, which DDP's reducer needs to stay as it was built."""
    config = ScFoundationConfig(vocab_size=20, num_labels=2, **{**TINY_ARCHITECTURE, "pooling": "mean"})
    model = ScFoundationForCellClassification(config)
    module, callback = SimpleNamespace(model=model), GradualUnfreezing(unfreeze_epoch=2)

    def step(epoch):
        model.zero_grad(set_to_none=True)
        model(torch.randint(4, 20, (3, 6)), torch.rand(3, 6), labels=torch.tensor([0, 1, 0])).loss.backward()
        callback.on_before_optimizer_step(SimpleNamespace(current_epoch=epoch), module, None)
        assert all(p.requires_grad for p in model.parameters())
        return [p.grad for p in model.base_model.parameters()], [p.grad for p in model.classifier.parameters()]

    for epoch in (0, 1):
        backbone, head = step(epoch)
        assert all(g is None for g in backbone) and all(g is not None for g in head)
    backbone, head = step(2)
    assert any(g is not None and g.abs().sum() > 0 for g in backbone) and all(g is not None for g in head)
    with pytest.raises(ValueError, match="unfreeze_epoch"):
        GradualUnfreezing(0)


class _WorseningEveryEpoch(pl.LightningModule):
    """A one-weight module whose validation metric grows with the epoch: early stopping fires after patience."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/metric", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("start_epoch", "epochs_run"), [(0, 3), (5, 8)])
def test_early_stopping_counts_patience_from_its_start_epoch(start_epoch, epochs_run):
    """Patience 2 on a metric that only worsens: stopped after epoch 2 from the start, after epoch 7 when the
    checks begin at epoch 5 (its value there is the best the callback has seen)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4)), batch_size=2)
    stopping = EarlyStoppingFrom(start_epoch, monitor="val/metric", mode="min", patience=2)
    trainer = pl.Trainer(
        max_epochs=20,
        callbacks=[stopping],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_WorseningEveryEpoch(), loader, loader)
    assert trainer.current_epoch == epochs_run and stopping.stopped_epoch == epochs_run - 1
    with pytest.raises(ValueError, match="start_epoch must be 0 or more"):
        EarlyStoppingFrom(-1, monitor="val/metric")


def test_label_smoothing_and_backbone_dropout_reach_the_model():
    """``label_smoothing`` smooths the classifier's cross-entropy; ``finetune.dropout`` overrides the backbone's."""
    torch.manual_seed(0)
    config = ScFoundationConfig(
        vocab_size=20, num_labels=3, label_smoothing=0.2, **{**TINY_ARCHITECTURE, "pooling": "mean"}
    )
    model = ScFoundationForCellClassification(config).eval()
    ids, labels = torch.randint(4, 20, (5, 7)), torch.tensor([0, 1, 2, 0, 1])
    output = model(ids, torch.rand(5, 7), labels=labels)
    smoothed = torch.nn.functional.cross_entropy(output.logits, labels, label_smoothing=0.2)
    plain = torch.nn.functional.cross_entropy(output.logits, labels)
    torch.testing.assert_close(output.loss, smoothed)
    assert not torch.isclose(output.loss, plain)
    with pytest.raises(StrictDataclassError, match="label_smoothing must be in"):
        ScFoundationConfig(vocab_size=20, num_labels=3, label_smoothing=1.0, **TINY_ARCHITECTURE)
    cfg = compose_finetune(["pretrained=x", "data.files=[x]", "finetune.dropout=0.3"])
    assert tasks.common.architecture_overrides(cfg) == {"pooling": "mean", "hidden_dropout_prob": 0.3}
    assert "hidden_dropout_prob" not in tasks.common.architecture_overrides(compose_finetune(["pretrained=x"]))


def test_export_loads_and_reproduces_predictions(annotation):
    model = load_pretrained(annotation["export"], device="cpu")
    assert isinstance(model, ScFoundationForCellClassification)
    assert sorted(model.config.id2label.values()) == annotation["metrics"]["model"]["labels"]
    assert len(model.config.class_weights) == 3  # the balanced loss travels with the export
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(annotation["export"]), type(model))
    batch = next(iter(annotation["datamodule"].test_dataloader()))
    logits, _ = tasks.predict(model, [batch])
    again, _ = tasks.predict(load_pretrained(annotation["export"], device="cpu"), [batch])
    np.testing.assert_allclose(logits, again)
    predicted = call_classes(logits, None)
    assert (predicted == batch["labels"].numpy()).mean() > 0.8


def test_frozen_mode_leaves_the_backbone_unchanged(pretrained, cellbench, tmp_path):
    cfg = compose_finetune(
        overrides(
            pretrained,
            f"[{cellbench}]",
            tmp_path,
            "finetune.mode=frozen",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=5",
            "unknown_threshold=0.9",
            "baselines.n_pcs=5",
        )
    )
    result = tasks.run(cfg)
    before = ScFoundationForCellClassification.from_pretrained(pretrained, new_heads=["classifier"], num_labels=3)
    after = load_pretrained(result["export"], device="cpu")
    for (name, old), (_, new) in zip(
        before.base_model.state_dict().items(), after.base_model.state_dict().items(), strict=True
    ):
        assert torch.equal(old, new), name
    head = ScFoundationForCellClassification.from_pretrained(result["export"]).classifier.proj.weight
    assert not torch.equal(head, before.classifier.proj.weight)
    assert 0.0 <= result["metrics"]["model"]["unknown_rate"] <= 1.0


@pytest.fixture
def relabelled(real_slice, tmp_path):
    def write(edit):
        adata = real_slice(CELLBENCH, 60)
        edit(adata)
        path = tmp_path / "relabelled.h5ad"
        adata.write_h5ad(path)
        return path

    return write


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda a: a.obs.drop(columns="cell_type", inplace=True),
            r"relabelled.h5ad: label_key='cell_type' is not an obs column; obs columns: \['demuxlet_cls', 'batch'\]",
        ),
        (lambda a: a.obs.__setitem__("cell_type", "H1975"), "single value"),
        (
            lambda a: a.obs.__setitem__("cell_type", [np.nan] * 3 + ["H1975", "A549"] * 28 + ["H1975"]),
            "3 of 60 cells have no 'cell_type' label",
        ),
    ],
    ids=["missing_key", "single_class", "nan_labels"],
)
def test_bad_labels_are_refused(pretrained, relabelled, tmp_path, edit, message):
    cfg = compose_finetune(overrides(pretrained, f"[{relabelled(edit)}]", tmp_path / "out"))
    with pytest.raises(ValueError, match=message):
        tasks.run(cfg)


def _duplicate_ids(adata):
    adata.obs_names = ["AAAC-1", "AAAC-1", *adata.obs_names[2:]]


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _duplicate_ids,
            r"relabelled.h5ad: 1 cell ids occur more than once.*'AAAC-1'.*obs_names_make_unique",
        ),
        (lambda a: a._inplace_subset_obs(np.zeros(a.n_obs, dtype=bool)), "relabelled.h5ad: the file holds no cells"),
    ],
    ids=["duplicated_cell_ids", "empty_file"],
)
def test_inputs_the_task_cannot_use_are_refused_before_training(pretrained, relabelled, tmp_path, edit, message):
    out = tmp_path / "out"
    cfg = compose_finetune(overrides(pretrained, f"[{relabelled(edit)}]", out))
    with pytest.raises(InvalidInputError, match=message):
        tasks.run(cfg)
    assert not out.exists(), "refused before any store, split or model is written"


def test_two_inputs_of_the_same_name_are_refused(pretrained, cellbench, tmp_path):
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / cellbench.name).symlink_to(cellbench)
    cfg = compose_finetune(overrides(pretrained, f"[{cellbench}, {tmp_path / 'copy' / cellbench.name}]", tmp_path))
    with pytest.raises(InvalidInputError, match="several inputs named"):
        tasks.run(cfg)
