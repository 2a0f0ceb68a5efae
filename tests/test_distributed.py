"""Training on several processes as a cluster runs it: FSDP2 pretraining (sharded per block, with probes, exports and
resume) against DDP on the same seed, over gloo on 2 CPU processes started by torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file

from sc_foundation import tasks
from sc_foundation.conf import compose
from sc_foundation.data.store import CorpusStore, merge_store
from sc_foundation.models.export import load_pretrained
from sc_foundation.training import pretrain
from sc_foundation.training.lightning_module import count_non_embedding_parameters, split_decay_parameters
from sc_foundation.training.sharding import FullyShardedStrategy
from tests.conftest import CELLBENCH
from tests.test_train import data_overrides

ROOT = Path(__file__).parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
# after TINY_RUN's probes=null: one small probe set, after every validation
PROBE = (
    "probes={every_n_validations: 1, n_neighbors: 15, "
    "sets: [{name: pbmc68k, dataset: pbmc68k_reduced, label_key: cell_type, max_cells: 200}]}"
)


@pytest.fixture(scope="module")
def kang_file(tmp_path_factory, real_slice):
    path = tmp_path_factory.mktemp("kang") / "kang.h5ad"
    real_slice("kang_ifnb/kang_ifnb.h5ad", np.arange(0, 14000, 70)).write_h5ad(path)
    return path


def pretrain_on_two_processes(trainer: str, kang_file, root: Path, *extra) -> Path:
    """``torchrun --nproc_per_node=2 train.py trainer=<trainer>`` on 2 CPU processes; returns the output folder.
    40 validation cells make 2 batches of 16, one per rank, so validation (and export/best) runs."""
    out = root / "out"
    command = [
        *TORCHRUN,
        "train.py",
        f"trainer={trainer}",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "data.loader.val_fraction=0.2",
        *data_overrides(kang_file, root / "cache"),
        f"output_dir={out}",
        f"hydra.run.dir={root / 'hydra'}",
        f"callbacks=[{{_target_: tests.recording.RecordOptimizer, directory: {root / 'record'}}}]",
        *extra,
    ]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def records(root: Path) -> list[dict]:
    return [json.loads((root / "record" / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def check_clipping(record: dict) -> None:
    """Every step's gradient, as the optimiser used it, has the norm min(norm before clipping, 1.0): the norm of the
    whole gradient, not of one rank's shard."""
    norms = np.asarray(record["norms"])
    assert len(norms) and (norms[:, 0] > 1.0).any(), "no step needed clipping: the check would prove nothing"
    np.testing.assert_allclose(norms[:, 1], np.minimum(norms[:, 0], 1.0), rtol=1e-3)


