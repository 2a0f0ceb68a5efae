"""Fine-tuning runs one after another in the processes of one launch (``torchrun --nproc_per_node=2
tests/finetune_worker.py CASES.json OUT``), for tests of fine-tuning under DDP: CASES.json maps a case name to its
finetune.yaml overrides. Each rank writes ``OUT/<case>/rank<r>.json``: whether ``run`` returned metrics there."""

import json
import sys
from pathlib import Path

from sc_foundation import tasks

cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
for name, overrides in cases.items():
    result = tasks.run(tasks.compose_config(overrides))
    rank = result["trainer"].global_rank
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / f"rank{rank}.json").write_text(json.dumps({"metrics": result["metrics"] is not None}))
