"""The ``sc-foundation`` command (also ``python -m sc_foundation``): one subcommand per job, each a thin layer over the
Python API.

- ``pretrain [overrides]`` and ``finetune [overrides]`` are Hydra applications over the configs shipped in the
  package (``pkg://sc_foundation.conf``): every Hydra flag works (``--help``, ``--cfg job``, ``--config-dir DIR``
  for a folder of one's own configs, ``-m`` sweeps).
- ``embed``, ``annotate`` and ``impute`` read an ``.h5ad`` of raw counts and write it back with the results under
  the keys the Python functions use (``obsm["X_sc_foundation"]``, ``obs["sc_foundation"]``,
  ``layers["sc_foundation_imputed"]``), through a temporary file and a rename.
- ``convert`` turns a published scGPT or Geneformer folder into our export.
- ``probe`` scores the cell embedding of any export (or published folder) on the probe sets, against PCA
  (and scVI): bio and batch mixing.

A failed command prints its error on one line (what is wrong, with the file or key, and the fix) and exits with
status 1; the traceback goes to the run's log (``<output_dir>/train.log`` or ``finetune.log``), and to the screen
with ``HYDRA_FULL_ERROR=1`` (or ``SC_FOUNDATION_DEBUG=1``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sc_foundation.conf import SEARCH_PATH

PROG = "sc-foundation"


def _hydra_app(config_name: str, runner: str) -> Callable[[Sequence[str]], None]:
    """A subcommand that hands its arguments to a Hydra application over ``conf/<config_name>.yaml``, whose config is
    checked (:func:`~sc_foundation.conf.checks.check_config`) before ``runner`` (``"module:function"``) is imported:
    a bad override fails without waiting for Lightning and scanpy to load."""

    def command(argv: Sequence[str]) -> None:
        import hydra
        from omegaconf import DictConfig

        @hydra.main(version_base="1.3", config_path=SEARCH_PATH, config_name=config_name)
        def main(cfg: DictConfig) -> None:
            try:
                from sc_foundation.conf.checks import check_config

                check_config(cfg, config_name)
                module, _, function = runner.partition(":")
                getattr(importlib.import_module(module), function)(cfg)
            except Exception as error:
                fail(error, config_name, _run_logs())

        # Hydra reads sys.argv; its --help then names the subcommand rather than this module.
        sys.argv = [f"{PROG} {config_name}", *argv, *_run_dir_follows_output_dir(argv)]
        main()

    return command


def _run_dir_follows_output_dir(argv: Sequence[str]) -> list[str]:
    """``hydra.run.dir=<output_dir>`` when the arguments set ``output_dir`` and not Hydra's run folder: the run's log
    (``train.log``, ``.hydra/``) then lands beside its exports instead of in ``outputs/<date>/<time>``."""
    chosen = [arg.split("=", 1)[1] for arg in argv if arg.startswith("output_dir=")]
    if chosen and chosen[-1] not in ("null", "") and not any(arg.startswith("hydra.run.dir=") for arg in argv):
        return [f"hydra.run.dir={chosen[-1]}"]
    return []


# ------------------------------------------------------------------------------------------------- user errors
DEBUG_VARIABLES = ("HYDRA_FULL_ERROR", "SC_FOUNDATION_DEBUG")
"""Set either to 1 to see the full traceback of a failed command on the screen (it always goes to the run's log)."""
USER_ERRORS = (ValueError, OSError, LookupError)
"""What bad input raises (ConfigError, InvalidInputError, ConversionError and ChecksumError are ValueErrors;
FileNotFoundError an OSError): its message is the whole story. Anything else is shown with its type too."""


def _debugging() -> bool:
    return any(os.environ.get(name, "0") not in ("", "0") for name in DEBUG_VARIABLES)


def _run_logs() -> list[logging.FileHandler]:
    """The file handlers of Hydra's job logging: the run's ``<output_dir>/<job name>.log`` (train.log, finetune.log)."""
    return [handler for handler in logging.getLogger().handlers if isinstance(handler, logging.FileHandler)]


def fail(error: Exception, command: str, logs: Sequence[logging.Handler] = ()) -> None:
    """End a failed command: its error on one line on stderr, the traceback in the run's log (``logs``), and on the
    screen too when a debug variable is set (:data:`DEBUG_VARIABLES`), then exit with status 1."""
    if _debugging():
        raise error
    message = " ".join(str(error).split()) or "(no message)"
    if not isinstance(error, USER_ERRORS) or isinstance(error, KeyError | UnicodeError):
        message = f"{type(error).__name__}: {message}"
    logger = logging.getLogger("sc_foundation.cli")
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 0, message, None, (type(error), error, error.__traceback__)
    )
    for handler in logs:
        handler.handle(record)  # only the log files: the screen gets the one line below
    debug = f"{DEBUG_VARIABLES[0]}=1 shows it here" if logs else f"{DEBUG_VARIABLES[0]}=1 shows the traceback"
    where = f"the traceback is in {logs[0].baseFilename}; " if logs else ""
    print(f"{PROG} {command}: error: {message} ({where}{debug})", file=sys.stderr)
    sys.exit(1)


