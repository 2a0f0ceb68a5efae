"""The example notebooks in notebooks/: committed without outputs, and each one runs end to end on real data.

Every notebook starts with a code cell tagged ``parameters`` (papermill's convention) holding the inputs a user edits.
The test executes a copy of the notebook with nbclient in a fresh ``python3`` kernel whose working directory is a
temporary folder: it inserts a cell right after the parameters cell that overrides them (the tiny ``pretrained``
export of conftest.py, the shared data, a temporary output folder, a short fine-tuning run), and appends a probe cell
that writes a few of the notebook's own variables to a JSON file, which the case's ``check`` then examines. The
executed copy goes to the test's temporary folder (kept for debugging), never back into the repository.

Adding a notebook takes one entry in ``CASES``: its parameter overrides, the probe expression and the checks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from tests.conftest import CELLBENCH

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 600  # per cell; a whole notebook takes seconds to tens of seconds on 2 cores
# Quiet, short fine-tuning: no progress bar or model summary in the cell output, no CSV logger.
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "~logger"]
# Short: MAX_EPOCHS=2, so two validations (early stopping and the best export work), smaller baselines.
SHORT = ["data.panel_genes=200", "baselines.n_top_genes=500", "baselines.n_pcs=20", "baselines.scvi=false"]


@dataclass(frozen=True)
class Run:
    """What a case's parameters and checks can use."""

    pretrained: Path
    data: Path
    output_dir: Path
    published: dict | None = None
    """The stand-ins of the published checkpoints (conftest's ``published``), for the cases that need them."""


@dataclass(frozen=True)
class Case:
    parameters: Callable[[Run], dict]
    """Values assigned (as Python literals) in the cell inserted after the notebook's parameters cell."""
    probe: str
    """An expression evaluated in the kernel after the last cell; it must be JSON-serialisable."""
    check: Callable[[dict, Run], None]
    """Assertions on the probe's value (and on files the notebook wrote)."""
    images: int = 1
    """How many images (plots) the executed notebook shows at least."""
    needs_published: bool = False
    """Whether the case runs on the published-checkpoint stand-ins (``Run.published``)."""
    stated: dict[str, str] | None = None
    """Probe key -> a regular expression whose group is the figure the notebook's prose states for it, as the
    notebook printed it on the main command's export (checked by the slow ``test_notebook_prose_states_its_figures``).
    """


def _check_embed(probe: dict, run: Run) -> None:
    n_obs, hidden = probe["embedding_shape"]
    assert n_obs == probe["n_obs"] == 700 and hidden == probe["hidden_size"] == 32
    assert probe["all_finite"]
    assert 0.5 <= probe["match_rate"] <= 1.0
    assert probe["clusters"] in ("leiden", "kmeans") and probe["n_clusters"] >= 2
    assert probe["umap_shape"] == [n_obs, 2]
    assert -1.0 <= probe["ari"] <= 1.0
    assert probe["ari_pca"] > 0.3, "the PCA baseline the prose compares against recovers the PBMC cell types"


def _check_annotation(probe: dict, run: Run) -> None:
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    assert metrics["task"] == "annotation" and metrics["steps"] > 0 and metrics["epochs"] <= 2
    assert math.isfinite(metrics["model"]["macro_f1"]) and 0.0 <= metrics["model"]["macro_f1"] <= 1.0
    assert probe["names"] == metrics["model"]["labels"] and len(probe["names"]) == 3
    # annotate() on the AnnData, tokenizing on the fly, sees the test cells as finetune.py scored them from its store.
    assert probe["n_test"] == metrics["n_cells"]["test"] == metrics["model"]["n_cells"]
    assert probe["ours"]["accuracy"] == pytest.approx(metrics["model"]["accuracy"])
    assert probe["ours"]["macro_f1"] == pytest.approx(metrics["model"]["macro_f1"])
    assert probe["ours"]["confusion_matrix"] == metrics["model"]["confusion_matrix"]
    assert set(probe["table_index"]) >= {"sc_foundation (annotate)", "hvg_logreg", "pca_logreg"}
    assert all(math.isfinite(f1) for f1 in probe["table_macro_f1"])


