"""TileDB-SOMA input: a Census-shaped local experiment written from real cells builds the store its h5ad gives."""

import numpy as np
import pandas as pd
import pytest

from sc_foundation.data.io import InvalidInputError
from sc_foundation.data.store import CorpusInput, CorpusStore, build_store
from sc_foundation.data.tokenization import TokenizerConfig

tiledbsoma_io = pytest.importorskip("tiledbsoma.io")

CELLBENCH = "cellbench_3cl/cellbench_3cl.h5ad"
OBS_KEYS = ["cell_type", "assay", "donor_id"]
CONFIG = TokenizerConfig(context_length=256)


@pytest.fixture(scope="module")
def census_like(real_slice, tmp_path_factory):
    """200 real CellBench cells shaped like a Census experiment: Ensembl ``feature_id`` in var, counts in the
    ``raw`` X layer of measurement ``RNA``, obs ``cell_type``/``assay``/``donor_id``/``is_primary_data``. Returns the
    experiment's folder and an ``.h5ad`` of its primary cells only."""
    folder = tmp_path_factory.mktemp("soma")
    adata = real_slice(CELLBENCH, np.r_[0:100, 399:499])
    adata.obs = pd.DataFrame(
        {
            "cell_type": adata.obs["cell_type"].astype(str).to_numpy(),
            "assay": adata.obs["batch"].astype(str).to_numpy(),
            "donor_id": np.where(np.arange(200) % 3 == 0, "donor-a", "donor-b"),
            "is_primary_data": np.arange(200) % 4 != 1,  # a quarter are duplicates, as in the Census
        },
        index=adata.obs_names,
    )
    adata.var = pd.DataFrame({"feature_id": adata.var_names.to_numpy()}, index=adata.var_names)
    adata.write_h5ad(folder / "census_like.h5ad")
    uri = str(folder / "experiment")
    tiledbsoma_io.from_h5ad(uri, folder / "census_like.h5ad", "RNA", X_layer_name="raw")
    primary = adata[adata.obs["is_primary_data"].to_numpy()].copy()
    primary.write_h5ad(folder / "primary.h5ad")
    return uri, folder / "primary.h5ad"


def test_soma_experiment_gives_the_tokens_of_its_h5ad(census_like, tmp_path):
    """The SOMA path (value filter, obs columns, feature_id genes, parts of 64 cells) stores exactly the cells,
    labels and tokens that the h5ad path stores for the same 150 primary cells."""
    uri, primary = census_like
    soma_input = {"path": uri, "value_filter": "is_primary_data == True", "batch_key": "assay"}
    common = {"tokenizer_config": CONFIG, "obs_keys": OBS_KEYS, "min_cells_per_gene": 3, "chunk_size": 50}
    soma_report = build_store([soma_input], tmp_path / "soma", part_size=64, **common)
    h5ad_report = build_store(
        [{"path": primary, "gene_key": "feature_id", "batch_key": "assay"}], tmp_path / "h5ad", **common
    )
    assert soma_report.n_cells == h5ad_report.n_cells == 150
    soma, h5ad = CorpusStore(tmp_path / "soma"), CorpusStore(tmp_path / "h5ad")
    assert len(list((tmp_path / "soma" / "shards").glob("*.arrow"))) == 3
    assert soma.tokenizer == h5ad.tokenizer
    columns = ["cell_id", "batch", *OBS_KEYS, "length", "n_counts", "n_expressed"]
    pd.testing.assert_frame_equal(
        soma.obs[columns].astype(str).reset_index(drop=True), h5ad.obs[columns].astype(str).reset_index(drop=True)
    )
    assert set(soma.obs["cell_type"]) == {"H1975", "H2228", "HCC827"}
    for index in range(len(soma)):
        assert np.array_equal(soma[index][0], h5ad[index][0])
        assert np.array_equal(soma[index][1], h5ad[index][1])
    assert soma_report.shards[0].n_genes_detected_matched == h5ad_report.shards[0].n_genes_detected_matched


def test_soma_bad_settings_say_what_to_fix(census_like, tmp_path):
    uri, _ = census_like
    cases = [
        ({"path": uri, "measurement": "ATAC"}, "no measurement 'ATAC'.*RNA"),
        ({"path": uri, "layer": "counts"}, "no X layer 'counts'.*raw"),
        ({"path": uri, "gene_key": "ensembl"}, "no var column 'ensembl'.*feature_id"),
        ({"path": uri, "value_filter": "no_such_column == 1"}, "value_filter .* failed.*obs columns"),
    ]
    for settings, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            build_store([settings], tmp_path / "bad", tokenizer_config=CONFIG, min_cells_per_gene=1)
    with pytest.raises(ValueError, match=r"census= takes \{version, organism, value_filter\}"):
        CorpusInput.coerce({"census": {"organism": "homo_sapiens"}})
    census = CorpusInput.coerce({"census": {"version": "2025-01-30", "value_filter": "is_primary_data == True"}})
    assert census.path == "census:2025-01-30/homo_sapiens" and census.is_soma
