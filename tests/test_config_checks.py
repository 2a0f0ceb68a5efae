"""Configs checked before any work (sc_foundation/conf/checks.py): every packaged config passes, bad values fail in
the check naming the key and the fix, and the types follow the packaged YAML files without an edit of the check."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sc_foundation.conf import CONFIG_ROOT, checks, compose
from sc_foundation.conf.checks import ConfigError, check_config

from .conftest import CELLBENCH

ROOT = Path(__file__).parents[1]
FINETUNE = ["pretrained=model", "data.files=[cells.h5ad]"]
EXPERIMENTS = sorted(path.stem for path in (CONFIG_ROOT / "experiment").glob("*.yaml"))
GPU_EXPERIMENTS = {"gpu_pretrain", "rank_geneformer"}


@pytest.mark.parametrize("overrides", [[], *([f"experiment={name}"] for name in EXPERIMENTS)])
def test_every_packaged_pretraining_config_passes(overrides):
    cfg = compose("pretrain", overrides)
    if overrides and overrides[0].split("=")[1] in GPU_EXPERIMENTS and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            check_config(cfg, "pretrain")
        cfg = compose("pretrain", [*overrides, "trainer=cpu"])  # the fix the message gives
    check_config(cfg, "pretrain")


@pytest.mark.parametrize("task", ["annotation", "integration batch_key=batch", "imputation", "multimodal"])
def test_every_packaged_finetuning_config_passes(task):
    extra = ["modality.kind=protein", "modality.files=[adt.h5ad]"] if task == "multimodal" else []
    check_config(compose("finetune", [*FINETUNE, *f"task={task}".split(), *extra]), "finetune")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_steps=abc"], r"trainer.max_steps='abc' must be an integer like the packaged default 150"),
        (["optim.learning_rate=fast"], r"optim.learning_rate='fast' must be a number"),
        (["data.loader.group_by_length=3"], r"data.loader.group_by_length=3 must be true or false"),
        (["optim.betas=[a,0.9]"], r"optim.betas: the items \['a'\] must each be a number"),
        (["+model.hiden_size=8"], r"unknown key model.hiden_size .*: did you mean model.hidden_size\?"),
        (["+trainer.bogus=1"], r"unknown key trainer.bogus \(not a pytorch_lightning.Trainer argument"),
        (["+data.loader.batchsize=8"], r"did you mean data.loader.batch_size\?"),
        (
            [
                "data.tokenizer.encoding=rank",
                "data.tokenizer.context_length=1024",
                "+model.max_position_embeddings=512",
            ],
            r"data.tokenizer.context_length=1024 is longer than model.max_position_embeddings=512",
        ),
        (["data.panel.exclude=[mitochondrial,mitocondrial]"], r"data.panel.exclude: \['mitocondrial'\] are neither"),
    ],
)
def test_bad_pretraining_values_are_named_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose("pretrain", overrides), "pretrain")


def test_keys_beyond_the_packaged_ones_that_their_owner_takes_pass():
    overrides = ["+trainer.fast_dev_run=true", "+model.layer_norm_eps=1e-6", "trainer.precision=32"]
    check_config(compose("pretrain", overrides), "pretrain")


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a GPU")
def test_a_gpu_trainer_without_a_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu needs a CUDA GPU .*: add trainer=cpu"):
        check_config(compose("pretrain", ["trainer=gpu"]), "pretrain")


def test_required_values_and_missing_columns_are_named(shared_data):
    with pytest.raises(ConfigError, match=r"data.files, pretrained have no value .*: pass data.files=\.\.\. pretr"):
        check_config(compose("finetune", []), "finetune")
    with pytest.raises(ConfigError, match="batch_key has no value"):
        check_config(compose("finetune", [*FINETUNE, "task=integration"]), "finetune")
    cells = shared_data / CELLBENCH
    cfg = compose("finetune", ["pretrained=model", f"data.files=[{cells}]", "label_key=celltype"])
    with pytest.raises(
        ConfigError,
        match=rf"{cells}: label_key='celltype' is not an obs column; obs .*; did you mean label_key=cell_type\?",
    ):
        check_config(cfg, "finetune")
    check_config(compose("finetune", ["pretrained=model", f"data.files=[{cells}]"]), "finetune")
    # The store names every cell's input file (source) and batch, so a split by either passes any input.
    by_file = ["split.split_by=source", "split.test_groups=[cellbench_3cl.h5ad]"]
    check_config(compose("finetune", ["pretrained=model", f"data.files=[{cells}]", *by_file]), "finetune")
    by_donor = compose("finetune", ["pretrained=model", f"data.files=[{cells}]", "split.split_by=donor"])
    with pytest.raises(ConfigError, match=r"split.split_by='donor' is not an obs column"):
        check_config(by_donor, "finetune")


def test_a_panel_longer_than_a_rank_models_positions_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"value_encoding": "rank", "max_position_embeddings": 256}')
    (tmp_path / "gene_tokenizer.json").write_text('{"config": {"add_cls": true, "add_eos": false}}')
    cfg = compose("finetune", [f"pretrained={tmp_path}", "data.files=[cells.h5ad]", "data.panel_genes=1000"])
    with pytest.raises(ConfigError, match=r"data.panel_genes=1000 reads each cell through 1001 tokens.*=255 or lower"):
        check_config(cfg, "finetune")
    fits = compose("finetune", [f"pretrained={tmp_path}", "data.files=[x.h5ad]", "data.panel_genes=255"])
    check_config(fits, "finetune")


def test_types_follow_the_packaged_yaml_without_an_edit(tmp_path, monkeypatch):
    """A key added to a packaged YAML file (as other issues add them) is typed by its default at once."""
    conf = tmp_path / "conf"
    shutil.copytree(CONFIG_ROOT, conf)
    with open(conf / "data" / "default.yaml", "a") as file:
        file.write("new_knob: 3\n")
    monkeypatch.setattr(checks, "CONFIG_ROOT", conf)
    checks.reference.cache_clear()
    try:
        cfg = compose("pretrain", ["+data.new_knob=4"])
        check_config(cfg, "pretrain")
        cfg.data.new_knob = "four"
        with pytest.raises(ConfigError, match=r"data.new_knob='four' must be an integer like the packaged default 3"):
            check_config(cfg, "pretrain")
    finally:
        checks.reference.cache_clear()


def test_a_bad_override_fails_on_one_line_before_any_store_and_lands_in_the_log(tmp_path):
    """``python train.py trainer.max_steps=abc`` used to build the corpus store (36 s) and die in Lightning under a
    25-line traceback, with an empty train.log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "trainer.max_steps=abc",
        f"paths.cache={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("sc-foundation pretrain: error: trainer.max_steps='abc' must be an integer")
    assert f"the traceback is in {tmp_path / 'run' / 'train.log'}; HYDRA_FULL_ERROR=1 shows it here" in line
    log = (tmp_path / "run" / "train.log").read_text()
    assert "trainer.max_steps='abc'" in log and "Traceback (most recent call last)" in log
    assert not (tmp_path / "cache").exists(), "no store was started"


def test_every_subcommand_fails_on_one_line_and_the_debug_switch_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from sc_foundation.cli import main

    argv = ["embed", "--model", str(tmp_path), "--input", str(tmp_path / "absent.h5ad"), "--output", "out.h5ad"]
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"sc-foundation embed: error: --input {tmp_path / 'absent.h5ad'} does not exist: pass an .h5ad file of raw "
        "counts (HYDRA_FULL_ERROR=1 shows the traceback)"
    )
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(FileNotFoundError, match=r"absent\.h5ad does not exist"):
        main(argv)
