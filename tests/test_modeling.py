"""Tests of the sc_foundation model on tiny configs and synthetic batches (CPU, seconds)."""

from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from sc_foundation.models import modeling
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import (
    ScFoundationForMaskedGeneModeling,
    ScFoundationForMaskedValueModeling,
    ScFoundationModel,
    flash_attn_varlen_func,
    varlen_attn,
)

# Special ids away from 0 so that nothing can rely on pad == 0.
PAD, CLS, MASK = 3, 4, 5
N_BINS = 11
ENCODINGS = ["binned", "continuous", "rank"]


def tiny_config(value_encoding: str = "binned", **overrides) -> ScFoundationConfig:
    settings = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        n_bins=N_BINS,
        max_position_embeddings=64,
        value_encoding=value_encoding,
        pad_token_id=PAD,
        cls_token_id=CLS,
        mask_token_id=MASK,
    )
    return ScFoundationConfig(**(settings | overrides))


def tiny_model(cls, value_encoding: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(value_encoding, **overrides))


def head_class(value_encoding: str):
    return ScFoundationForMaskedGeneModeling if value_encoding == "rank" else ScFoundationForMaskedValueModeling


def make_cells(lengths, value_encoding, seed=0):
    """One (gene ids, values) pair per cell, CLS first with value 0, like the tokenizer's output."""
    generator = torch.Generator().manual_seed(seed)
    cells = []
    for length in lengths:
        ids = torch.randperm(90, generator=generator)[: length - 1] + 10
        if value_encoding == "binned":
            values = torch.randint(1, N_BINS, (length - 1,), generator=generator).float()
        elif value_encoding == "continuous":
            values = torch.rand(length - 1, generator=generator) * 4
        else:
            values = torch.zeros(length - 1)
        cells.append((torch.cat([torch.tensor([CLS]), ids]), torch.cat([torch.zeros(1), values])))
    return cells


def pad_batch(cells):
    """The padded layout: input_ids, values, attention_mask, each (B, L)."""
    length = max(len(ids) for ids, _ in cells)
    input_ids = torch.full((len(cells), length), PAD)
    values = torch.zeros(len(cells), length)
    attention_mask = torch.zeros(len(cells), length, dtype=torch.bool)
    for row, (ids, vals) in enumerate(cells):
        input_ids[row, : len(ids)], values[row, : len(ids)], attention_mask[row, : len(ids)] = ids, vals, True
    return {"input_ids": input_ids, "values": values, "attention_mask": attention_mask}


def pack_batch(cells):
    """The packed layout: input_ids, values (1, T), cu_seqlens (n_cells + 1,), max_seqlen."""
    lengths = torch.tensor([len(ids) for ids, _ in cells])
    return {
        "input_ids": torch.cat([ids for ids, _ in cells])[None],
        "values": torch.cat([vals for _, vals in cells])[None],
        "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()]),
        "max_seqlen": int(lengths.max()),
    }


