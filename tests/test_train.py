"""train.py composes its real Hydra configs, builds the corpus store, pretrains, exports and resumes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from sc_foundation.conf import CONFIG_ROOT, compose
from sc_foundation.data.store import CorpusStore
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.export import load_pretrained
from sc_foundation.models.modeling import ScFoundationForMaskedValueModeling
from sc_foundation.training import hardware, pretrain

ROOT = Path(__file__).parents[1]
EXPERIMENTS = sorted(path.stem for path in (CONFIG_ROOT / "experiment").glob("*.yaml"))
TINY_RUN = [
    "~experiment",  # the bare groups, not the main command's recipe: these tests are about the mechanics
    "data.tokenizer.context_length=256",
    "data.build_workers=1",
    "data.min_cells_per_gene=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "probes=null",  # tests of the probes run them on purpose (test_probes.py)
]


def compose_pretrain(overrides=()):
    return compose("pretrain", overrides)


@pytest.fixture(scope="module")
def kang_file(tmp_path_factory, real_slice):
    path = tmp_path_factory.mktemp("kang") / "kang.h5ad"
    real_slice("kang_ifnb/kang_ifnb.h5ad", np.arange(0, 14000, 70)).write_h5ad(path)
    return path


def data_overrides(kang_file, cache):
    return ["data.datasets=[]", f"data.files=[{kang_file}]", f"paths.cache={cache}", *TINY_RUN]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_pretrain([f"experiment={experiment}"])
    # plain constructor arguments, with the value encoding the store's tokenizer would give
    ScFoundationConfig(**cfg.model, value_encoding=cfg.data.tokenizer.encoding)
    assert cfg.trainer.use_distributed_sampler is False and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.trainer.max_steps > 0 and cfg.optim.learning_rate > 0


PRECISION = {"cpu": "auto", "gpu": "bf16-mixed", "ddp": "auto", "fsdp": "auto"}  # auto: fit the accelerator and width


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
def test_model_and_trainer_groups_compose(size, trainer):
    cfg = compose_pretrain([f"model={size}", f"trainer={trainer}", "logger=wandb"])
    ScFoundationConfig(**cfg.model, value_encoding=cfg.data.tokenizer.encoding)
    assert cfg.trainer.use_distributed_sampler is False and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.trainer.precision == PRECISION[trainer]
    assert ("strategy" in cfg.trainer) == (trainer in ("ddp", "fsdp"))
    assert cfg.logger.offline is True


def test_gradient_checkpointing_is_a_config_key(tmp_path, kang_file):
    overrides = [*data_overrides(kang_file, tmp_path / "cache"), f"output_dir={tmp_path / 'out'}"]
    cfg = compose_pretrain([*overrides, "gradient_checkpointing=true", "trainer.max_steps=2"])
    result = pretrain.run(cfg)
    assert result["module"].model.is_gradient_checkpointing
    assert (tmp_path / "out" / "export" / "final" / "model.safetensors").is_file()


def test_pretraining_on_packed_batches(tmp_path, kang_file):
    overrides = [*data_overrides(kang_file, tmp_path / "cache"), f"output_dir={tmp_path / 'out'}"]
    cfg = compose_pretrain([*overrides, "data.loader.pack=true", "trainer.max_steps=3"])
    result = pretrain.run(cfg)
    assert math.isfinite(float(result["trainer"].callback_metrics["train/loss"]))
    assert load_pretrained(tmp_path / "out" / "export" / "final", device="cpu").config.value_encoding == "binned"


def test_output_dir_defaults_without_a_hydra_run(tmp_path):
    cfg = compose_pretrain()
    assert cfg.output_dir is None
    assert pretrain.output_dir(cfg).parts[0] == "outputs"
    assert pretrain.output_dir(compose_pretrain([f"output_dir={tmp_path}"])) == tmp_path


def test_train_builds_and_reuses_the_corpus_store(tmp_path, kang_file, capsys):
    overrides = data_overrides(kang_file, tmp_path / "cache")
    cfg = compose_pretrain([*overrides, f"output_dir={tmp_path / 'out'}", "trainer.max_steps=2"])
    result = pretrain.run(cfg)
    printed = capsys.readouterr().out
    assert "kang.h5ad" in printed and "corpus store:" in printed
    store = CorpusStore(result["store"])
    assert len(store) == 200
    assert store.lengths.max() == 256
    assert store.obs["condition"].notna().all()
    assert result["padding"]["length_grouped"] <= result["padding"]["random"]

    again = pretrain.run(cfg)
    assert again["report"].n_cells == 200


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, kang_file):
    folder = tmp_path_factory.mktemp("pretrain")
    overrides = data_overrides(kang_file, folder / "cache")
    steps = ["trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.limit_val_batches=2"]
    cfg = compose_pretrain([*overrides, *steps, f"output_dir={folder / 'out'}", "optim.warmup_steps=2"])
    return cfg, pretrain.run(cfg)


def test_pretraining_exports_a_loadable_model(pretrained, capsys):
    cfg, result = pretrained
    out = Path(cfg.output_dir)
    assert result["trainer"].global_step == 20
    assert result["export"] == out / "export" / "final"
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "csv").glob("version_*/metrics.csv"))
    for directory in (out / "export" / "final", out / "export" / "best"):
        names = {p.name for p in directory.iterdir()}
        weights = {"config.json", "model.safetensors", "gene_vocab.json", "gene_tokenizer.json", "checksums.sha256"}
        # the final export also carries the model card (README.md) and metrics.json
        assert names == (weights | {"README.md", "metrics.json"} if directory.name == "final" else weights)
    assert not [p for p in (out / "export").iterdir() if p.name.startswith(".")]  # no temp folders left

    trained = result["module"].model.eval()
    model = load_pretrained(result["export"], device="cpu")
    tokenizer = model.gene_tokenizer
    assert isinstance(model, ScFoundationForMaskedValueModeling) and not model.training
    assert tokenizer == CorpusStore(result["store"]).tokenizer
    batch = next(iter(result["datamodule"].val_dataloader()))
    with torch.no_grad():
        expected, got = result["module"](batch), pretrain.TrainingModule(model)(batch)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)
    for name, weight in trained.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], weight, rtol=0, atol=0)


class StepAtStart(pl.Callback):
    def on_train_start(self, trainer, module):
        self.step = trainer.global_step


# CellBatchSampler cannot resume mid-epoch: the resumed run restarts the epoch's batches, which Lightning warns of.
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the resumed run writes to a new output_dir
def test_resume_continues_from_the_last_checkpoint(pretrained, tmp_path, capsys):
    cfg, _ = pretrained
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 20
    probe = StepAtStart()
    overrides = [f"ckpt_path={last}", f"output_dir={tmp_path}", "trainer.max_steps=26", "trainer.val_check_interval=10"]
    overrides += ["trainer.enable_progress_bar=true"]
    capsys.readouterr()
    resumed = pretrain.run(compose_pretrain([*_overrides_of(cfg), *overrides]), callbacks=[probe])
    assert probe.step == 20 and resumed["trainer"].global_step == 26
    bar = capsys.readouterr().out
    # Captured output is not a terminal: progress comes as lines over the run's steps, resumed where it left off.
    assert "step 26/26" in bar and "step 20/26" not in bar and "steps: " not in bar, bar[-2000:]
    assert "Epoch" not in bar and "v_num" not in bar
    assert (tmp_path / "export" / "final" / "model.safetensors").is_file()


class RecordBatches(pl.Callback):
    """Records each training step's cells and masked positions."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.steps[trainer.global_step] = (batch["cell_index"].tolist(), batch["mask"].nonzero().tolist())


