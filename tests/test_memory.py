"""The memory plan (sc_foundation.training.memory): the estimate against the measured peak of a real training step,
and runs refused before they start, with settings that fit."""

import json
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from sc_foundation import tasks
from sc_foundation.models.adapters import LoraSettings, lora_parameter_count
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import ScFoundationForCellClassification
from sc_foundation.training.memory import GIB, MemoryPlanError, estimate_training_memory, plan_training
from tests.test_finetune import compose_finetune, overrides

ROOT = Path(__file__).parents[1]
PROBE = {"architecture": {"hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 256}, "steps": 2}


def probe(**settings) -> dict:
    """tests/memory_probe.py in a fresh process: its estimate and its measured peak rise, in bytes."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.memory_probe", json.dumps(PROBE | settings)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "settings",
    [
        {"mode": "full", "checkpointing": False, "bf16": False},
        {"mode": "lora", "checkpointing": True, "bf16": True},
    ],
    ids=["full-fp32", "lora-checkpointing-bf16"],
)
def test_estimate_bounds_the_measured_peak(settings):
    """The plan neither under-estimates a real step's resident peak nor over-estimates it by more than half."""
    record = probe(batch_size=16, length=768, **settings)
    measured, estimated = record["measured_added"], record["estimated_added"]
    assert measured > 50 * 2**20  # the step really allocates (the test would mean nothing otherwise)
    assert measured <= estimated <= 1.5 * measured, record


def classification_model():
    config = ScFoundationConfig(
        vocab_size=2000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
    )
    config.num_labels, config.pooling = 5, "mean"
    return ScFoundationForCellClassification(config).train()


def test_refusal_names_settings_that_fit():
    model = classification_model()
    batch = {
        "input_ids": torch.randint(5, 2000, (4, 64)),
        "values": torch.randint(1, 51, (4, 64)).float(),
        "attention_mask": torch.ones(4, 64, dtype=torch.bool),
        "labels": torch.randint(0, 5, (4,)),
    }
    run = {"batch_size": 32, "accumulate_grad_batches": 1, "gradient_checkpointing": False, "lora": False}
    baseline = psutil.Process().memory_info().rss

    def estimate(batch_size, checkpointing):
        return estimate_training_memory(
            model, batch, batch_size=batch_size, length=1024, bf16=False, gradient_checkpointing=checkpointing
        )

    planned, smaller = estimate(32, False), estimate(8, True)
    limit = baseline + (smaller.added + planned.added) // 2  # the run does not fit; a quarter batch, checkpointed, does
    lora = lora_parameter_count(model, LoraSettings())
    with pytest.raises(MemoryPlanError) as refused:
        plan_training(model, batch, run, bf16=False, length=1024, limit=limit, lora_trainable=lora)
    message = str(refused.value)
    assert "Settings that would fit" in message and "memory.limit_gb" in message
    proposals = re.findall(r"^  (.+)  \(estimated peak ([\d.]+) GiB\)$", message, flags=re.MULTILINE)
    assert proposals, message
    for overrides_text, peak in proposals:  # each proposal's own estimate is within the limit
        assert float(peak) * GIB <= limit + 0.01 * GIB
        assert re.fullmatch(
            r"((data\.batch_size|trainer\.accumulate_grad_batches)=\d+|gradient_checkpointing=true|finetune\.mode=lora)"
            r"( \S+)*",
            overrides_text,
        )
    assert any("gradient_checkpointing=true" in text for text, _ in proposals)
    assert any("trainer.accumulate_grad_batches=" in text for text, _ in proposals)  # the same cells per step


def test_task_run_that_cannot_fit_is_refused_before_training(pretrained, cellbench, tmp_path):
    limit = psutil.Process().memory_info().rss / GIB + 0.001  # far below what any step adds
    cfg = compose_finetune(overrides(pretrained, f"[{cellbench}]", tmp_path, f"memory.limit_gb={limit:.4f}"))
    with pytest.raises(MemoryPlanError, match=r"would need about .* GiB at its peak"):
        tasks.run(cfg)
    assert not (tmp_path / "export").exists() and not (tmp_path / "metrics.json").exists()
