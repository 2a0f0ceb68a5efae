"""Benchmark: how much batch signal each integration embedding keeps, against its own perfectly mixed control.

Batch ASW and iLISI score an embedding's geometry as well as its batch mixing (see
:func:`sc_foundation.tasks.evaluation.batch_mixing_control`): with many small batches a type whose batches are
perfectly mixed still scores a batch ASW below 1, the lower the fewer directions its cells vary in. This script reads
the ``embeddings.npz`` that ``finetune.py task=integration`` (and ``benchmarks/quality.py``'s integration rows) write,
and for every embedding in it (ours, PCA, Harmony, scVI, the pretrained backbone) scores batch ASW and iLISI with the
real batches and with each cell type's batches permuted among its cells. Where real and mixed agree, no batch signal
is left and the score's distance from 1 is the geometry's.

    python benchmarks/batch_mixing_control.py --out DIR RUN_DIR [RUN_DIR ...] [--shuffles 5]

A RUN_DIR holds ``embeddings.npz`` (with ``batch`` and ``label``). Writes ``batch_mixing_control.json`` and
``batch_mixing_control.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _corpus import machine_info, write_report

from sc_foundation.tasks.evaluation import batch_mixing_control

NOT_EMBEDDINGS = ("cell_id", "batch", "label")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="integration output directories (embeddings.npz)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shuffles", type=int, default=5, help="permutations of the batches within each type")
    return parser.parse_args(argv)


def run_controls(run: Path, shuffles: int) -> dict:
    """embedding name -> :func:`batch_mixing_control` scores, for every embedding of ``run``'s ``embeddings.npz``."""
    path = run / "embeddings.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the output directory of an integration run")
    with np.load(path, allow_pickle=False) as saved:
        if "label" not in saved:
            raise ValueError(f"{path} has no labels (the run had label_key=null): batch ASW is scored within labels")
        batches, labels = saved["batch"], saved["label"]
        names = [name for name in saved.files if name not in NOT_EMBEDDINGS]
        return {name: batch_mixing_control(saved[name], batches, labels, shuffles) for name in names}


def markdown(record: dict) -> str:
    lines = [
        "# Batch mixing against each embedding's mixed control",
        "",
        "real / mixed (each type's batches permuted among its cells); a gap is batch signal left.",
        "",
        "| run | embedding | batch ASW | mixed | iLISI | mixed |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for run, embeddings in record["runs"].items():
        for name, s in embeddings.items():
            lines.append(
                f"| {run} | {name} | {s['asw_batch']:.3f} | {s['asw_batch_mixed']:.3f} | {s['ilisi']:.3f} "
                f"| {s['ilisi_mixed']:.3f} |"
            )
    return "\n".join(lines) + f"\n\n{record['wall_s']:.0f} s\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    runs = {str(run): run_controls(run, args.shuffles) for run in args.runs}
    record = {
        "shuffles": args.shuffles,
        "runs": runs,
        "machine": machine_info(),
        "wall_s": time.perf_counter() - started,
    }
    write_report(args.out, "batch_mixing_control", record, markdown(record))
    return record


if __name__ == "__main__":
    main()
