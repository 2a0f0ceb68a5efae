"""Smoke test of the inference benchmark: it embeds a handful of real cells end to end and reports sane figures."""

import json

import pytest

from tests.conftest import assert_positive

CELLS = 40


@pytest.fixture(scope="module")
def inference_benchmark(import_benchmark):
    return import_benchmark("inference")


def test_inference_benchmark(inference_benchmark, tmp_path, shared_data):
    out = tmp_path / "inference.json"
    argv = [
        "--out", str(out), "--sizes", "tiny", "--cells", str(CELLS), "--context", "64", "--batch-size", "16",
        "--warmup-cells", "8", "--repeats", "2", "--threads", "1", "--no-gpu", "--published",
        "--cache-dir", str(tmp_path / "cache"), "--data-dir", str(shared_data),
    ]  # fmt: skip
    payload = inference_benchmark.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert {"machine", "config", "cpu", "gpu"} <= set(payload)
    assert payload["machine"]["cpu_count"] >= 1 and payload["machine"]["torch"]
    config = payload["config"]
    assert config["cells"] == CELLS and config["dataset"] == "kang_ifnb" and config["context"] == 64
    assert config["torch_threads"] == 1 and config["batch_size"] == 16 and config["repeats"] == 2
    assert config["warmup_cells"] == 8 and config["encoding"] == "binned" and config["vocab_size"] > 100
    assert config["sizes"]["tiny"] == inference_benchmark.model_config("tiny")
    assert config["sizes"]["tiny"]["hidden_size"] == 64 and config["sizes"]["tiny"]["num_hidden_layers"] == 2
    # Truncated at the context (the <cls> token included), and Kang cells have more detected genes than 64.
    assert 32 < config["mean_tokens_per_cell"] <= 64

    assert set(payload["cpu"]) == {"tiny"} and set(payload["cpu"]["tiny"]) == {"fp32", "bf16"}
    peak = payload["cpu_matmul_peak_flops_per_s"]
    assert_positive(peak, ["fp32", "bf16"])
    for precision, tiny in payload["cpu"]["tiny"].items():
        assert_positive(tiny, ["cells_per_s", "tokens_per_s", "seconds", "params_backbone", "match_rate"])
        assert_positive(tiny, ["achieved_flops_per_s", "share_of_peak"])
        assert tiny["precision"] == precision and tiny["device"] == "cpu"
        assert tiny["cells"] == tiny["cells_embedded"] == CELLS and tiny["embedding_width"] == 64
        assert tiny["batch_size"] == 16 and tiny["threads"] == 1
        assert len(tiny["seconds_all"]) == 2
        assert min(tiny["seconds_all"]) <= tiny["seconds"] <= max(tiny["seconds_all"])
        assert tiny["cells_per_s"] == pytest.approx(CELLS / tiny["seconds"])
        assert tiny["tokens_per_s"] == pytest.approx(tiny["cells_per_s"] * config["mean_tokens_per_cell"])
        assert tiny["share_of_peak"] == pytest.approx(tiny["achieved_flops_per_s"] / peak[precision])
        if precision == "fp32" or payload["machine"]["fast_bf16"]:  # emulated bf16 has no meaningful peak
            assert tiny["share_of_peak"] < 1.0, "a forward pass cannot beat the machine's own matmul rate"
        assert 0.5 <= tiny["match_rate"] <= 1.0
    # 2·N·L + 4·n·L²·d per cell: at least the parameter term over the real tokens of every cell
    tiny = payload["cpu"]["tiny"]["fp32"]
    floor = 2 * tiny["params_backbone_non_embedding"] * CELLS * config["mean_tokens_per_cell"]
    assert tiny["achieved_flops_per_s"] * tiny["seconds"] > floor
    assert payload["gpu"] == {"measured": False, "reason": "--no-gpu"} and payload["published"] == {}
    # The exported models were temporary: only the slice and the store stay in the cache.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [
        f"inference-kang_ifnb-{CELLS}.h5ad",
        f"inference-store-inference-kang_ifnb-{CELLS}-ctx64-min1",
    ]


def test_published_architectures_against_their_references(inference_benchmark, tmp_path, shared_data, monkeypatch):
    """The published architectures, shrunk: ours and the reference forward on the same batches agree and are timed."""
    scgpt = {"d_model": 32, "nlayers": 2, "nhead": 4, "d_hid": 32, "vocab_size": 20_000}
    geneformer = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    monkeypatch.setitem(inference_benchmark.PUBLISHED, "scgpt", scgpt)
    monkeypatch.setitem(inference_benchmark.PUBLISHED, "geneformer_v1", geneformer)
    argv = [
        "--out", str(tmp_path / "inference.json"), "--sizes", "tiny", "--context", "64", "--cells", "24",
        "--warmup-cells", "8", "--published-cells", "12",
        "--batch-size", "8", "--threads", "1", "--no-gpu", "--cache-dir", str(tmp_path / "cache"),
        "--data-dir", str(shared_data),
    ]  # fmt: skip
    payload = inference_benchmark.main(argv)
    assert set(payload["published"]) == {"scgpt", "geneformer_v1"}
    for result in payload["published"].values():
        assert_positive(result, ["ours_forward_cells_per_s", "reference_forward_cells_per_s", "embed_cells_per_s"])
        assert result["cells"] == 12 and result["max_abs_difference"] <= 1e-5
        assert result["speedup"] == pytest.approx(
            result["ours_forward_cells_per_s"] / result["reference_forward_cells_per_s"]
        )
