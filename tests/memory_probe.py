"""One fine-tuning step in a fresh process, its measured peak resident memory beside the plan's estimate:
``python -m tests.memory_probe '{"hidden_size": 128, ...}'`` prints a JSON record (tests/test_memory.py)."""

import json
import sys
import time

import psutil
import torch

from sc_foundation.models.adapters import LoraSettings, attach_lora
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import ScFoundationForCellClassification
from sc_foundation.training.memory import estimate_training_memory, peak_resident, release_freed_memory


def main(settings: dict) -> dict:
    """Train ``settings["steps"]`` AdamW steps of a classification head on random tokens of ``batch_size`` cells x
    ``length``; return the estimate (made first) and the measured rise of the peak resident memory over the baseline."""
    if settings.get("release_freed_memory", True):
        release_freed_memory()
    torch.manual_seed(0)
    architecture = dict(
        **{
            "vocab_size": 2000,
            "num_labels": 5,
            "pooling": "mean",
            "num_attention_heads": 4,
            **settings.get("architecture", {}),
        }
    )
    model = ScFoundationForCellClassification(ScFoundationConfig(**architecture)).train()
    if settings["mode"] == "lora":
        attach_lora(model, LoraSettings(rank=8), "none")
    if settings["checkpointing"]:
        model.activation_checkpointing_enable()
    cells, length = settings["batch_size"], settings["length"]
    batch = {
        "input_ids": torch.randint(5, 2000, (cells, length)),
        "values": torch.randint(1, 51, (cells, length)).float(),
        "attention_mask": torch.ones(cells, length, dtype=torch.bool),
        "labels": torch.randint(0, 5, (cells,)),
    }
    bf16 = settings["bf16"]
    estimate = estimate_training_memory(
        model, batch, batch_size=cells, length=length, bf16=bf16, gradient_checkpointing=settings["checkpointing"]
    )
    baseline = psutil.Process().memory_info().rss
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    started = time.perf_counter()
    for _ in range(settings.get("steps", 2)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = peak_resident()
    return {
        "estimated_added": estimate.added,
        "step_peak": estimate.step_peak,
        "measured_added": peak - baseline,
        "baseline": baseline,
        "seconds": time.perf_counter() - started,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
