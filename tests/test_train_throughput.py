"""Smoke test of the training-throughput benchmark: it runs end to end at a tiny size and reports sane figures."""

import json

import pytest

from tests.conftest import assert_positive


@pytest.fixture(scope="module")
def train_throughput(import_benchmark):
    return import_benchmark("train_throughput")


def test_train_throughput_benchmark(train_throughput, tmp_path, shared_data):
    out = tmp_path / "train_throughput.json"
    argv = [
        "--out", str(out), "--sizes", "tiny", "--cells", "120", "--context", "64", "--batch-size", "4",
        "--steps", "2", "--warmup-steps", "1", "--threads", "1",
        "--cache-dir", str(tmp_path / "cache"), "--data-dir", str(shared_data),
    ]  # fmt: skip
    payload = train_throughput.main(argv)

    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    assert {"machine", "config", "tiny"} <= set(payload) and "small" not in payload
    assert payload["machine"]["cpu_count"] >= 1 and payload["machine"]["torch"]
    config = payload["config"]
    assert config["torch_threads"] == 1 and config["context"] == 64 and config["batch_size"] == 4
    assert config["steps"] == 2 and config["warmup_steps"] == 1 and config["cells"] == 120
    assert (
        config["sizes"]["tiny"]
        == train_throughput.model_shape("tiny")
        == {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 256,
        }
    )

    tiny = payload["tiny"]
    assert tiny["timed_steps"] == 2 and tiny["cells"] == 8
    assert 0 < tiny["tokens"] <= tiny["padded_tokens"] <= 8 * 64
    for model in ("ours", "hf_bert"):
        record = tiny[model]
        assert_positive(
            record,
            ["cells_per_s", "tokens_per_s", "padded_tokens_per_s", "seconds_per_step", "seconds_per_step_median",
             "params_total", "params_non_embedding", "first_loss", "last_loss"],
        )  # fmt: skip
        assert record["params_non_embedding"] < record["params_total"]
        assert record["tokens_per_s"] <= record["padded_tokens_per_s"]
        assert record["tokens_per_s"] / record["cells_per_s"] == pytest.approx(tiny["tokens"] / tiny["cells"])
    # Same width and depth: the encoders' non-embedding sizes are close, the vocabulary tables identical.
    ours, bert = tiny["ours"], tiny["hf_bert"]
    assert 0.8 < ours["params_non_embedding"] / bert["params_non_embedding"] < 1.25
    assert tiny["ratio_ours_vs_hf"] == pytest.approx(ours["cells_per_s"] / bert["cells_per_s"])