def test_resume_mid_epoch_sees_the_batches_of_an_uninterrupted_run(pretrained, tmp_path):
    cfg, _ = pretrained  # 20 steps: one epoch of 11 batches, then 9 of the second
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    steps = ["trainer.max_steps=26", "trainer.val_check_interval=10"]
    straight = RecordBatches()
    pretrain.run(compose_pretrain([*_overrides_of(cfg), *steps, f"output_dir={tmp_path / 'straight'}"]), [straight])
    resumed = RecordBatches()
    overrides = [*_overrides_of(cfg), *steps, f"ckpt_path={last}", f"output_dir={tmp_path / 'resumed'}"]
    pretrain.run(compose_pretrain(overrides), [resumed])
    assert sorted(resumed.steps) == list(range(20, 26))
    for step in range(20, 26):
        assert resumed.steps[step] == straight.steps[step], f"step {step} differs after resuming"


def test_resume_refuses_another_sampling_plan(pretrained, tmp_path):
    cfg, _ = pretrained
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    overrides = [*_overrides_of(cfg), f"ckpt_path={last}", f"output_dir={tmp_path}", "data.loader.batch_size=8"]
    with pytest.raises(ValueError, match="resume with the same seed"):
        pretrain.run(compose_pretrain([*overrides, "trainer.max_steps=26"]))


def _overrides_of(cfg):
    return ["data.datasets=[]", f"data.files=[{cfg.data.files[0]}]", f"paths.cache={cfg.paths.cache}", *TINY_RUN]


LAUNCHERS = {
    "lightning": [sys.executable, str(ROOT / "train.py")],  # Lightning starts the second process itself
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"],
}