def add_masking(batch, value_encoding, seed=0):
    """What the collator adds for pretraining: a mask at ~30% of the genes, the labels, the hidden inputs."""
    input_ids = batch["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    real = input_ids != PAD
    real &= input_ids != CLS
    mask = (torch.rand(input_ids.shape, generator=generator) < 0.3) & real
    mask[0, 1] = True  # at least one masked position
    if value_encoding == "rank":
        labels = torch.where(mask, input_ids, -100)
        return batch | {"input_ids": input_ids.masked_fill(mask, MASK), "mask": mask, "labels": labels}
    labels = torch.where(mask, batch["values"], 0.0)
    return batch | {"values": batch["values"].masked_fill(mask, 0.0), "mask": mask, "labels": labels}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("value_encoding", ENCODINGS)
def test_forward_shapes(value_encoding, pooling):
    model = tiny_model(ScFoundationModel, value_encoding, pooling=pooling).eval()
    batch = pad_batch(make_cells([7, 12, 9], value_encoding))
    out = model(**batch, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 12, 32)
    assert out.cell_embedding.shape == (3, 32)
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (3, 12, 32)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # every parameter was initialised


@pytest.mark.parametrize("value_encoding", ENCODINGS)
def test_head_loss_and_backward(value_encoding):
    conditions = {"condition_vocab_sizes": {"batch": 3}}
    extra = {} if value_encoding == "rank" else {"mvc_weight": 0.5}
    model = tiny_model(head_class(value_encoding), value_encoding, **conditions, **extra).train()
    batch = add_masking(pad_batch(make_cells([7, 12, 9], value_encoding)), value_encoding)
    out = model(**batch, condition_ids={"batch": torch.tensor([0, 2, 1])})
    n_masked = int(batch["mask"].sum())
    if value_encoding == "binned":
        assert out.logits.shape == (n_masked, N_BINS) and out.mvc_loss is not None
    elif value_encoding == "continuous":
        assert out.predictions.shape == (n_masked,) and out.mvc_loss is not None
    else:
        assert out.logits.shape == (n_masked, 100)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("value_encoding", ENCODINGS)
def test_padding_invariance(value_encoding, pooling):
    model = tiny_model(ScFoundationModel, value_encoding, pooling=pooling).eval()
    short, long = make_cells([6, 15], value_encoding)
    with torch.no_grad():
        alone = model(**pad_batch([short])).cell_embedding[0]
        padded = model(**pad_batch([short, long])).cell_embedding[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value_encoding", ENCODINGS)
def test_packed_matches_padded(value_encoding):
    extra = {} if value_encoding == "rank" else {"mvc_weight": 0.5}  # the MVC term maps tokens to their cells
    model = tiny_model(head_class(value_encoding), value_encoding, condition_vocab_sizes={"batch": 3}, **extra)
    model.eval()
    cells = make_cells([6, 15, 9], value_encoding)
    conditions = {"condition_ids": {"batch": torch.tensor([2, 0, 1])}}
    padded = add_masking(pad_batch(cells), value_encoding)
    real = padded["attention_mask"]
    # The same masking, laid out packed: the real tokens of each row, end to end.
    packed = pack_batch(cells) | {key: padded[key][real][None] for key in ("input_ids", "values", "mask", "labels")}
    backbone_inputs = ("input_ids", "values", "attention_mask", "mask", "cu_seqlens", "max_seqlen")
    with torch.no_grad():
        out_padded = model(**padded, **conditions)
        out_packed = model(**packed, **conditions)
        hidden_padded = model.sc_foundation(**{k: v for k, v in padded.items() if k in backbone_inputs}, **conditions)
        hidden_packed = model.sc_foundation(**{k: v for k, v in packed.items() if k in backbone_inputs}, **conditions)
    torch.testing.assert_close(out_packed.cell_embedding, out_padded.cell_embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_packed.loss, out_padded.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        hidden_packed.last_hidden_state[0], hidden_padded.last_hidden_state[real], atol=1e-5, rtol=0
    )


def test_packed_mean_pooling_matches_padded():
    model = tiny_model(ScFoundationModel, "binned", pooling="mean").eval()
    cells = make_cells([6, 15, 9], "binned")
    with torch.no_grad():
        padded = model(**pad_batch(cells)).cell_embedding
        packed = model(**pack_batch(cells)).cell_embedding
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


PUBLISHED_STYLES = {
    "scgpt": dict(
        norm_placement="post",
        final_norm=False,
        hidden_act="relu",
        embedding_norm="separate",
        bin_embedding="mlp",
        normalize_cell_embedding=True,
    ),
    "geneformer": dict(norm_placement="post", final_norm=False, hidden_act="relu", pooling="mean", pooling_layer=-2),
}


@pytest.mark.parametrize("style", sorted(PUBLISHED_STYLES))
def test_published_architecture_options(style):
    """The options the published architectures need: packed equals padded, padding changes nothing, gradients
    reach every weight that feeds the output, and the options change the parameters only where they should."""
    encoding = "binned" if style == "scgpt" else "rank"
    options = PUBLISHED_STYLES[style]
    model = tiny_model(head_class(encoding), encoding, **options).eval()
    cells = make_cells([6, 15, 9], encoding)
    with torch.no_grad():
        padded = model.sc_foundation(**pad_batch(cells))
        packed = model.sc_foundation(**pack_batch(cells))
        alone = model.sc_foundation(**pad_batch(cells[:1])).cell_embedding
    torch.testing.assert_close(packed.cell_embedding, padded.cell_embedding, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0], padded.cell_embedding[0], atol=1e-5, rtol=0)
    names = {name for name, _ in model.sc_foundation.named_parameters()}
    assert "norm.weight" not in names  # post-norm blocks: no final norm
    if style == "scgpt":
        assert {"embeddings.gene_norm.weight", "embeddings.value_norm.weight", "embeddings.mask_value"} <= names
        torch.testing.assert_close(padded.cell_embedding.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    model.train()
    batch = add_masking(pad_batch(cells), encoding)
    model(**batch).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_default_options_keep_the_parameters():
    """Configs without the new options build the same parameters as before them (exports stay loadable)."""
    model = tiny_model(ScFoundationModel, "binned")
    names = {name for name, _ in model.named_parameters()}
    assert {"norm.weight", "embeddings.norm.weight", "embeddings.value_embeddings.weight"} <= names
    assert not any("gene_norm" in name or "value_norm" in name or "mask_value" in name for name in names)


def test_eos_is_left_out_of_mean_pooling():
    eos = 6
    model = tiny_model(ScFoundationModel, "rank", pooling="mean", eos_token_id=eos).eval()
    ids, values = make_cells([8], "rank")[0]
    with_eos = (torch.cat([ids, torch.tensor([eos])]), torch.cat([values, torch.zeros(1)]))
    with torch.no_grad():
        out = model(**pad_batch([with_eos]))
    expected = out.last_hidden_state[0, 1:-1].mean(0)  # neither <cls> nor <eos>
    torch.testing.assert_close(out.cell_embedding[0], expected, atol=1e-6, rtol=0)


def test_varlen_kernel_layout_on_cpu(monkeypatch):
    """The varlen branch (flat (T, nh, hd) tokens) checked on CPU, with a per-cell SDPA standing in for the kernel."""

    def reference_kernel(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0):
        out = torch.empty_like(q)
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            cell = [x[start:end].transpose(0, 1) for x in (q, k, v)]  # each (nh, n, hd)
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(*cell).transpose(0, 1)
        return out

    monkeypatch.setattr(modeling, "flash_attn_varlen_func", reference_kernel)
    monkeypatch.setattr(ScFoundationModel, "_use_varlen_kernel", lambda self, hidden: True)
    model = tiny_model(ScFoundationModel, "continuous", attention_backend="flash_varlen").eval()
    cells = make_cells([6, 15, 9], "continuous")
    with torch.no_grad():
        padded = model(**pad_batch(cells)).cell_embedding
        packed = model(**pack_batch(cells)).cell_embedding
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


@pytest.mark.parametrize("value_encoding", ENCODINGS)
def test_save_and_load_round_trip(value_encoding, tmp_path):
    model = tiny_model(head_class(value_encoding), value_encoding).eval()
    batch = add_masking(pad_batch(make_cells([7, 12], value_encoding)), value_encoding)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    backbone = AutoModel.from_pretrained(tmp_path).eval()  # the backbone out of a head's export
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ScFoundationConfig)
    assert isinstance(backbone, ScFoundationModel)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert set(saved) == set(restored)
    for name, value in saved.items():  # the round trip itself is exact, bit for bit
        assert torch.equal(restored[name], value), name
    with torch.no_grad():
        expected, got = model(**batch), loaded(**batch)
        embedding = backbone(**{k: v for k, v in batch.items() if k != "labels"}).cell_embedding
    # Identical weights in other buffers can take other CPU kernel paths (oneDNN picks by alignment): outputs may
    # differ in the last bit (7e-9 seen on this VM), so they are compared to 1e-6, the weights above exactly.
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(embedding, expected.cell_embedding, atol=1e-6, rtol=0)
    if value_encoding == "rank":
        assert isinstance(AutoModelForMaskedLM.from_pretrained(tmp_path), ScFoundationForMaskedGeneModeling)


def test_strict_loading_rejects_missing_and_unexpected_keys(tmp_path):
    tiny_model(ScFoundationForMaskedValueModeling, "binned").save_pretrained(tmp_path)
    weights_file = tmp_path / "model.safetensors"
    weights = load_file(weights_file)

    del weights["sc_foundation.layers.1.mlp.fc_in.weight"]
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['sc_foundation.layers.1.mlp.fc_in.weight'\]"):
        ScFoundationForMaskedValueModeling.from_pretrained(tmp_path)

    weights = load_file(weights_file) | {"sc_foundation.layers.1.mlp.fc_in.weight": torch.zeros(64, 32)}
    weights["sc_foundation.layers.0.attn.extra"] = torch.zeros(3)
    weights["value_head.extra"] = torch.zeros(3)
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected in the checkpoint: \['sc_foundation.layers.0.attn.extra'\]"):
        ScFoundationModel.from_pretrained(tmp_path)  # value_head.* is a foreign head to the backbone: dropped
    with pytest.raises(ValueError, match=r"\['sc_foundation.layers.0.attn.extra', 'value_head.extra'\]"):
        ScFoundationForMaskedValueModeling.from_pretrained(tmp_path)

    tiny_model(ScFoundationModel, "binned").save_pretrained(tmp_path / "backbone")
    weights = load_file(tmp_path / "backbone" / "model.safetensors") | {"layers.0.extra": torch.zeros(3)}
    save_file(weights, tmp_path / "backbone" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected in the checkpoint: \['layers.0.extra'\]"):
        ScFoundationForMaskedValueModeling.from_pretrained(tmp_path / "backbone", new_heads=["value_head"])

    del weights["layers.0.extra"]
    weights["norm.weight"] = torch.zeros(5)
    save_file(weights, tmp_path / "backbone" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"other shapes in the checkpoint: \[\('norm.weight'"):
        ScFoundationModel.from_pretrained(tmp_path / "backbone", ignore_mismatched_sizes=True)


def test_new_heads_must_be_declared_and_whole(tmp_path):
    tiny_model(ScFoundationModel, "binned").save_pretrained(tmp_path / "backbone")
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['value_head.proj.bias'"):
        ScFoundationForMaskedValueModeling.from_pretrained(tmp_path / "backbone")
    with pytest.raises(ValueError, match="not heads of"):
        ScFoundationForMaskedValueModeling.from_pretrained(tmp_path / "backbone", new_heads=["value_haed"])
    model = ScFoundationForMaskedValueModeling.from_pretrained(
        tmp_path / "backbone", new_heads=["value_head", "mvc_head"], mvc_weight=0.5
    )
    assert model.mvc_head is not None

    model.save_pretrained(tmp_path / "partial")
    weights = load_file(tmp_path / "partial" / "model.safetensors")
    del weights["value_head.proj.weight"]
    save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"\['value_head.proj.weight'\]"):  # partly there: not new, broken
        ScFoundationForMaskedValueModeling.from_pretrained(tmp_path / "partial", new_heads=["value_head"])


@pytest.mark.parametrize("value_encoding", ["continuous", "rank"])
def test_gradient_checkpointing_matches(value_encoding):
    batch = add_masking(pad_batch(make_cells([7, 12, 9], value_encoding)), value_encoding)
    results = []
    for checkpointed in (False, True):
        model = tiny_model(head_class(value_encoding), value_encoding).train()
        if checkpointed:
            model.activation_checkpointing_enable()
            assert model.is_gradient_checkpointing
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the RNG state
        loss = model(**batch).loss
        loss.backward()
        results.append((loss, {name: p.grad for name, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("value_encoding", ["binned", "continuous"])
def test_masked_values_are_hidden(value_encoding):
    model = tiny_model(ScFoundationForMaskedValueModeling, value_encoding).eval()
    batch = pad_batch(make_cells([9, 9], value_encoding))
    mask = torch.zeros_like(batch["attention_mask"])
    mask[:, 4] = True

    def predict(values):
        with torch.no_grad():
            out = model(**batch | {"values": values}, mask=mask)
        return out.logits if value_encoding == "binned" else out.predictions

    reference = predict(batch["values"])
    hidden_changed = batch["values"].clone()
    hidden_changed[:, 4] = torch.tensor([7.0, 2.0])  # the value behind the mask
    torch.testing.assert_close(predict(hidden_changed), reference, atol=0, rtol=0)
    visible_changed = batch["values"].clone()
    visible_changed[:, 5] = torch.tensor([7.0, 2.0])  # an unmasked value: the predictions must see it
    assert not torch.allclose(predict(visible_changed), reference)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30}, "divisible"),
        ({"value_encoding": "counts"}, "expected one of"),
        ({"pad_token_id": CLS}, "distinct"),
        ({"mask_token_id": 100}, "outside the vocabulary"),
        ({"value_encoding": "rank", "mvc_weight": 1.0}, "rank encoding"),
        ({"condition_vocab_sizes": {"lab.site": 2}}, "identifier"),
        ({"hidden_dropout_prob": 1.0}, r"\[0, 1\)"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        tiny_config(**overrides)


def test_config_saves_every_field(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    assert '"pad_token_id": 3' in saved and '"attention_backend": "sdpa"' in saved  # the latter is a default


def test_bad_batches_are_rejected():
    model = tiny_model(ScFoundationModel, "binned", condition_vocab_sizes={"batch": 2}).eval()
    batch = pad_batch(make_cells([5, 7], "binned")) | {"condition_ids": {"batch": torch.tensor([0, 1])}}
    with pytest.raises(ValueError, match="needs values"):
        model(**batch | {"values": None})
    with pytest.raises(ValueError, match="exactly the conditions"):
        model(**batch | {"condition_ids": None})
    with pytest.raises(ValueError, match="cls_token_id at the start"):
        model(**batch | {"input_ids": batch["input_ids"].roll(1, dims=1)})
    packed = pack_batch(make_cells([5, 7], "binned"))
    with pytest.raises(ValueError, match="no attention_mask"):
        model(**packed, attention_mask=packed["input_ids"] > 0, condition_ids=batch["condition_ids"])
    with pytest.raises(ValueError, match="needs the rank encoding"):
        ScFoundationForMaskedGeneModeling(tiny_config("binned"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(flash_attn_varlen_func is None and varlen_attn is None, reason="needs a varlen kernel")
def test_varlen_kernel_matches_sdpa_in_bf16():
    torch.manual_seed(0)
    config = tiny_config("binned", hidden_size=128, num_attention_heads=4, attention_backend="flash_varlen")
    model = ScFoundationModel(config).cuda().to(torch.bfloat16).eval()
    cells = make_cells([40, 90, 17, 64], "binned")
    padded = {key: value.cuda() for key, value in pad_batch(cells).items()}
    packed = {key: value.cuda() if torch.is_tensor(value) else value for key, value in pack_batch(cells).items()}
    with torch.no_grad():
        reference = model(**padded)
        varlen = model(**packed)
    assert model._use_varlen_kernel(varlen.last_hidden_state)
    torch.testing.assert_close(
        varlen.last_hidden_state[0], reference.last_hidden_state[padded["attention_mask"]], atol=3e-2, rtol=3e-2
    )
    torch.testing.assert_close(varlen.cell_embedding, reference.cell_embedding, atol=3e-2, rtol=3e-2)


def test_varlen_kernel_only_where_it_can_run(monkeypatch):
    """Both varlen kernels are FlashAttention-2 (CUDA, fp16/bf16, compute capability 8.0+): an fp32 run or an older
    GPU falls back to SDPA instead of crashing in the kernel. Checked on CPU with a stand-in kernel and GPU."""
    monkeypatch.setattr(modeling, "varlen_attn", object())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    assert modeling.varlen_unavailable(cuda, torch.bfloat16) is None
    assert modeling.varlen_unavailable(cuda, torch.float16) is None
    assert "fp16 or bf16 only" in modeling.varlen_unavailable(cuda, torch.float32)
    assert "CUDA only" in modeling.varlen_unavailable(torch.device("cpu"), torch.bfloat16)
    model = tiny_model(ScFoundationModel, "binned", attention_backend="flash_varlen")
    hidden = SimpleNamespace(device=cuda, dtype=torch.float32)  # what the backbone reads of its hidden states
    assert not model._use_varlen_kernel(hidden), "fp32 on CUDA must fall back"
    assert model._use_varlen_kernel(SimpleNamespace(device=cuda, dtype=torch.bfloat16))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100
    assert "8.0" in modeling.varlen_unavailable(cuda, torch.float16)
    assert not model._use_varlen_kernel(SimpleNamespace(device=cuda, dtype=torch.bfloat16))
    monkeypatch.setattr(modeling, "varlen_attn", None)
    monkeypatch.setattr(modeling, "flash_attn_varlen_func", None)
    assert "installed" in modeling.varlen_unavailable(cuda, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(flash_attn_varlen_func is None and varlen_attn is None, reason="needs a varlen kernel")
def test_fp32_packed_batches_on_cuda_fall_back_and_match_padding():
    """An fp32 model given packed batches with attention_backend=flash_varlen runs (through SDPA's block-diagonal
    mask), and so does a bf16 autocast forward (through the kernel)."""
    torch.manual_seed(0)
    config = tiny_config("binned", hidden_size=128, num_attention_heads=4, attention_backend="flash_varlen")
    model = ScFoundationModel(config).cuda().eval()
    cells = make_cells([40, 90, 17, 64], "binned")
    padded = {key: value.cuda() for key, value in pad_batch(cells).items()}
    packed = {key: value.cuda() if torch.is_tensor(value) else value for key, value in pack_batch(cells).items()}
    with torch.no_grad():
        reference = model(**padded)
        fp32 = model(**packed)
        assert not model._use_varlen_kernel(fp32.last_hidden_state)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(**packed)
            assert model._use_varlen_kernel(fp32.last_hidden_state)
    torch.testing.assert_close(fp32.cell_embedding, reference.cell_embedding, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bf16.cell_embedding.float(), reference.cell_embedding, atol=5e-2, rtol=5e-2)
