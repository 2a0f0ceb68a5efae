"""Pretraining entry point: ``python train.py [hydra overrides]``.

Builds (or reuses) the tokenized corpus store of ``conf/data``, prints its report and the batch padding figures.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sc_foundation.data import CorpusDataModule
from sc_foundation.datasets import corpus_inputs
from sc_foundation.store import build_store
from sc_foundation.tokenization import TokenizerConfig


def build_corpus(cfg: DictConfig):
    """The corpus store described by ``cfg.data``: built, resumed, or reused when complete."""
    data = cfg.data
    inputs = corpus_inputs(list(data.datasets), OmegaConf.to_container(data.files, resolve=True))
    return build_store(
        inputs,
        data.store_dir,
        tokenizer_config=TokenizerConfig(**OmegaConf.to_container(data.tokenizer, resolve=True)),
        vocab=data.vocab,
        min_cells_per_gene=data.min_cells_per_gene,
        obs_keys=list(data.obs_keys),
        chunk_size=data.chunk_size,
        num_workers=data.build_workers,
    )


def run(cfg: DictConfig) -> dict:
    """Everything ``train.py`` does, callable from tests with a composed config."""
    report = build_corpus(cfg)
    print(report.format())
    datamodule = CorpusDataModule(report.path, seed=cfg.seed, **OmegaConf.to_container(cfg.data.loader, resolve=True))
    datamodule.setup()
    padding = datamodule.padding_report()
    print(
        f"train/val cells: {len(datamodule.train_indices)}/{len(datamodule.val_indices)}; padded share of token "
        f"slots per epoch: {padding['length_grouped']:.1%} length-grouped vs {padding['random']:.1%} random batches"
    )
    print(f"corpus store: {Path(report.path).resolve()}")
    return {"store": report.path, "report": report, "padding": padding}


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
