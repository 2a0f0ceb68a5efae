"""finetune.mode=lora: LoRA on the backbone of every task head, merged and separate exports, and load_pretrained on
top of the base export."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sc_foundation import tasks
from sc_foundation.data.tokenization import GeneTokenizer
from sc_foundation.models import adapters
from sc_foundation.models.export import export_pretrained, load_pretrained
from sc_foundation.tasks.common import predict
from tests.test_finetune import compose_finetune, overrides
from tests.test_multimodal import ECCITE_ADT, ECCITE_RNA, multimodal_overrides

LORA = ("finetune.mode=lora", "finetune.lora.rank=4", "finetune.lora.alpha=8")


def backbone_weights(model) -> dict[str, torch.Tensor]:
    """The backbone's plain weights (LoRA's ``base_layer`` names read as the plain ones)."""
    state = model.base_model.state_dict()
    return {key.replace(".base_layer.", "."): value for key, value in state.items() if ".lora_" not in key}


def first_batch(result) -> dict[str, torch.Tensor]:
    return next(iter(result["datamodule"].val_dataloader()))


def outputs(model, batch, field):
    from sc_foundation.training.lightning_module import TrainingModule

    with torch.no_grad():
        return getattr(TrainingModule(model.eval())(batch), field)


@pytest.fixture(scope="module")
def lora_annotation(pretrained, cellbench, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_annotation")
    files = f"[{{path: {cellbench}, batch_key: batch}}]"
    extra = ("trainer.max_epochs=2", *LORA, "finetune.lora.merge=false")
    return tasks.run(compose_finetune(overrides(pretrained, files, out, *extra)))


def test_lora_trains_the_adapters_and_the_head_only(lora_annotation, pretrained):
    model = lora_annotation["module"].model
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name or name.startswith("classifier.") for name in trainable)
    assert any(name.startswith("classifier.") for name in trainable)
    adapted = {name.split(".lora_")[0] for name in trainable if ".lora_" in name}
    assert {name.rsplit(".", 1)[1] for name in adapted} == set(adapters.BACKBONE_PROJECTIONS)
    assert len(adapted) == 4 * model.config.num_hidden_layers
    base = load_pretrained(pretrained, device="cpu").base_model.state_dict()
    for key, value in backbone_weights(model).items():  # the backbone itself never moved
        torch.testing.assert_close(value, base[key], rtol=0, atol=0)
    lora_b = [p for name, p in model.named_parameters() if ".lora_B." in name]
    assert all(float(p.detach().abs().max()) > 0 for p in lora_b)  # B starts at zero: the adapters learnt
    assert lora_annotation["metrics"]["finetune_mode"] == "lora"


def test_separate_export_is_small_and_loads_on_its_base(lora_annotation, pretrained):
    best = lora_annotation["export"]
    record = json.loads((best / adapters.ADAPTERS_FILE).read_text())
    assert record["base"]["path"] == str(pretrained.absolute()) and record["lora"]["rank"] == 4
    stored = load_file(best / "model.safetensors")
    assert stored and all(".lora_" in key or key.startswith("classifier.") for key in stored)
    base_size = (pretrained / "model.safetensors").stat().st_size
    assert (best / "model.safetensors").stat().st_size < base_size / 2

    batch = first_batch(lora_annotation)
    on_recorded_base = load_pretrained(best, device="cpu")
    on_given_base = load_pretrained(pretrained, device="cpu", adapters=best)
    assert type(on_recorded_base).__name__ == "ScFoundationForCellClassification"
    assert not adapters._lora_layers(on_recorded_base)  # merged into plain layers
    # the novelty reference travels in the adapter folder, which the run scored
    assert on_recorded_base.novelty_reference is not None and on_given_base.novelty_reference is not None
    assert on_recorded_base.gene_tokenizer.config == GeneTokenizer.from_pretrained(best).config  # the task's panel
    logits = outputs(on_recorded_base, batch, "logits")
    torch.testing.assert_close(logits, outputs(on_given_base, batch, "logits"), rtol=0, atol=0)
    # the task scored this export: its test predictions give the reported accuracy
    logits, cells = predict(on_recorded_base, lora_annotation["datamodule"].test_dataloader())
    accuracy = float((logits.argmax(1) == lora_annotation["labels"][cells]).mean())
    assert accuracy == pytest.approx(lora_annotation["metrics"]["model"]["accuracy"], abs=1e-9)


def test_merged_export_reproduces_the_lora_model(lora_annotation, pretrained, tmp_path):
    model = lora_annotation["module"].model  # the separate run's model, exported merged here
    batch = first_batch(lora_annotation)
    expected = outputs(model, batch, "logits")
    settings = model.lora_settings
    model.lora_settings = type(settings)(**{**settings.__dict__, "merge": True})
    try:
        weights, extra = adapters.export_state(model, model.state_dict())
    finally:
        model.lora_settings = settings
    assert not extra and not any(".lora_" in key or "base_layer" in key for key in weights)
    tokenizer = GeneTokenizer.from_pretrained(lora_annotation["export"])
    directory = export_pretrained(model, tokenizer, tmp_path / "merged", state_dict=weights)
    merged = load_pretrained(directory, device="cpu")
    torch.testing.assert_close(outputs(merged, batch, "logits"), expected, rtol=1e-4, atol=1e-5)


def test_adapters_and_their_base_are_verified_against_their_checksums(lora_annotation, pretrained, tmp_path):
    """A flipped byte in the adapter folder, or in the base export it loads on, is named before anything loads;
    verify=False skips the check."""
    import shutil

    adapter_copy = shutil.copytree(lora_annotation["export"], tmp_path / "adapters")
    base_copy = shutil.copytree(pretrained, tmp_path / "base")
    for folder in (adapter_copy, base_copy):
        target = folder / "model.safetensors"
        original = target.read_bytes()
        target.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ValueError, match=r"model\.safetensors") as refused:
            load_pretrained(base_copy, device="cpu", adapters=adapter_copy)
        assert folder.name in str(refused.value)
        target.write_bytes(original)
    assert load_pretrained(base_copy, device="cpu", adapters=adapter_copy, verify=False) is not None


def test_adapters_on_another_base_are_refused(lora_annotation, tmp_path):
    other = load_pretrained(lora_annotation["export"], device="cpu")  # a merged backbone: not the base
    base = export_pretrained(other, other.gene_tokenizer, tmp_path / "other_base")
    with pytest.raises(ValueError, match="trained on another backbone"):
        load_pretrained(base, device="cpu", adapters=lora_annotation["export"])


@pytest.mark.parametrize("task", ["integration", "imputation", "multimodal"])
def test_lora_on_every_head(task, pretrained, cellbench, shared_data, tmp_path):
    """One epoch of LoRA on each other task head: the backbone stays, adapters and heads train, and the merged export
    (what the task scored) reproduces the trained model."""
    short = ("trainer.max_epochs=1", "baselines.scvi=false", *LORA)
    if task == "multimodal":
        cfg = compose_finetune(
            multimodal_overrides(pretrained, shared_data / ECCITE_RNA, shared_data / ECCITE_ADT, tmp_path, "protein")
            + list(short)
        )
    else:
        extra = ["batch_key=batch", "baselines.n_pcs=20"] if task == "integration" else ["decoder_genes=500"]
        cfg = compose_finetune(overrides(pretrained, f"[{cellbench}]", tmp_path, f"task={task}", *extra, *short))
    result = tasks.run(cfg)
    model = result["module"].model
    heads = adapters.head_names(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name or name.split(".")[0] in heads for name in trainable)
    base = load_pretrained(pretrained, device="cpu").base_model.state_dict()
    for key, value in backbone_weights(model).items():
        torch.testing.assert_close(value, base[key], rtol=0, atol=0)
    exported = load_pretrained(result["export"], device="cpu")
    assert not adapters._lora_layers(exported) and type(exported) is type(model)
    batch = first_batch(result)
    field = "cell_embedding"
    torch.testing.assert_close(outputs(exported, batch, field), outputs(model, batch, field), rtol=1e-4, atol=1e-5)
