"""train.py composes its real Hydra config and builds the corpus store from it."""

from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

import train
from sc_foundation.store import CorpusStore

CONF = str(Path(__file__).parents[1] / "conf")


def test_train_builds_and_reuses_the_corpus_store(tmp_path, real_slice, capsys):
    kang = real_slice("kang_ifnb/kang_ifnb.h5ad", np.arange(0, 14000, 70))
    kang.write_h5ad(tmp_path / "kang.h5ad")
    overrides = [
        "data.datasets=[]",
        f"data.files=[{tmp_path / 'kang.h5ad'}]",
        f"paths.cache={tmp_path / 'cache'}",
        "data.tokenizer.context_length=256",
        "data.build_workers=1",
        "data.min_cells_per_gene=1",
    ]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    result = train.run(cfg)
    printed = capsys.readouterr().out
    assert "kang.h5ad" in printed and "corpus store:" in printed
    store = CorpusStore(result["store"])
    assert len(store) == 200
    assert store.lengths.max() == 256
    assert store.obs["condition"].notna().all()
    assert result["padding"]["length_grouped"] <= result["padding"]["random"]

    again = train.run(cfg)
    assert again["report"].n_cells == 200
