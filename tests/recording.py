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


def _total_norm(tensors) -> float:
    """The 2-norm of all ``tensors`` together; under FSDP they are shards, and the norm a collective."""
    import torch
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm(tensors)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


class RecordOptimizer(pl.Callback):
    """What each rank trains with, one JSON file per rank: the optimiser's parameter groups by parameter name (and
    their weight decay), the parameter count the MFU estimate uses, whether the parameters are FSDP shards and how
    many elements this rank holds, and the gradient norm of every step before and after clipping."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.record: dict = {"norms": []}

    def on_train_start(self, trainer, module):
        from torch.distributed.tensor import DTensor

        names = {id(p): name for name, p in module.model.named_parameters()}
        params = list(module.model.parameters())
        self.record |= {
            "groups": [
                {"weight_decay": group["weight_decay"], "params": sorted(names[id(p)] for p in group["params"])}
                for group in trainer.optimizers[0].param_groups
            ],
            "non_embedding_params": module._non_embedding_params,
            "sharded": all(isinstance(p, DTensor) for p in params),
            "numel": sum(p.numel() for p in params),
            "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
        }

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self._before = _total_norm([p.grad for p in module.model.parameters() if p.grad is not None])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # Gradients stay until the next step's zero_grad: these are the clipped ones the optimiser used.
        after = _total_norm([p.grad for p in module.model.parameters() if p.grad is not None])
        self.record["norms"].append([self._before, after])

    def on_train_end(self, trainer, module):
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
