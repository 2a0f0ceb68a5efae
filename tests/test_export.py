"""Exports are written atomically and load strictly with their tokenizer."""

import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from sc_foundation.data.genes import VOCAB_FILE
from sc_foundation.data.store import CorpusStore, build_store
from sc_foundation.data.tokenization import TOKENIZER_FILE, TokenizerConfig
from sc_foundation.models.checksums import MANIFEST
from sc_foundation.models.configuration import ScFoundationConfig
from sc_foundation.models.export import export_pretrained, load_pretrained
from sc_foundation.models.modeling import ScFoundationForMaskedGeneModeling, ScFoundationForMaskedValueModeling


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, real_slice):
    folder = tmp_path_factory.mktemp("export_store")
    real_slice("pbmc3k/pbmc3k.h5ad", np.arange(0, 2700, 27)).write_h5ad(folder / "pbmc.h5ad")
    config = TokenizerConfig(encoding="rank", context_length=128)
    build_store([str(folder / "pbmc.h5ad")], folder / "store", tokenizer_config=config, min_cells_per_gene=1)
    return CorpusStore(folder / "store").tokenizer


def tiny(tokenizer, seed=0, head=ScFoundationForMaskedGeneModeling, encoding=None):
    config = ScFoundationConfig.from_tokenizer(
        tokenizer,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        value_encoding=encoding or tokenizer.config.encoding,
    )
    torch.manual_seed(seed)
    return head(config)


def test_export_replaces_an_existing_export_and_leaves_no_temp_folders(tokenizer, tmp_path):
    target = tmp_path / "export" / "final"
    export_pretrained(tiny(tokenizer, seed=0), tokenizer, target)
    newer = tiny(tokenizer, seed=1)
    export_pretrained(newer, tokenizer, target)
    assert [p.name for p in target.parent.iterdir()] == ["final"]
    model = load_pretrained(target, device="cpu")
    loaded_tokenizer = model.gene_tokenizer
    assert isinstance(model, ScFoundationForMaskedGeneModeling)
    assert loaded_tokenizer == tokenizer
    for name, weight in newer.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], weight, rtol=0, atol=0)


def test_a_failed_export_keeps_the_old_one(tokenizer, tmp_path, monkeypatch):
    target = tmp_path / "final"
    export_pretrained(tiny(tokenizer, seed=0), tokenizer, target)
    before = (target / "model.safetensors").read_bytes()

    def broken(directory):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        export_pretrained(tiny(tokenizer, seed=1), tokenizer, target)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert (target / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("missing", [VOCAB_FILE, TOKENIZER_FILE])
def test_load_refuses_a_directory_without_tokenizer_files(tokenizer, tmp_path, missing):
    export_pretrained(tiny(tokenizer), tokenizer, tmp_path / "model")
    (tmp_path / "model" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_pretrained(tmp_path / "model")


def test_load_refuses_a_tokenizer_of_another_encoding(tokenizer, tmp_path):
    model = tiny(tokenizer, head=ScFoundationForMaskedValueModeling, encoding="binned")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save(tmp_path / "model")  # a rank tokenizer beside a binned model
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(tmp_path / "model")


@pytest.mark.parametrize(("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_export_modes_follow_the_umask(tokenizer, tmp_path, umask, file_mode, folder_mode):
    """Others on a shared file system load exports: no private modes from the temporary folder."""
    previous = os.umask(umask)
    try:
        target = export_pretrained(tiny(tokenizer), tokenizer, tmp_path / "export")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(target.stat().st_mode) == folder_mode
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in target.iterdir()}
    assert modes == dict.fromkeys(["config.json", "model.safetensors", VOCAB_FILE, TOKENIZER_FILE, MANIFEST], file_mode)


def test_a_config_that_no_longer_fits_the_weights_is_named(tokenizer, tmp_path, caplog):
    target = export_pretrained(tiny(tokenizer), tokenizer, tmp_path / "model")
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"config.json is corrupt or truncated: its SHA-256 differs"):
        load_pretrained(target, device="cpu")  # the edit is caught by the checksums first
    with pytest.raises(ValueError, match="other shapes in the checkpoint") as error:
        load_pretrained(target, device="cpu", verify=False)
    assert "config.json and the weights file disagree" in str(error.value)
    assert "ignore_mismatched_sizes" not in str(error.value) + caplog.text


def test_loading_and_saving_are_quiet_but_say_what_they_did(tokenizer, tmp_path, capfd, caplog):
    """Our strict-load line instead of transformers' LOAD REPORT and progress bars; the report under DEBUG."""
    from transformers import AutoModel

    from sc_foundation.models.modeling import ScFoundationForCellClassification

    target = export_pretrained(tiny(tokenizer), tokenizer, tmp_path / "model")
    with caplog.at_level(logging.INFO, logger="sc_foundation"):
        ScFoundationForCellClassification.from_pretrained(target, new_heads=["classifier"], num_labels=2)
        AutoModel.from_pretrained(target)
    printed = capfd.readouterr()
    screen = printed.out + printed.err
    assert "LOAD REPORT" not in screen and "Loading weights" not in screen and "Writing model shards" not in screen
    assert "new heads ['classifier'] start from their initialisation" in caplog.text
    assert "dropped the checkpoint's heads ['gene_decoder']" in caplog.text

    # transformers' own handler holds whichever stderr existed when it was made: read its records directly.
    reports = []
    handler = logging.Handler()
    handler.emit = lambda record: reports.append(record.getMessage())
    transformers_loader = logging.getLogger("transformers.modeling_utils")
    transformers_loader.addHandler(handler)
    try:
        ScFoundationForCellClassification.from_pretrained(target, new_heads=["classifier"], num_labels=2)
        assert not any("LOAD REPORT" in report for report in reports)
        logging.getLogger("sc_foundation").setLevel(logging.DEBUG)
        ScFoundationForCellClassification.from_pretrained(target, new_heads=["classifier"], num_labels=2)
    finally:
        logging.getLogger("sc_foundation").setLevel(logging.NOTSET)
        transformers_loader.removeHandler(handler)
    assert any("LOAD REPORT" in report for report in reports), "the full report under DEBUG"


def test_tokenizer_and_vocabulary_say_what_they_are(tokenizer):
    assert repr(tokenizer).startswith(f"GeneTokenizer({len(tokenizer.vocab):,} tokens, rank values, context 128")
    assert "rank medians of" in repr(tokenizer)
    assert repr(tokenizer.vocab).startswith(f"GeneVocab({len(tokenizer.vocab):,} tokens: ")
    assert "<pad>" in repr(tokenizer.vocab) and "ENSG" in repr(tokenizer.vocab)


def test_the_main_commands_export_is_found_past_newer_smoke_runs(tokenizer, tmp_path):
    from sc_foundation.models.export import main_command_export

    def run(stamp: str, overrides: str, exports=("best", "final")) -> Path:
        folder = tmp_path / "outputs" / stamp
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(overrides)
        for name in exports:
            export_pretrained(tiny(tokenizer), tokenizer, folder / "export" / name)
        return folder

    with pytest.raises(FileNotFoundError, match=r"python train\.py"):
        main_command_export(tmp_path)
    older = run("2026-11-30/09-00-00", "[]\n")
    main = run("2026-12-01/09-00-00", "[]\n", exports=("final",))  # no validation ran: final
    run("2026-12-01/10-00-00", "- experiment=cpu_smoke\n")  # newer, but a smoke run
    assert main_command_export(tmp_path) == main / "export" / "final"
    assert older != main