def test_fsdp_strategy_is_pure_data_parallel_sharding():
    cfg = compose("pretrain", ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"])
    strategy = pretrain.trainer_arguments(cfg.trainer)["strategy"]
    assert isinstance(strategy, FullyShardedStrategy)
    assert cfg.trainer.gradient_clip_val == 1.0, "FSDP2 clips by norm: trainer=fsdp keeps the default clipping"


def test_fsdp_on_two_cpu_processes_shards_decays_clips_and_counts_like_one(tmp_path, kang_file):
    """trainer=fsdp, today's Lightning FSDPStrategy refused on CPUs and norm clipping, runs as FSDP2: every parameter
    a shard (half the elements per rank), the same weight-decay groups and MFU parameter count as the unsharded
    model, and clipping by the norm of the whole gradient."""
    out = pretrain_on_two_processes("fsdp", kang_file, tmp_path, "trainer.max_steps=3", "probes=null")
    cfg = compose("pretrain", data_overrides(kang_file, tmp_path / "cache"))
    (store,) = [p for p in (tmp_path / "cache" / "stores").iterdir() if not p.name.startswith(".")]
    model = pretrain.build_model(cfg, CorpusStore(store))
    decay, no_decay = split_decay_parameters(model)
    for record in records(tmp_path):
        assert record["sharded"]
        assert record["local_numel"] < 0.6 * record["numel"], "each rank holds about half of the elements"
        assert record["numel"] == sum(p.numel() for p in model.parameters())
        assert record["non_embedding_params"] == count_non_embedding_parameters(model)
        groups = {group["weight_decay"]: group["params"] for group in record["groups"]}
        assert groups == {cfg.optim.weight_decay: sorted(decay), 0.0: sorted(no_decay)}
        check_clipping(record)
    assert set(load_file(out / "export" / "final" / "model.safetensors")) == set(model.state_dict())


@pytest.mark.slow  # three 2-process launches with probes: about 4 minutes on 2 busy cores
def test_fsdp_pretraining_with_probes_exports_what_ddp_exports_and_resumes(tmp_path, kang_file):
    steps = ["trainer.max_steps=4", PROBE]
    ddp = pretrain_on_two_processes("ddp", kang_file, tmp_path / "ddp", *steps)
    fsdp = pretrain_on_two_processes("fsdp", kang_file, tmp_path / "fsdp", *steps)
    for name in ("final", "best"):
        ours, theirs = (load_file(run / "export" / name / "model.safetensors") for run in (fsdp, ddp))
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        config = [json.loads((run / "export" / name / "config.json").read_text()) for run in (fsdp, ddp)]
        assert config[0] == config[1], "the export loads as the same class, with the same settings"
    # Same seed, same cells, same steps: the sharded run trains the same model (up to the order of float sums).
    cfg = compose("pretrain", data_overrides(kang_file, tmp_path / "fsdp" / "cache"))
    (store,) = [p for p in (tmp_path / "fsdp" / "cache" / "stores").iterdir() if not p.name.startswith(".")]
    pl.seed_everything(cfg.seed, workers=True)
    initial = pretrain.build_model(cfg, CorpusStore(store)).state_dict()
    ours, theirs = (load_file(run / "export" / "final" / "model.safetensors") for run in (fsdp, ddp))
    moved = np.mean([(theirs[k] - initial[k]).abs().mean().item() for k in theirs])
    apart = np.mean([(ours[k] - theirs[k]).abs().mean().item() for k in theirs])
    assert apart < 0.05 * moved, (apart, moved)
    for fsdp_record, ddp_record in zip(records(tmp_path / "fsdp"), records(tmp_path / "ddp"), strict=True):
        assert fsdp_record["groups"] == ddp_record["groups"]
        assert fsdp_record["non_embedding_params"] == ddp_record["non_embedding_params"]
        check_clipping(fsdp_record)
    # The probes ran under sharding (after both validations) and their scores reached the log and the model card.
    logged = pd.read_csv(next(fsdp.rglob("metrics.csv")))
    assert logged["probe/pbmc68k/knn_accuracy"].dropna().size == 2
    card = json.loads((fsdp / "export" / "final" / "metrics.json").read_text())
    assert 0 < card["probes"]["pbmc68k"]["ours"]["knn_accuracy"] <= 1

    # Resume the FSDP run from its checkpoint for 2 more steps: the step count and the probe curve go on.
    last = fsdp / "checkpoints" / "last.ckpt"
    resumed = pretrain_on_two_processes(
        "fsdp",
        kang_file,
        tmp_path / "fsdp",
        "trainer.max_steps=6",
        PROBE,
        "probes.every_n_validations=1",
        f"ckpt_path={last}",
    )
    checkpoint = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6
    assert checkpoint["callbacks"]["ProbeCallback"]["history"][0]["step"] == 2, "the probe curve from before"
    card = json.loads((resumed / "export" / "final" / "metrics.json").read_text())
    assert card["training"]["steps"] == 6 and 0 < card["probes"]["pbmc68k"]["ours"]["knn_accuracy"] <= 1


def task_overrides(task: str, pretrained, shared_data, out: Path) -> list[str]:
    """A few quick epochs of ``task`` on real cells (the tiny export of conftest), cheap baselines."""
    cellbench = shared_data / CELLBENCH
    quick = [
        f"pretrained={pretrained}",
        f"output_dir={out}",
        "data.panel_genes=200",
        "trainer.max_epochs=2",
        "finetune.unfreeze_epoch=1",
        "baselines.n_pcs=5",
        "baselines.n_top_genes=500",
        "baselines.scvi=false",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~logger",
    ]
    return (
        quick
        + {
            "annotation": [f"data.files=[{cellbench}]"],
            "integration": [f"data.files=[{cellbench}]", "task=integration", "batch_key=batch", "label_key=cell_type"],
            "imputation": [f"data.files=[{cellbench}]", "task=imputation"],
            "multimodal": [
                f"data.files=[{shared_data / 'eccite_pbmc/eccite_rna.h5ad'}]",
                "task=multimodal",
                "modality.kind=protein",
                f"modality.files=[{shared_data / 'eccite_pbmc/eccite_adt.h5ad'}]",
            ],
        }[task]
    )


def finetune_on_two_processes(cases: dict[str, list[str]], root: Path, trainer: str = "ddp") -> None:
    """Every case fine-tuned with ``trainer=<trainer>`` on 2 CPU processes, one after another in one torchrun
    launch."""
    parallel = [f"trainer={trainer}", "trainer.accelerator=cpu", "trainer.devices=2"]
    path = root / "cases.json"
    path.write_text(json.dumps({name: [*overrides, *parallel] for name, overrides in cases.items()}))
    command = [*TORCHRUN, "tests/finetune_worker.py", str(path), str(root / "ranks")]
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def check_scored_once(task: str, out: Path, ranks: Path) -> dict:
    """Rank 0 alone returned metrics; both ranks saw the same validation metrics (what early stopping and the export
    of the best epoch decide by); metrics.json scores every test cell (every cell, for the tasks scored on all cells)
    once."""
    seen = [json.loads((ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [record["metrics"] for record in seen] == [True, False]
    assert seen[0]["validations"] and seen[0]["validations"] == seen[1]["validations"]
    metrics = json.loads((out / "metrics.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    n_test = len(splits["test"]["store_index"]) if "test" in splits else None
    n_all = sum(len(split["store_index"]) for name, split in splits.items() if name != "seed")
    if task == "annotation":
        assert metrics["model"]["n_cells"] == n_test and np.sum(metrics["model"]["confusion_matrix"]) == n_test
    elif task == "multimodal":
        assert metrics["prediction"]["model"]["n_cells"] == n_test
    if task in ("integration", "multimodal"):
        embeddings = np.load(out / "embeddings.npz")
        assert all(len(embeddings[key]) == n_all for key in embeddings.files if key != "cell_id")
    if task == "imputation":
        assert metrics["n_cells"]["all"] == n_all and np.isfinite(metrics["model"]["median_l1"])
    assert metrics["steps"] > 0
    return metrics


def test_gradual_annotation_under_ddp_scores_the_whole_test_split(tmp_path, pretrained, shared_data):
    """The confirmed failure: finetune.mode=gradual froze the backbone after DDP built its reducer and died at the
    next step; and the test metrics were each rank's share of the test cells."""
    out = tmp_path / "gradual"
    finetune_on_two_processes(
        {"gradual": [*task_overrides("annotation", pretrained, shared_data, out), "finetune.mode=gradual"]}, tmp_path
    )
    check_scored_once("annotation", out, tmp_path / "ranks" / "gradual")
    # The backbone was frozen in epoch 0 and trained in epoch 1: it moved, from its pretrained weights.
    before = load_file(Path(pretrained) / "model.safetensors")
    after = load_file(out / "export" / "best" / "model.safetensors")
    assert any(not torch.equal(before[key], after[key]) for key in before if key in after)


@pytest.mark.slow  # 4 fine-tuning runs on 2 processes: about 4 minutes on 2 busy cores
def test_fine_tuning_under_fsdp(tmp_path, pretrained, shared_data):
    """finetune.py trainer=fsdp: the strategy is instantiated (it was handed to the Trainer as a dict), the model is
    sharded, the export is gathered whole, and rank 0 scores it on the whole test split. LoRA too: the gathered
    weights carry peft's keys, and the export is merged (a plain checkpoint) or the adapters alone."""
    modes = {"full": [], "gradual": [], "lora": [], "lora_separate": ["finetune.lora.merge=false"]}
    cases = {
        name: [
            *task_overrides("annotation", pretrained, shared_data, tmp_path / name),
            f"finetune.mode={name.split('_')[0]}",
            *extra,
        ]
        for name, extra in modes.items()
    }
    finetune_on_two_processes(cases, tmp_path, trainer="fsdp")
    for name in cases:
        check_scored_once("annotation", tmp_path / name, tmp_path / "ranks" / name)
        config = json.loads((tmp_path / name / "export" / "best" / "config.json").read_text())
        assert config["architectures"] == ["ScFoundationForCellClassification"]
    base = load_file(Path(pretrained) / "model.safetensors")
    merged = load_file(tmp_path / "lora" / "export" / "best" / "model.safetensors")
    assert not any(".lora_" in key or ".base_layer." in key for key in merged), "a merged export is plain"
    adapted = [key for key in base if key.endswith(".attn.qkv.weight")]
    assert adapted and all(not torch.equal(merged[key], base[key]) for key in adapted), "the merged update is in"
    separate = tmp_path / "lora_separate" / "export" / "best"
    assert (separate / "adapters.json").is_file()
    adapters = load_file(separate / "model.safetensors")
    assert any(".lora_A." in key for key in adapters) and not any(key in base for key in adapters)
    model = load_pretrained(separate)  # on top of the base export that adapters.json records
    assert type(model).__name__ == "ScFoundationForCellClassification"


@pytest.mark.slow  # 16 fine-tuning runs on 2 processes: several minutes on 2 busy cores
def test_every_task_and_mode_under_ddp_scores_once_like_one_process(tmp_path, pretrained, shared_data):
    cases = {
        f"{task}-{mode}": [
            *task_overrides(task, pretrained, shared_data, tmp_path / task / mode),
            f"finetune.mode={mode}",
        ]
        for task in tasks.TASKS
        for mode in tasks.MODES
    }
    finetune_on_two_processes(cases, tmp_path)
    scored = {
        name: check_scored_once(name.split("-")[0], tmp_path / Path(*name.split("-")), tmp_path / "ranks" / name)
        for name in cases
    }
    # The same run on one process: the scores agree within the noise of a 2-epoch run on a few hundred cells.
    single = tasks.run(tasks.compose_config(task_overrides("annotation", pretrained, shared_data, tmp_path / "single")))
    ddp = scored["annotation-full"]["model"]
    assert abs(ddp["macro_f1"] - single["metrics"]["model"]["macro_f1"]) <= 0.15, (ddp, single["metrics"]["model"])


RANK_SHARDED_BUILD = """
import sys
from sc_foundation.conf import compose
from sc_foundation.data.store import launcher_rank
from sc_foundation.training import pretrain
assert pretrain.build_corpus(compose("pretrain", sys.argv[1:]), *launcher_rank()) is None
"""


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_together(commands: list[list[str]], envs: list[dict]) -> list[subprocess.CompletedProcess]:
    """Start the processes side by side (as a cluster's nodes would be) and wait for all of them."""
    started = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for command, env in zip(commands, envs, strict=True)
    ]
    outputs = [process.communicate(timeout=600)[0] for process in started]
    for process, output in zip(started, outputs, strict=True):
        assert process.returncode == 0, output[-5000:]
    return outputs


@pytest.mark.slow  # three 2-process launches: about 3 minutes on 2 busy cores
def test_multi_node_launches_with_a_rank_sharded_store(tmp_path, kang_file):
    """docs/distributed.md's multi-node recipe on one machine, with the environment a cluster gives: a SLURM array
    builds the store's parts (one task each) and one merge completes it; two torchrun agents (--nnodes=2, one per
    "node", static rendezvous at MASTER_ADDR:MASTER_PORT) train on it; then two srun-style tasks (SLURM_NTASKS,
    SLURM_PROCID, SLURM_NODEID, SLURM_NODELIST) that Lightning's SLURM environment joins. Every launch reuses the
    merged store and trains disjoint cells on each rank."""
    overrides = [*data_overrides(kang_file, tmp_path / "cache"), "data.part_size=60"]  # 200 cells: 4 parts
    array = [
        {**ENV, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
        for task in (0, 1)
    ]
    run_together([[sys.executable, "-c", RANK_SHARDED_BUILD, *overrides]] * 2, array)
    (store,) = [p for p in (tmp_path / "cache" / "stores").iterdir() if not p.name.startswith(".")]
    assert not (store / "manifest.json").exists(), "the ranks built parts; only the merge writes the manifest"
    assert merge_store(store).n_cells == 200

    def train(name: str) -> list[str]:
        return [
            "train.py",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.num_nodes=2",
            "trainer.devices=1",
            "trainer.max_steps=2",
            "trainer.limit_val_batches=0",
            *overrides,
            f"output_dir={tmp_path / name}",
            f"hydra.run.dir={tmp_path / name / 'hydra'}",
            f"callbacks=[{{_target_: tests.recording.RecordCells, directory: {tmp_path / name / 'cells'}}}]",
        ]

    port = str(free_port())
    agents = [
        [
            *TORCHRUN[:3],
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            *train("torchrun"),
        ]
        for node in (0, 1)
    ]
    torchrun = run_together(agents, [ENV, ENV])
    slurm_port = str(free_port())
    slurm = [
        {
            **ENV,
            "SLURM_NTASKS": "2",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_PROCID": str(task),
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(task),
            "SLURM_NODELIST": "127.0.0.1",
            "SLURM_JOB_NAME": "pretrain",
            "SLURM_JOB_ID": "4242",
            "MASTER_PORT": slurm_port,
        }
        for task in (0, 1)
    ]
    srun = run_together([[sys.executable, *train("slurm")]] * 2, slurm)
    for name, outputs in (("torchrun", torchrun), ("slurm", srun)):
        assert "reused" in outputs[0] or "reused" in outputs[1], outputs[0][-2000:]
        assert (tmp_path / name / "export" / "final" / "model.safetensors").is_file()
        seen = [json.loads((tmp_path / name / "cells" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        assert len(seen[0]) == len(seen[1]) == 2 * 16 and not set(seen[0]) & set(seen[1]), name
