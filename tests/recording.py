"""A Lightning callback for tests that run training in other processes (DDP): it records which cells each rank
trained on, one JSON file per rank."""

import json
from pathlib import Path

import pytorch_lightning as pl


class RecordCells(pl.Callback):
    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.cells: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.cells.extend(batch["cell_index"].tolist())

    def on_train_end(self, trainer, module):
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.cells))
