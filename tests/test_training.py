"""TrainingModule: the loss falls on real cells, decay groups, the schedule, the FLOP estimate, rank heads, resuming."""

import itertools
import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from sc_foundation.data.datamodule import CorpusDataModule
from sc_foundation.data.store import CorpusStore, build_store
from sc_foundation.data.tokenization import TokenizerConfig
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.modeling import ScFoundationForMaskedGeneModeling, ScFoundationForMaskedValueModeling
from sc_foundation.training.lightning_module import (
    TrainingModule,
    count_non_embedding_parameters,
    split_decay_parameters,
    training_flops,
    warmup_cosine_factor,
)
from tests.conftest import TINY_ARCHITECTURE


@pytest.fixture(scope="module")
def store_dirs(tmp_path_factory, real_slice):
    """Binned and rank stores over 300 Kang cells at context 256; every detected gene enters the vocabulary (the
    default minimum of 10 cells per gene would leave most of a 300-cell slice's genes unmatched)."""
    folder = tmp_path_factory.mktemp("training_stores")
    real_slice("kang_ifnb/kang_ifnb.h5ad", np.arange(0, 13500, 45)).write_h5ad(folder / "kang.h5ad")
    for encoding in ("binned", "rank"):
        config = TokenizerConfig(encoding=encoding, context_length=256)
        build_store([str(folder / "kang.h5ad")], folder / encoding, tokenizer_config=config, min_cells_per_gene=1)
    return {encoding: folder / encoding for encoding in ("binned", "rank")}


def tiny_model(store_path, head):
    store = CorpusStore(store_path)
    config = ScFoundationConfig.from_tokenizer(store.tokenizer, **TINY_ARCHITECTURE)
    torch.manual_seed(0)
    return head(config)


def trainer(max_steps, callbacks=(), **kwargs):
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # CorpusDataModule shards batches across ranks itself
        callbacks=list(callbacks),
        **kwargs,
    )


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_training_flops_by_hand():
    # Two cells of 2 and 3 tokens, N = 1000, 2 layers of width 4:
    # 6 * 1000 * 5 + 12 * 2 * 4 * (2² + 3²) = 30000 + 96 * 13 = 31248.
    assert training_flops(1000, 5, 13, 2, 4) == 31248.0
    # DESIGN.md's example: 12 layers of 512 at 2048 tokens, N = 12 * 12 * 512² parameters, about 0.8 TFLOP per cell.
    n = 12 * 12 * 512**2
    assert training_flops(n, 2048, 2048**2, 12, 512) == pytest.approx(0.77e12, rel=0.02)


def test_warmup_is_linear_and_decay_is_cosine():
    def factor(step):
        return warmup_cosine_factor(step, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)

    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert factor(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(110) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)


def test_decay_groups_and_scheduler_of_the_module(store_dirs):
    model = tiny_model(store_dirs["binned"], ScFoundationForMaskedValueModeling)
    decay, no_decay = split_decay_parameters(model)
    embedding_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    norm_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert set(no_decay) == embedding_weights | norm_weights | biases
    assert set(decay) | set(no_decay) == {n for n, _ in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay.values()) and not set(decay) & embedding_weights
    n_embedding = sum(model.get_parameter(n).numel() for n in embedding_weights)
    assert count_non_embedding_parameters(model) == sum(p.numel() for p in model.parameters()) - n_embedding

    module = TrainingModule(model, learning_rate=1e-3, weight_decay=0.05, warmup_steps=4, max_steps=20)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in no_decay.values()}
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[12] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lrs[20] == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))


def test_the_loss_falls_on_real_cells(store_dirs):
    model = tiny_model(store_dirs["binned"], ScFoundationForMaskedValueModeling)
    module = TrainingModule(model, learning_rate=3e-3, warmup_steps=5, max_steps=50)
    data = CorpusDataModule(store_dirs["binned"], batch_size=16, val_fraction=0.1)
    recorder = LossRecorder()
    run = trainer(50, [recorder], log_every_n_steps=10, limit_val_batches=2, num_sanity_val_steps=0)
    run.fit(module, data)
    assert run.global_step == 50 and len(recorder.losses) == 50
    first, last = np.mean(recorder.losses[:5]), np.mean(recorder.losses[-5:])
    assert last < first - 0.3, (first, last)
    metrics = run.callback_metrics
    assert math.isfinite(float(metrics["val/loss"]))
    assert float(metrics["train/lr"]) == pytest.approx(3e-3 * 0.1, rel=0.05)
    cells, tokens = float(metrics["train/cells_per_s"]), float(metrics["train/tokens_per_s"])
    assert cells > 0
    # Tokens per cell: real tokens only, so at most the context length of 256 and near the cells' mean length.
    store = CorpusStore(store_dirs["binned"])
    assert 0.5 * store.lengths.mean() < tokens / cells <= 256
    assert "train/mfu" not in metrics  # CPU: no MFU estimate


def test_rank_store_trains_the_gene_head(store_dirs):
    model = tiny_model(store_dirs["rank"], ScFoundationForMaskedGeneModeling)
    module = TrainingModule(model, learning_rate=1e-3, warmup_steps=2, max_steps=None)
    data = CorpusDataModule(store_dirs["rank"], batch_size=16, val_fraction=0.1)
    recorder = LossRecorder()
    run = trainer(4, [recorder], limit_val_batches=1, num_sanity_val_steps=0)
    run.fit(module, data)
    assert run.global_step == 4
    assert all(math.isfinite(loss) for loss in recorder.losses)