_pretrain = _hydra_app("pretrain", "sc_foundation.training.pretrain:run")
_finetune = _hydra_app("finetune", "sc_foundation.tasks:run")


# ------------------------------------------------------------------------------------------ AnnData in, AnnData out
def _anndata_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an exported model folder, or a published scGPT/Geneformer one")
    parser.add_argument("--input", required=True, type=Path, help="an .h5ad file of raw counts")
    parser.add_argument("--output", required=True, type=Path, help="the .h5ad to write (may be --input itself)")
    parser.add_argument("--layer", help="read the counts from layers[LAYER] instead of X")
    parser.add_argument("--use-raw", action="store_true", help="read the counts from raw.X")
    parser.add_argument("--gene-key", help="the var column of the gene ids (default: var_names)")
    parser.add_argument("--species", default="auto", help="human, mouse or auto (default)")
    parser.add_argument("--batch-size", type=int, help="cells per forward pass (does not change the result)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])


def _read(path: Path):
    import anndata

    if not path.is_file():
        raise FileNotFoundError(f"--input {path} does not exist: pass an .h5ad file of raw counts")
    return anndata.read_h5ad(path)


def _common(args: argparse.Namespace) -> dict:
    return {
        "layer": args.layer,
        "use_raw": args.use_raw,
        "gene_key": args.gene_key,
        "species": args.species,
        "batch_size": args.batch_size,
        "precision": args.precision,
    }


def _write(adata, args: argparse.Namespace, what: str) -> None:
    from sc_foundation.data.io import write_h5ad_atomic

    write_h5ad_atomic(adata, args.output)
    match = adata.uns["sc_foundation"]["match_rate"]
    print(f"{what}; {adata.n_obs:,} cells, {match:.1%} of the input genes in the vocabulary -> {args.output}")


def _embed(args: argparse.Namespace) -> None:
    from sc_foundation.inference import embed

    adata = _read(args.input)
    embed(adata, args.model, key_added=args.key_added, **_common(args))
    _write(adata, args, f"obsm[{args.key_added!r}]: {adata.obsm[args.key_added].shape[1]}-dimensional cell embedding")


def _annotate(args: argparse.Namespace) -> None:
    from sc_foundation.inference import annotate

    adata = _read(args.input)
    annotate(
        adata,
        args.model,
        key_added=args.key_added,
        unknown_threshold=args.unknown_threshold,
        refuse_novel=args.refuse_novel,
        **_common(args),
    )
    counts = adata.obs[args.key_added].value_counts()
    top = ", ".join(f"{label} {n:,}" for label, n in counts.head(5).items())
    _write(adata, args, f"obs[{args.key_added!r}]: {top}{', ...' if len(counts) > 5 else ''}")


def _impute(args: argparse.Namespace) -> None:
    from sc_foundation.inference import impute

    adata = _read(args.input)
    impute(adata, args.model, layer_added=args.layer_added, batch_key=args.batch_key, **_common(args))
    _write(adata, args, f"layers[{args.layer_added!r}]: imputed expression")


def _convert(args: argparse.Namespace) -> None:
    from sc_foundation.models.convert import main as convert_main

    argv = [str(args.src), str(args.dst)]
    if args.token_dictionary:
        argv += ["--token-dictionary", str(args.token_dictionary)]
    if args.gene_median_dictionary:
        argv += ["--gene-median-dictionary", str(args.gene_median_dictionary)]
    convert_main(argv)


def _probe(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf

    from sc_foundation.conf import compose
    from sc_foundation.data.genes import _atomic_write_text
    from sc_foundation.models.export import load_pretrained
    from sc_foundation.training.model_card import probe_table
    from sc_foundation.training.probes import ProbeSet, RepresentationProbe

    settings = OmegaConf.to_container(compose("pretrain").probes.sets, resolve=True)
    known = {s["name"]: s for s in settings}
    names = args.sets.split(",") if args.sets else list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"--sets: no probe set named {unknown}; the probe sets are {sorted(known)}")
    sets = [ProbeSet(**{**known[name], "max_cells": args.max_cells}) for name in names]
    results = RepresentationProbe(sets, seed=args.seed, scvi=args.scvi).evaluate(load_pretrained(args.model))
    print(probe_table(results))
    if args.json:
        _atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
        print(f"scores -> {args.json}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Single-cell foundation models: pretrain, fine-tune, and embed, annotate or impute AnnData.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "pretrain", add_help=False, help="pretrain a model (Hydra overrides, e.g. experiment=cpu_pretrain; --help)"
    )
    commands.add_parser(
        "finetune", add_help=False, help="fine-tune a model for a task (task=annotation pretrained=DIR ...; --help)"
    )

    embed = commands.add_parser("embed", help="write the cell embedding into obsm")
    _anndata_arguments(embed)
    embed.add_argument("--key-added", default="X_sc_foundation", help="the obsm key (default X_sc_foundation)")
    embed.set_defaults(handler=_embed)

    annotate = commands.add_parser("annotate", help="write cell types from a fine-tuned annotation model into obs")
    _anndata_arguments(annotate)
    annotate.add_argument("--key-added", default="sc_foundation", help="the obs column (default sc_foundation)")
    annotate.add_argument(
        "--unknown-threshold", type=float, help="label cells whose top probability is below this 'unknown'"
    )
    annotate.add_argument(
        "--refuse-novel",
        action="store_true",
        help="label cells farther from the training cells than the model's novelty threshold 'unknown' (a cell type "
        "the model never saw)",
    )
    annotate.set_defaults(handler=_annotate)

    impute = commands.add_parser("impute", help="write imputed expression from an imputation model into layers")
    _anndata_arguments(impute)
    impute.add_argument(
        "--layer-added", default="sc_foundation_imputed", help="the layer (default sc_foundation_imputed)"
    )
    impute.add_argument("--batch-key", help="the obs column of the batch, for a batch-conditioned model")
    impute.set_defaults(handler=_impute)

    convert = commands.add_parser("convert", help="convert a published scGPT or Geneformer folder into our export")
    convert.add_argument("src", type=Path, help="the published folder")
    convert.add_argument("dst", type=Path, help="the export folder to write (replaced if it exists)")
    convert.add_argument("--token-dictionary", type=Path, help="Geneformer: the token dictionary pickle")
    convert.add_argument("--gene-median-dictionary", type=Path, help="Geneformer: the gene median pickle")
    convert.set_defaults(handler=_convert)

    probe = commands.add_parser("probe", help="score a model's cell embedding on the probe sets, against PCA")
    probe.add_argument("model", help="an exported model folder, or a published scGPT/Geneformer one")
    probe.add_argument("--sets", help="comma-separated probe set names (default: every set of conf/pretrain.yaml)")
    probe.add_argument("--max-cells", type=int, default=2000, help="cells per probe set (default 2000)")
    probe.add_argument("--seed", type=int, default=0, help="subsample and fold seed")
    probe.add_argument("--scvi", action="store_true", help="also score scVI trained on each set (baselines extra)")
    probe.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    probe.set_defaults(handler=_probe)
    return parser


HYDRA_COMMANDS = {"pretrain": _pretrain, "finetune": _finetune}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The Hydra subcommands take their own arguments (overrides, --help, --cfg): argparse must not read them.
    if argv and argv[0] in HYDRA_COMMANDS:
        HYDRA_COMMANDS[argv[0]](argv[1:])
        return
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except Exception as error:
        fail(error, args.command)


if __name__ == "__main__":
    main()
