"""Fully sharded data parallel training (``trainer=fsdp``) with PyTorch's FSDP2, and what sharding asks of the rest.

``trainer=fsdp`` is :class:`FullyShardedStrategy`: Lightning's ``ModelParallelStrategy`` with every process in one
data-parallel group (no tensor parallelism). :meth:`~sc_foundation.training.lightning_module.TrainingModule.
configure_model` then applies ``torch.distributed.fsdp.fully_shard`` to each Transformer block and once more to the
whole head (:func:`shard_per_layer`): each block's parameters are gathered just before it runs and freed after, so a
rank holds one block's full weights at a time, next to its 1/world_size share of all parameters, gradients and AdamW
moments.

Why FSDP2 and not Lightning's ``FSDPStrategy`` (FSDP1): FSDP1 flattens the parameters into 1-D shards (so shape
tells no weight from a bias), refuses norm gradient clipping in Lightning's precision plugin, and runs only on
GPUs. FSDP2 shards each parameter as a ``DTensor`` that keeps its global shape, ``torch.nn.utils.clip_grad_norm_``
clips it correctly, and it runs over gloo on CPUs, so the two-process tests exercise the same code as a GPU run.
"""

from __future__ import annotations

from datetime import timedelta

import pytorch_lightning as pl
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from sc_foundation.models.adapters import attach_lora_like, has_lora


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: one data-parallel group of every process.

    Args:
        save_distributed_checkpoint: resume checkpoints as one folder of per-rank shards (True, scales to any model)
            or a single ``.ckpt`` file gathered on rank 0 (False, the default: what DDP runs write, and small
            models).
        process_group_backend: None picks NCCL on GPUs and gloo on CPUs.
        timeout: of the process group's collectives.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = None,
    ):
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    def setup_environment(self) -> None:
        # Known only now (devices and nodes are filled in by the Trainer): every process shards, none splits tensors.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` (its parameters are ``DTensor`` shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The model's own class: ``fully_shard`` swaps a module's class for a subclass of ``FSDPModule`` and it."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def shard_per_layer(model: nn.Module, mesh) -> nn.Module:
    """Apply FSDP2 to each Transformer block of ``model.base_model.layers``, then to ``model`` (the root: the
    embeddings, final norm and heads, which share the gene embedding table with decoders that read it).

    Args:
        model: an ``ScFoundation*`` head (or backbone).
        mesh: a 1-D data-parallel ``DeviceMesh``.
    Returns:
        ``model``, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in getattr(model.base_model, "layers", ()):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gather_model(trainer: pl.Trainer) -> nn.Module | None:
    """The whole model being trained, on global rank 0 (None on the other ranks), to export or embed with.

    Unsharded (one process, DDP): the training model itself. Under FSDP2 its parameters are shards, and a forward
    pass on one rank would wait for the other ranks' all-gathers, so every rank takes part in gathering the full
    weights onto rank 0's CPU (a collective: call it on every rank), and rank 0 loads them into a fresh copy of the
    model's own class, which exports under its own name (``config.architectures``) and runs alone.
    """
    model = trainer.lightning_module.model
    if not is_sharded(model):
        return model if trainer.is_global_zero else None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)  # rank 0: every weight; the others: empty
    if not trainer.is_global_zero:
        return None
    whole = unsharded_class(model)(model.config)
    if has_lora(model):  # the gathered keys are peft's (base_layer, lora_A, lora_B): the copy needs the same adapters
        attach_lora_like(whole, model)
    whole.load_state_dict(weights)
    return whole
