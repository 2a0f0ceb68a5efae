"""Fine-tuning runs one after another in the processes of one launch (``torchrun --nproc_per_node=2
tests/finetune_worker.py CASES.json OUT``), for tests of fine-tuning under DDP: CASES.json maps a case name to its
finetune.yaml overrides. Each rank writes ``OUT/<case>/rank<r>.json``: whether ``run`` returned metrics there, and
the ``val/*`` metrics this rank saw after each validation."""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl

from sc_foundation import tasks


class RecordValidation(pl.Callback):
    def __init__(self):
        self.validations = []

    def on_validation_end(self, trainer, module):
        metrics = trainer.callback_metrics
        self.validations.append({key: float(value) for key, value in metrics.items() if key.startswith("val/")})


cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
for name, overrides in cases.items():
    recorder = RecordValidation()
    result = tasks.run(tasks.compose_config(overrides), [recorder])
    rank = result["trainer"].global_rank
    (out / name).mkdir(parents=True, exist_ok=True)
    record = {"metrics": result["metrics"] is not None, "validations": recorder.validations}
    (out / name / f"rank{rank}.json").write_text(json.dumps(record))