def _check_integration(probe: dict, run: Run) -> None:
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    assert metrics["task"] == "integration" and metrics["steps"] > 0 and metrics["epochs"] <= 2
    # the baselines in metrics.json's order; "pretrained" is the backbone before fine-tuning, on the same tokens
    assert probe["table_index"] == ["sc_foundation", "pca", "harmony", "pretrained"]
    for column in ("total", "bio", "batch", "avg_bio", "ilisi", "nmi"):
        assert column in probe["table_columns"]
    assert all(math.isfinite(x) for x in probe["table_total"])
    assert probe["table_total"][0] == pytest.approx(metrics["model"]["total"])
    for key in ("X_pca", "X_harmony", "X_sc_foundation", "X_umap_pca", "X_umap_harmony", "X_umap_sc_foundation"):
        assert probe["obsm_shapes"][key][0] == 499, key
    assert probe["obsm_shapes"]["X_sc_foundation"] == [499, 16]  # the variational latent's mean
    # sc_foundation.embed() on the AnnData reproduces the embedding finetune.py computed from its store.
    assert probe["embed_difference"] < 1e-4


def _check_protein(probe: dict, run: Run) -> None:
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    assert metrics["task"] == "multimodal" and metrics["modality"] == "protein"
    assert metrics["steps"] > 0 and metrics["epochs"] <= 2
    assert probe["shape"] == [metrics["n_cells"]["test"], 49] and probe["all_finite"]
    assert probe["obs_names_match"]
    # predict_modality() on the AnnData reproduces the scores finetune.py computed from its store.
    assert probe["ours"] == pytest.approx(metrics["prediction"]["model"]["pearson_feature_mean"], abs=1e-4)
    assert probe["table_index"][-1] == "ridge_rna_pca"