class OptimizerStateAtStart(pl.Callback):
    def on_train_start(self, trainer, module):
        self.step = trainer.global_step
        state = trainer.optimizers[0].state_dict()["state"]
        self.state = {key: {name: t.clone() for name, t in values.items()} for key, values in state.items()}
        self.weights = {name: p.detach().clone() for name, p in module.model.named_parameters()}
        self.scheduler_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch


# CellBatchSampler cannot resume mid-epoch: the resumed run restarts the epoch's batches, which Lightning warns of.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_resume_from_checkpoint_continues_the_run(store_dirs, tmp_path):
    def fit(max_steps, callbacks=(), ckpt_path=None):
        model = tiny_model(store_dirs["binned"], ScFoundationForMaskedValueModeling)
        module = TrainingModule(model, learning_rate=1e-3, warmup_steps=2, max_steps=15)
        run = trainer(max_steps, callbacks, limit_val_batches=0)
        run.fit(module, CorpusDataModule(store_dirs["binned"], batch_size=16), ckpt_path=ckpt_path)
        return run, module

    first, module = fit(10)
    assert first.global_step == 10
    path = tmp_path / "step10.ckpt"
    first.save_checkpoint(path)
    saved = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    saved_state = first.optimizers[0].state_dict()["state"]

    probe = OptimizerStateAtStart()
    second, resumed = fit(15, [probe], ckpt_path=str(path))
    assert probe.step == 10 and second.global_step == 15
    assert probe.scheduler_epoch == 10
    assert probe.state.keys() == saved_state.keys()
    for key, state in saved_state.items():
        assert float(probe.state[key]["step"]) == 10
        torch.testing.assert_close(probe.state[key]["exp_avg"], state["exp_avg"])
        torch.testing.assert_close(probe.state[key]["exp_avg_sq"], state["exp_avg_sq"])
    # The resumed run started from the saved weights (not its fresh initialisation) and moved on from them.
    for name, weight in saved.items():
        torch.testing.assert_close(probe.weights[name], weight)
    assert any(not torch.equal(saved[n], p) for n, p in resumed.model.named_parameters())


def test_backbone_learns_at_a_fraction_of_the_rate(store_dirs):
    model = tiny_model(store_dirs["binned"], ScFoundationForMaskedValueModeling)
    module = TrainingModule(model, learning_rate=1e-3, warmup_steps=0, max_steps=10, backbone_lr_ratio=0.1)
    optimizer = module.configure_optimizers()["optimizer"]
    backbone = {id(p) for p in model.base_model.parameters()}
    for group in optimizer.param_groups:
        sides = {id(p) in backbone for p in group["params"]}
        assert len(sides) == 1  # a group is all backbone or all head
        assert group["lr"] == pytest.approx(1e-4 if sides.pop() else 1e-3)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the head's group first: train/lr logs it
    with pytest.raises(ValueError, match="base_model"):
        TrainingModule(nn.Linear(2, 2), backbone_lr_ratio=0.5)


def test_layer_wise_learning_rate_decay(store_dirs):
    """Each block learns at ``decay`` times the rate of the block above; the embeddings lowest, the head at the full
    rate; combined with backbone_lr_ratio, both factors apply."""
    model = tiny_model(store_dirs["binned"], ScFoundationForMaskedValueModeling)  # 2 blocks
    module = TrainingModule(model, learning_rate=1e-3, warmup_steps=0, max_steps=10, layer_lr_decay=0.5)
    optimizer = module.configure_optimizers()["optimizer"]
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    backbone = model.base_model
    expected = {"embeddings": 0.25e-3, "layers.0": 0.5e-3, "layers.1": 1e-3, "norm": 1e-3}
    for name, param in backbone.named_parameters():
        prefix = next(key for key in expected if name.startswith(key))
        assert rate[id(param)] == pytest.approx(expected[prefix]), name
    head = [p for p in model.parameters() if id(p) not in {id(q) for q in backbone.parameters()}]
    assert head and all(rate[id(p)] == pytest.approx(1e-3) for p in head)
    assert len(rate) == len(list(model.parameters()))
    both = TrainingModule(model, 1e-3, warmup_steps=0, max_steps=10, layer_lr_decay=0.5, backbone_lr_ratio=0.1)
    rates = sorted({g["lr"] for g in both.configure_optimizers()["optimizer"].param_groups})
    assert rates == pytest.approx([0.25e-4, 0.5e-4, 1e-4, 1e-3])
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="layer_lr_decay"):
            TrainingModule(model, layer_lr_decay=bad)


@pytest.mark.parametrize(
    ("encoding", "head"), [("binned", ScFoundationForMaskedValueModeling), ("rank", ScFoundationForMaskedGeneModeling)]
)
def test_padded_and_packed_batches_give_the_same_loss(store_dirs, encoding, head):
    """The same cells, masked identically, padded (SDPA with a key-padding mask) or packed (cu_seqlens; on the CPU
    SDPA with a block-diagonal mask): one loss, so either layout trains the same model."""
    module = TrainingModule(tiny_model(store_dirs[encoding], head), max_steps=10).eval()
    losses = []
    for pack in (False, True):
        data = CorpusDataModule(store_dirs[encoding], batch_size=8, val_fraction=0.0, pack=pack, seed=3)
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        with torch.no_grad():
            losses.append(module(batch).loss)
    assert "cu_seqlens" in batch and batch["input_ids"].shape[0] == 1
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