@pytest.mark.parametrize(
    "launcher",
    [pytest.param("lightning", marks=pytest.mark.slow), "torchrun"],  # about 30 s each on 2 busy cores
)
def test_ddp_on_two_cpu_processes_on_a_cold_cache(tmp_path, kang_file, launcher):
    """The README's two-process launches, each on an empty cache: every rank asks for the store, one builds it."""
    out = tmp_path / "out"
    command = [
        *LAUNCHERS[launcher],
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        *data_overrides(kang_file, tmp_path / "cache"),
        f"output_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        f"callbacks=[{{_target_: tests.recording.RecordCells, directory: {tmp_path / 'cells'}}}]",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exported model:" in done.stdout
    log = (tmp_path / "hydra" / "train.log").read_text()  # the report is logged, not only printed
    assert "Corpus store" in log and "corpus store:" in log and "exported model:" in log
    # 10 validation cells make one batch, which the two ranks cannot share: no validation, so no export/best,
    # and the last line must not name it.
    assert "no validation ran, so there is no export/best" in done.stdout and not (out / "export" / "best").exists()
    # trainer=ddp's precision "auto": bf16-mixed on CPUs with native bf16 for a large enough model, else 32-true
    expected = hardware.resolve_precision("auto", "cpu", hidden_size=64, head_size=16)  # the tiny model
    assert f"precision: {expected} (auto: " in output, output[-2000:]
    assert ("bfloat16" in output) == (expected == "bf16-mixed"), output[-2000:]
    stores = [p for p in (tmp_path / "cache" / "stores").iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1 and len(CorpusStore(stores[0])) == 200
    model = load_pretrained(out / "export" / "final", device="cpu")
    assert model.config.hidden_size == 64
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    seen = [json.loads((tmp_path / "cells" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4 * 16, "each rank trains 4 steps of 16 cells"
    assert not set(seen[0]) & set(seen[1]), "the two ranks see disjoint cells"


def test_precision_auto_fits_the_accelerator(monkeypatch):

    assert hardware.resolve_precision("auto", "gpu") == "bf16-mixed"
    assert hardware.resolve_precision("16-mixed", "gpu") == "16-mixed"
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert hardware.resolve_precision("auto", "cpu") == "32-true"
    assert "without native bf16" in hardware.precision_reason("auto", "cpu", 256)
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.resolve_precision("auto", "cpu") == "bf16-mixed"
    # Native bf16 pays only where the matmuls outweigh the casts (measured: 0.72x at 64 x 4 heads, 1.25x at 128 x 2).
    assert hardware.resolve_precision("auto", "cpu", hidden_size=128, head_size=64) == "bf16-mixed"
    assert hardware.resolve_precision("auto", "cpu", hidden_size=64, head_size=16) == "32-true"
    assert hardware.resolve_precision("auto", "cpu", hidden_size=128, head_size=16) == "32-true"
    assert "trains faster in fp32" in hardware.precision_reason("auto", "cpu", 64, 16)
    assert hardware.resolve_precision("32-true", "cpu", hidden_size=512) == "32-true"


def test_each_corpus_gets_its_own_cached_store(kang_file, real_slice, tmp_path):
    """data.files runs and the default corpus never share a folder; a changed input builds a new one beside the old."""
    overrides = data_overrides(kang_file, tmp_path / "cache")
    first = pretrain.build_corpus(compose_pretrain(overrides))
    other = tmp_path / "other.h5ad"
    real_slice("kang_ifnb/kang_ifnb.h5ad", np.arange(200, 320)).write_h5ad(other)
    second = pretrain.build_corpus(compose_pretrain([*overrides, f"data.files=[{other}]"]))
    assert Path(first.path).parent == Path(second.path).parent == tmp_path / "cache" / "stores"
    assert first.path != second.path and second.n_cells == 120
    assert len(CorpusStore(first.path)) == 200, "the first store is left to the runs that read it"
    default = compose_pretrain([f"paths.cache={tmp_path / 'cache'}"]).data.store_dir
    assert default.endswith("{plan}"), "the default corpus's folder is keyed by its plan too"


def test_a_stale_store_in_a_fixed_folder_is_rebuilt_or_refused(kang_file, real_slice, tmp_path):
    fixed = [*data_overrides(kang_file, tmp_path / "cache"), f"data.store_dir={tmp_path / 'mine'}"]
    first = pretrain.build_corpus(compose_pretrain(fixed))
    other = tmp_path / "other.h5ad"
    real_slice("kang_ifnb/kang_ifnb.h5ad", np.arange(200, 320)).write_h5ad(other)
    changed = [*fixed, f"data.files=[{other}]"]  # same store_dir, other inputs: a stale plan
    with pytest.raises(FileExistsError, match="holds a store built from other inputs or settings"):
        pretrain.build_corpus(compose_pretrain(changed))
    rebuilt = pretrain.build_corpus(compose_pretrain([*changed, "data.rebuild_stale_store=true"]))
    assert rebuilt.path == first.path and rebuilt.n_cells == 120 != first.n_cells