def _check_published(probe: dict, run: Run) -> None:
    assert probe["models"] == {"scGPT": "ScFoundationModel", "Geneformer": "ScFoundationForMaskedGeneModeling"}
    assert probe["shapes"] == {"scGPT": [700, 32], "Geneformer": [700, 32]}
    # scGPT's convention: L2-normalised <cls>; Geneformer's: a mean, not normalised.
    assert probe["norms"]["scGPT"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert probe["norms"]["Geneformer"][1] - probe["norms"]["Geneformer"][0] > 1e-3
    assert all(0.0 <= accuracy <= 1.0 for accuracy in [*probe["knn"].values(), *probe["other"].values()])
    assert probe["other_differs"]
    metrics = json.loads((run.output_dir / "metrics.json").read_text())
    assert metrics["task"] == "annotation" and metrics["steps"] > 0 and metrics["epochs"] <= 2
    assert (run.output_dir / "converted" / "model.safetensors").is_file()
    assert probe["table_index"][0] == "Geneformer, fine-tuned"


def published_parameters(run: Run) -> dict:
    """The stand-in folders instead of an export, and a short fine-tuning run."""
    parameters = finetuning_parameters(run)
    del parameters["PRETRAINED"]
    return parameters | {"SCGPT": str(run.published["scgpt"][0]), "GENEFORMER": str(run.published["geneformer_v2"][0])}


def inference_parameters(run: Run) -> dict:
    """The inputs every notebook has: the tiny export, the repository and the shared data."""
    return {"PRETRAINED": str(run.pretrained), "REPO": str(ROOT), "DATA": str(run.data)}


def finetuning_parameters(run: Run) -> dict:
    """Those plus a temporary output folder and a short, quiet fine-tuning run."""
    return {
        **inference_parameters(run),
        "OUTPUT_DIR": str(run.output_dir),
        "MAX_EPOCHS": 2,
        "OVERRIDES": [*QUIET, *SHORT],
    }


CASES: dict[str, Case] = {
    "01_embed_pbmc": Case(
        parameters=inference_parameters,
        probe="""{
            "n_obs": adata.n_obs,
            "embedding_shape": list(adata.obsm["X_sc_foundation"].shape),
            "hidden_size": model.config.hidden_size,
            "all_finite": bool(np.isfinite(adata.obsm["X_sc_foundation"]).all()),
            "match_rate": float(adata.uns["sc_foundation"]["match_rate"]),
            "clusters": CLUSTERS,
            "n_clusters": int(adata.obs[CLUSTERS].nunique()),
            "umap_shape": list(adata.obsm["X_umap"].shape),
            "ari": float(ari),
            "ari_pca": float(ari_pca),
        }""",
        check=_check_embed,
        stated={"ari": r"adjusted Rand index (\d\.\d+) for the embedding", "ari_pca": r"against (\d\.\d+) for\s+PCA's"},
    ),
    "02_annotation": Case(
        parameters=finetuning_parameters,
        probe="""{
            "names": names,
            "n_test": test.n_obs,
            "ours": ours,
            "table_index": list(table.index),
            "table_macro_f1": [float(x) for x in table["macro_f1"]],
            "macro_f1": float(ours["macro_f1"]),
            "macro_f1_hvg": float(metrics["baselines"]["hvg_logreg"]["macro_f1"]),
        }""",
        check=_check_annotation,
        stated={
            "macro_f1": r"macro-F1 (\d\.\d+) on the held-out",
            "macro_f1_hvg": r"against (\d\.\d+) for logistic\s+regression",
        },
    ),
    "03_integration": Case(
        parameters=finetuning_parameters,
        probe="""{
            "table_index": list(table.index),
            "table_columns": list(table.columns),
            "table_total": [float(x) for x in table["total"]],
            "obsm_shapes": {key: list(value.shape) for key, value in adata.obsm.items()},
            "embed_difference": float(difference),
            "total": float(table.loc["sc_foundation", "total"]),
            "total_pca": float(table.loc["pca", "total"]),
            "total_harmony": float(table.loc["harmony", "total"]),
        }""",
        check=_check_integration,
        stated={
            "total": r"scIB total (\d\.\d+) for the fine-tuned",
            "total_pca": r"against (\d\.\d+) for the unintegrated",
            "total_harmony": r"and (\d\.\d+) for Harmony",
        },
    ),
    "04_rna_to_protein": Case(
        parameters=finetuning_parameters,
        probe="""{
            "shape": list(predicted.shape),
            "all_finite": bool(np.isfinite(predicted.X).all()),
            "obs_names_match": list(predicted.obs_names) == list(test.obs_names),
            "ours": float(ours["pearson_feature_mean"]),
            "table_index": list(table.index),
            "ridge": float(ridge["pearson_feature_mean"]),
        }""",
        check=_check_protein,
        images=2,
        stated={"ours": r"held-out cells (\d\.\d+) for the", "ridge": r"against (\d\.\d+) for\s+ridge"},
    ),
    "05_published_checkpoints": Case(
        parameters=published_parameters,
        probe="""{
            "models": {name: type(m).__name__ for name, m in models.items()},
            "shapes": {name: list(adata.obsm[f"X_{name}"].shape) for name in models},
            "norms": {name: [float(n.min()), float(n.max())] for name, n in norms.items()},
            "knn": {key: float(value) for key, value in knn.items()},
            "other": {key: float(value) for key, value in other.items()},
            "other_differs": bool(np.abs(adata.obsm["X_Geneformer_last"] - adata.obsm["X_Geneformer"]).max() > 1e-4),
            "table_index": list(table.index),
        }""",
        check=_check_published,
        needs_published=True,
    ),
}


def notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def parameters_cell(notebook) -> int:
    """Index of the notebook's first code cell, which must be tagged ``parameters``."""
    index = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code")
    assert "parameters" in notebook.cells[index].metadata.get("tags", []), "the first code cell is not 'parameters'"
    return index


def test_every_notebook_has_a_case():
    names = {path.stem for path in notebook_paths()}
    assert names, f"no notebooks in {NOTEBOOKS}"
    assert names == set(CASES), f"notebooks without a case: {names - set(CASES)}; cases without: {set(CASES) - names}"


@pytest.mark.parametrize("path", notebook_paths(), ids=lambda path: path.stem)
def test_committed_notebooks_have_no_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    parameters_cell(notebook)
    code = [(i, cell) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    executed = [i for i, cell in code if cell.outputs or cell.execution_count is not None]
    assert not executed, f"{path.name}: cells {executed} have outputs; strip them (jupyter nbconvert --clear-output)"
    timed = [i for i, cell in code if "execution" in cell.metadata]
    assert not timed, f"{path.name}: cells {timed} carry execution timings in their metadata; strip them"
    assert "widgets" not in notebook.metadata, f"{path.name}: saved widget state; strip it"


def execute(name: str, parameters: dict, tmp_path: Path, monkeypatch) -> tuple[dict, list]:
    """Run notebook ``name`` with ``parameters`` assigned after its parameters cell; (the probe's value, the outputs).

    The executed copy goes to ``tmp_path`` (for debugging a failure), never back into the repository.
    """
    from nbclient import NotebookClient

    case = CASES[name]
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    injected = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(
        parameters_cell(notebook) + 1,
        new_code_cell(f"# Injected by tests/test_notebooks.py\n{injected}", metadata={"tags": ["injected"]}),
    )
    probe_file = tmp_path / "probe.json"
    probe = f"import json as _json\n_json.dump({case.probe.strip()}, open({str(probe_file)!r}, 'w'))"
    notebook.cells.append(new_code_cell(probe, metadata={"tags": ["probe"]}))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    # The kernel inherits this environment: no Weights & Biases, no downloads.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("SC_FOUNDATION_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    client = NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(notebook, tmp_path / f"{name}.executed.ipynb")
    assert not list(workdir.iterdir()), f"the notebook wrote into its working directory: {list(workdir.iterdir())}"
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    assert all(cell.execution_count for cell in notebook.cells if cell.cell_type == "code")
    return json.loads(probe_file.read_text()), outputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs(name, pretrained, shared_data, tmp_path, monkeypatch, request):
    if not (shared_data / CELLBENCH).exists():
        pytest.skip(f"{CELLBENCH} is missing from {shared_data}")
    case = CASES[name]
    published = request.getfixturevalue("published") if case.needs_published else None
    run = Run(pretrained=Path(pretrained), data=shared_data, output_dir=tmp_path / "output", published=published)
    probe, outputs = execute(name, case.parameters(run), tmp_path, monkeypatch)
    case.check(probe, run)
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= case.images


def stated_figures(name: str) -> dict[str, float]:
    """Probe key -> the figure the notebook's markdown states for it (its ``Case.stated`` patterns)."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    prose = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    figures = {}
    for key, pattern in (CASES[name].stated or {}).items():
        found = re.search(pattern, prose)
        assert found, f"{name}: the prose no longer states {key} ({pattern!r})"
        figures[key] = float(found.group(1))
    return figures


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.stated])
def test_every_stated_figure_is_found_in_the_prose(name):
    assert stated_figures(name)


@pytest.fixture(scope="module")
def main_command_export(tmp_path_factory):
    """The main command's export (``python train.py`` without overrides), in a cache of its own."""
    from sc_foundation.conf import compose
    from sc_foundation.training import pretrain

    out = tmp_path_factory.mktemp("main_command")
    result = pretrain.run(compose("pretrain", [f"output_dir={out}", f"paths.cache={out / 'cache'}"]))
    return result["best_export"] if (result["best_export"] / "config.json").exists() else result["export"]


@pytest.mark.slow  # the main command (minutes) and the notebook at its own settings
@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.stated])
def test_notebook_prose_states_its_figures(name, main_command_export, shared_data, tmp_path, monkeypatch):
    """What the prose says the notebook printed on the main command's export is what it prints (within 0.03: the
    run is deterministic on one machine, but another CPU's kernels move the last digits of a short training)."""
    run = Run(pretrained=Path(main_command_export), data=shared_data, output_dir=tmp_path / "output")
    parameters = {key: value for key, value in CASES[name].parameters(run).items() if key != "OVERRIDES"}
    parameters.pop("MAX_EPOCHS", None)  # the notebook's own budget
    probe, _ = execute(name, parameters, tmp_path, monkeypatch)
    for key, figure in stated_figures(name).items():
        assert probe[key] == pytest.approx(figure, abs=0.03), f"{name}: prints {key}={probe[key]:.3f}, says {figure}"
