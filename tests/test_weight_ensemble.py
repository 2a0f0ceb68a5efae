"""The frozen stage: finetune.weight_ensemble (the frozen head and the fine-tuned model averaged in weight space,
WiSE-FT) and finetune.head_from_frozen (the fine-tuning starts from the frozen head, LP-FT)."""

import pytest
import torch

from sc_foundation import tasks
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.modeling import ScFoundationForCellClassification
from sc_foundation.tasks.weight_ensemble import (
    FROZEN_STAGE,
    check_frozen_stage,
    interpolated_state,
    start_from_frozen_head,
)
from tests.test_finetune import overrides

SHORT = ["trainer.max_epochs=2", "+trainer.limit_train_batches=4", "baselines.n_pcs=5"]


def test_interpolation_mixes_floating_weights_and_keeps_integer_buffers():
    frozen = {"w": torch.zeros(2, 3), "steps": torch.tensor([1, 2])}
    tuned = {"w": torch.full((2, 3), 4.0), "steps": torch.tensor([5, 6])}
    mixed = interpolated_state(frozen, tuned, 0.75)
    torch.testing.assert_close(mixed["w"], torch.full((2, 3), 3.0))
    assert torch.equal(mixed["steps"], tuned["steps"])
    with pytest.raises(ValueError, match=r"\['extra'\] are in only one"):
        interpolated_state(frozen, tuned | {"extra": torch.ones(1)}, 0.5)
    with pytest.raises(ValueError, match=r"cannot average w: shapes \(2, 3\) and \(3, 2\)"):
        interpolated_state(frozen, {"w": torch.ones(3, 2), "steps": tuned["steps"]}, 0.5)


def test_the_export_is_the_average_of_a_frozen_run_and_a_full_run(pretrained, cellbench, tmp_path):
    """Each stage is seeded as a run of its own: the ensemble's endpoints are what finetune.mode=frozen and
    finetune.mode=full give on the same split, and its export is their weighted average."""
    files = f"[{cellbench}]"

    def run(name, *extra):
        return tasks.run(tasks.compose_config(overrides(pretrained, files, tmp_path / name, *SHORT, *extra)))

    frozen = run("frozen", "finetune.mode=frozen")
    full = run("full", "finetune.head_from_frozen=false")
    mixed = run("mixed", "finetune.weight_ensemble=0.75", "finetune.head_from_frozen=false")
    assert (tmp_path / "mixed" / FROZEN_STAGE / "export" / "best" / "config.json").is_file()

    endpoints = mixed["metrics"]["stages"]
    assert endpoints["weight_ensemble"] == 0.75 and endpoints["head_from_frozen"] is False
    assert endpoints["frozen"]["macro_f1"] == pytest.approx(frozen["metrics"]["model"]["macro_f1"])
    assert endpoints["tuned"]["macro_f1"] == pytest.approx(full["metrics"]["model"]["macro_f1"])

    weights = {
        name: load_pretrained(result["export"], device="cpu").state_dict()
        for name, result in (("frozen", frozen), ("full", full), ("mixed", mixed))
    }
    moved = 0
    for name, value in weights["mixed"].items():
        expected = 0.25 * weights["frozen"][name] + 0.75 * weights["full"][name]
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(weights["frozen"][name], weights["full"][name])
    assert moved > 10, "the full run trained the backbone, so most weights differ between the endpoints"

    # LP-FT, annotation's default: the same frozen stage, then full fine-tuning from its head rather than a random one
    lpft = run("lpft")
    stages = lpft["metrics"]["stages"]
    assert stages["weight_ensemble"] is None and stages["head_from_frozen"] is True
    assert stages["frozen"]["macro_f1"] == pytest.approx(frozen["metrics"]["model"]["macro_f1"])
    assert "tuned" not in stages, "without an ensemble the tuned model is the export, scored once as metrics['model']"
    lpft_weights = load_pretrained(lpft["export"], device="cpu").state_dict()
    assert any(not torch.equal(lpft_weights[name], weights["full"][name]) for name in lpft_weights)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], (None, True)),
        (["finetune.head_from_frozen=false"], (None, False)),
        (["finetune.mode=lower_lr", "finetune.weight_ensemble=0.5"], (0.5, True)),
        (["finetune.mode=frozen"], (None, False)),  # the run is the frozen head
        (["finetune.mode=lora"], (None, False)),  # the head trains with the adapters from the start
    ],
    ids=["default", "off", "ensemble", "frozen", "lora"],
)
def test_lp_ft_is_annotations_default_where_the_backbone_trains(extra, expected):
    cfg = tasks.compose_config(["pretrained=x", "data.files=[a.h5ad]", *extra])
    assert check_frozen_stage(cfg) == expected


def test_the_fine_tuning_can_start_from_the_frozen_head(pretrained, cellbench, tmp_path):
    frozen = tasks.run(
        tasks.compose_config(
            overrides(pretrained, f"[{cellbench}]", tmp_path / "frozen", *SHORT, "finetune.mode=frozen")
        )
    )
    trained = load_pretrained(frozen["export"], device="cpu")
    names = trained.config.id2label

    def fresh(id2label):
        return ScFoundationForCellClassification.from_pretrained(
            pretrained, new_heads=["classifier"], id2label=id2label, label2id={v: k for k, v in id2label.items()}
        )

    model, untouched = fresh(names), fresh(names)
    start_from_frozen_head(model, frozen["export"])
    state, start = trained.state_dict(), untouched.state_dict()
    for name, value in model.state_dict().items():
        source = start if name.startswith("sc_foundation.") else state  # backbone as pretrained, head as trained
        torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(state[name], start[name]) for name in state if name.startswith("classifier."))

    other = dict(names) | {0: "not a class of that run"}
    with pytest.raises(ValueError, match="trained on other classes"):
        start_from_frozen_head(fresh(other), frozen["export"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["finetune.weight_ensemble=1.5"], r"must be in \(0, 1\).*got 1.5"),
        (["finetune.weight_ensemble=0.5", "finetune.mode=frozen"], "finetune.mode must be one of"),
        (["finetune.weight_ensemble=0.5", "task=integration", "batch_key=batch"], "is for task=annotation"),
        (["finetune.head_from_frozen=true", "task=imputation"], "head_from_frozen is for task=annotation"),
    ],
    ids=["alpha", "frozen_mode", "integration", "lp_ft_imputation"],
)
def test_a_weight_ensemble_that_cannot_run_is_refused_before_anything_is_written(
    pretrained, cellbench, tmp_path, extra, message
):
    out = tmp_path / "out"
    cfg = tasks.compose_config(overrides(pretrained, f"[{cellbench}]", out, *extra))
    with pytest.raises(ValueError, match=message):
        tasks.run(cfg)
    assert not out.exists()
