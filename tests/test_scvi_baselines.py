"""scVI baselines on a real slice of CellBench; skipped unless the ``baselines`` extra (scvi-tools) is installed."""

import pytest

pytest.importorskip("scvi")

import contextlib
import sys

import numpy as np
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from sc_foundation.tasks.scvi_baselines import scvi_latent, scvi_normalized_expression

from .conftest import CELLBENCH

# Short training keeps each fit under a second on 2 CPU cores. With 10 epochs the kNN accuracy below was 0.95-0.98
# over seeds 0-9 on this slice, while an untrained encoder (max_epochs=0) gave 0.60-0.85: the cell lines are distinct
# enough that even a random projection separates them somewhat, so the 0.9 bar tests that training happened.
EPOCHS = 10


@pytest.fixture(scope="module")
def cells(real_slice):
    """Every other CellBench cell (250 cells, both protocols, three cell lines); raw uint16 counts in X."""
    return real_slice(CELLBENCH, np.arange(0, 499, 2))


@pytest.fixture(scope="module")
def latent(cells, tmp_path_factory):
    """(250, 10) latent of the slice, fitted in an empty working directory that must stay empty (no lightning_logs)."""
    workdir = tmp_path_factory.mktemp("cwd")
    with contextlib.chdir(workdir):
        z = scvi_latent(cells, cells.obs["batch"].to_numpy(), max_epochs=EPOCHS, seed=0)
    assert list(workdir.iterdir()) == []
    return z


def test_latent_shape_and_values(cells, latent):
    assert latent.shape == (cells.n_obs, 10)
    assert latent.dtype == np.float32
    assert np.isfinite(latent).all()
    assert latent.std(axis=0).min() > 0  # no collapsed dimension shared by every cell


def test_latent_separates_cell_lines(cells, latent):
    labels = cells.obs["cell_type"].to_numpy()
    accuracy = cross_val_score(KNeighborsClassifier(n_neighbors=15), latent, labels, cv=5).mean()
    assert accuracy > 0.9
    # Rows must stay aligned with cells: the same latent with its rows shuffled is near chance (majority 0.42).
    shuffled = latent[np.random.default_rng(0).permutation(len(latent))]
    assert cross_val_score(KNeighborsClassifier(n_neighbors=15), shuffled, labels, cv=5).mean() < 0.6


def test_latent_reproducible_and_seeded(cells, latent):
    batches = cells.obs["batch"].to_numpy()
    again = scvi_latent(cells, batches, max_epochs=EPOCHS, seed=0)
    np.testing.assert_array_equal(again, latent)
    other = scvi_latent(cells, batches, max_epochs=EPOCHS, seed=1)
    assert not np.array_equal(other, latent)


def test_latent_without_batch_dense_input_untouched(cells, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written to the working directory (no lightning_logs)
    dense = cells.copy()
    dense.X = dense.X.toarray()
    before = dense.X.copy()
    z = scvi_latent(dense, None, n_top_genes=500, n_latent=4, max_epochs=2, seed=0)
    assert z.shape == (cells.n_obs, 4)
    assert np.isfinite(z).all()
    np.testing.assert_array_equal(dense.X, before)
    assert list(tmp_path.iterdir()) == []


def test_latent_rejects_misshaped_batches(cells):
    with pytest.raises(ValueError, match="batches"):
        scvi_latent(cells, np.zeros(3), max_epochs=1)


def _some_genes(cells, n=300):
    """(n_cells, n) sparse raw counts of the first n genes expressed in these cells (summed as float: uint16 wraps)."""
    totals = np.asarray(cells.X.astype(np.float64).sum(axis=0)).ravel()
    return cells.X[:, np.flatnonzero(totals > 0)[:n]]


def test_normalized_expression(cells, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    counts = _some_genes(cells)  # (250, 300) sparse uint16
    fractions = scvi_normalized_expression(counts, max_epochs=EPOCHS, seed=0)
    assert fractions.shape == (cells.n_obs, 300)
    assert fractions.dtype == np.float32
    assert np.isfinite(fractions).all()
    assert (fractions >= 0).all()
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0, atol=1e-4)
    assert list(tmp_path.iterdir()) == []

    # Same seed, same result; dense input gives the same model as sparse.
    dense = scvi_normalized_expression(counts.toarray(), max_epochs=EPOCHS, seed=0)
    np.testing.assert_array_equal(dense, fractions)
    other = scvi_normalized_expression(counts, max_epochs=EPOCHS, seed=1)
    assert not np.array_equal(other, fractions)


@pytest.mark.slow
def test_normalized_expression_beats_constant_profile(cells):
    """With its default training, scVI's predicted counts track the observed ones better than a constant profile.

    The constant profile gives every cell the genes' pooled fractions times its library size. Measured on this slice:
    Pearson r of log1p counts 0.80 for the constant profile; scVI 0.67 after 10 epochs, 0.82 after 100 and 0.89 with
    the default 400, so this needs the full training (about 15 s on 2 cores) and is marked slow. These are the cells
    scVI was trained on: a sanity check of the decoder and the library-size scaling, not a held-out imputation score.
    """
    counts = _some_genes(cells)
    fractions = scvi_normalized_expression(counts, seed=0)  # default max_epochs
    observed = counts.toarray().astype(np.float64)
    library = observed.sum(axis=1, keepdims=True)
    constant = observed.sum(axis=0, keepdims=True) / observed.sum() * library
    log_observed = np.log1p(observed).ravel()
    r_scvi = np.corrcoef(np.log1p(fractions * library).ravel(), log_observed)[0, 1]
    r_constant = np.corrcoef(np.log1p(constant).ravel(), log_observed)[0, 1]
    assert r_scvi > r_constant + 0.03


def test_clear_import_error_without_scvi(cells, monkeypatch):
    monkeypatch.setitem(sys.modules, "scvi", None)  # makes `import scvi` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[baselines\]\""):
        scvi_latent(cells, None)
    with pytest.raises(ImportError, match="pip install scvi-tools"):
        scvi_normalized_expression(np.ones((3, 4)))
