"""Does pretraining learn cells? The representation probes of ``experiment=cpu_pretrain`` against PCA, and ablations.

``python benchmarks/pretrain_quality.py --out DIR`` runs, in this process:

1. the recipe (``train.run`` on ``conf/pretrain.yaml`` with ``experiment=cpu_pretrain``), unless ``--pretrained``
   names an export to score instead;
2. the probe table of its final export: :class:`sc_foundation.training.probes.RepresentationProbe` on every probe set
   of the config (more cells per set than the in-run probes), ours against PCA-50 of log-normalised HVGs of the same
   cells and scVI trained on them (``--scvi``), bio (kNN, AvgBIO) and batch mixing where a set has batches;
3. the probe curve of the run (``probe/<set>/knn_accuracy`` and ``avg_bio`` by step, PCA as dashed lines) as PNG;
4. with ``--ablations``, short runs that change one thing of the recipe each (objectives, batch-robust objectives,
   sampling, inputs, pooling, value encoding), at ``--ablation-steps`` steps, each probed the same way (bio and
   batch, PCA and scVI beside) and timed (cells/s of the training loop); ``--ablations-only`` skips 1-3;
5. fp32 against bf16 autocast training steps on this CPU (``--precision``), same batches, same process.

Writes ``DIR/pretrain_quality.json``, ``DIR/pretrain_quality.md`` and ``DIR/probe_curve.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _corpus import atomic_path, machine_info, write_json_atomic, write_report

REPO_ROOT = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
ABLATIONS: dict[str, list[str]] = {
    # objectives: each removes or adds one term of the recipe
    "masked_only": [
        "model.reconstruction_weight=0",
        "model.contrastive_weight=0",
        "data.loader.view_keep=null",
        "data.loader.view_depth=null",
    ],
    "no_contrastive": ["model.contrastive_weight=0", "data.loader.view_keep=null", "data.loader.view_depth=null"],
    "no_reconstruction": ["model.reconstruction_weight=0"],
    "no_masked": ["model.masked_weight=0"],
    "plus_ecs": ["model.ecs_weight=0.1"],
    "plus_mvc": ["model.mvc_weight=1.0"],
    # inputs
    "random_subset_not_top": ["data.tokenizer.truncation=random"],
    "context_256": ["data.tokenizer.context_length=256"],
    "context_64": ["data.tokenizer.context_length=64"],
    "all_expressed_genes": ["data.panel=null", "data.tokenizer.context_length=256", "data.tokenizer.truncation=random"],
    "cls_pooling": ["data.tokenizer.add_cls=true", "model.pooling=cls"],
    "binned_values": ["data.tokenizer.encoding=binned", "model.reconstruction_weight=0"],
    # model and contrastive settings
    "width_128": ["model.hidden_size=128", "model.intermediate_size=512"],
    "temperature_0.1": ["model.contrastive_temperature=0.1"],
    # batch-robust objectives over the corpus batches (each input file, data.batch_column=source) and sampling
    "batch_decoder": ["model.reconstruction_batch_conditioned=true"],
    "batch_adversary": ["model.adversarial_batch_weight=1.0"],
    "batch_adversary_0.1": ["model.adversarial_batch_weight=0.1"],
    "balanced_sources": ["data.loader.source_balance=0.5"],
    "batch_robust": [
        "model.reconstruction_batch_conditioned=true",
        "model.adversarial_batch_weight=0.1",
        "data.loader.source_balance=0.5",
    ],
    # label-free: views of each cell as two technical batches would measure it (thinner; other per-gene capture)
    "views_depth": ["data.loader.view_depth=[0.2,1.0]"],
    "views_without_depth": ["data.loader.view_depth=null"],
    "views_gene_scale": ["data.loader.view_gene_scale=0.5"],
    "technical_views": ["data.loader.view_depth=[0.2,1.0]", "data.loader.view_gene_scale=0.5"],
    # the same over each file's batch_key batches (CellBench's protocols, SNARE's libraries): those files are probe
    # sets too, so these rows use probe batches in training and do not meet the probes' rule; they show the ceiling
    "batch_decoder_within_files": ["model.reconstruction_batch_conditioned=true", "data.batch_column=batch"],
    "batch_adversary_within_files": ["model.adversarial_batch_weight=1.0", "data.batch_column=batch"],
}


def compose(overrides: list[str]):
    from sc_foundation.conf import compose as compose_config

    return compose_config("pretrain", overrides)


def recipe(overrides: list[str]):
    """The recipe's config (``experiment=cpu_pretrain``) with ``overrides``."""
    return compose(["experiment=cpu_pretrain", *QUIET, *overrides])


def train_run(out: Path, overrides: list[str]) -> dict:
    """``train.run`` into ``out`` with the recipe plus ``overrides``; the run's facts and its probe history."""
    from sc_foundation.training import pretrain

    cfg = recipe([f"output_dir={out}", *overrides])
    started = time.perf_counter()
    result = pretrain.run(cfg)
    wall = time.perf_counter() - started
    metrics = _metrics_csv(out)
    cells_per_s = metrics["train/cells_per_s"].dropna() if "train/cells_per_s" in metrics else None
    return {
        "overrides": overrides,
        "export": str(result["export"]),
        "steps": int(result["trainer"].global_step),
        "wall_s": round(wall, 1),
        "train_cells_per_s": None if cells_per_s is None or cells_per_s.empty else float(cells_per_s.median()),
        "probes": result["probes"].history[-1]["results"] if result["probes"] and result["probes"].history else None,
        "probe_history": [
            {"step": h["step"], "results": h["results"]} for h in (result["probes"].history if result["probes"] else [])
        ],
    }


def _metrics_csv(out: Path):
    import pandas as pd

    files = sorted(out.rglob("metrics.csv"))
    return pd.read_csv(files[-1]) if files else pd.DataFrame()


def probe_sets(max_cells: int, overrides: list[str]):
    """The recipe's probe sets with ``max_cells`` cells each (the in-run probes use fewer, for speed)."""
    from omegaconf import OmegaConf

    from sc_foundation.training.probes import ProbeSet

    cfg = recipe(overrides)
    return [ProbeSet(**{**s, "max_cells": max_cells}) for s in OmegaConf.to_container(cfg.probes.sets, resolve=True)]


def score_export(export: str, max_cells: int, overrides: list[str], scvi: bool) -> dict:
    from sc_foundation.models.export import load_pretrained
    from sc_foundation.training.probes import RepresentationProbe

    cache = Path(recipe(overrides).paths.cache) / "probe_references"
    return RepresentationProbe(probe_sets(max_cells, overrides), scvi=scvi, cache_dir=cache).evaluate(
        load_pretrained(export)
    )


def curve_figure(history: list[dict], path: Path) -> Path:
    """Probe kNN accuracy and AvgBIO by step, one colour per set, PCA dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    for i, name in enumerate(history[-1]["results"]):
        colour = f"C{i}"
        for ax, metric in zip(axes, ("knn_accuracy", "avg_bio"), strict=True):
            ax.plot(steps, [h["results"][name]["ours"][metric] for h in history], "o-", color=colour, label=name)
            ax.axhline(history[-1]["results"][name]["pca"][metric], color=colour, linestyle="--", linewidth=1)
            ax.set_xlabel("step")
            ax.set_title(f"{metric} (dashed: PCA of the same cells)")
    axes[0].legend()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def batch_flops(batch: dict, non_embedding_params: int, num_layers: int, hidden_size: int) -> float:
    """Estimated training FLOPs of one batch (``training_flops``): the masked pass over every cell plus, with
    contrastive views (``view_masks``, (2, B, L)), one pass over each view's kept tokens."""
    from sc_foundation.training.lightning_module import training_flops

    mask = batch["attention_mask"].bool()
    passes = [mask, *(batch["view_masks"].bool() & mask)] if "view_masks" in batch else [mask]
    total = 0.0
    for kept in passes:
        lengths = kept.sum(dim=1).double()
        total += training_flops(
            non_embedding_params, int(lengths.sum()), int((lengths**2).sum()), num_layers, hidden_size
        )
    return total


def model_shape_overrides(width: int, heads: int) -> list[str]:
    """Hydra overrides for the recipe's model at ``width`` with ``heads`` heads and a 4x MLP (its depth kept)."""
    return [f"model.hidden_size={width}", f"model.intermediate_size={4 * width}", f"model.num_attention_heads={heads}"]


def precision_comparison(steps: int, overrides: list[str]) -> dict:
    """Seconds per training step of the recipe's model in fp32 and in bf16 autocast on this CPU, on the same batches,
    alternating step by step (so that load changes hit both alike); the ratio says whether bf16 pays here. Also the
    estimated training FLOPs of a step (:func:`batch_flops`, the mean over the timed batches)."""
    import torch

    from sc_foundation.data.datamodule import CorpusDataModule
    from sc_foundation.training import pretrain
    from sc_foundation.training.hardware import cpu_description, model_sizes, resolve_cpu_precision
    from sc_foundation.training.lightning_module import TrainingModule, count_non_embedding_parameters

    cfg = recipe([*overrides, "probes=null"])
    report = pretrain.build_corpus(cfg)
    from omegaconf import OmegaConf

    datamodule = CorpusDataModule(report.path, seed=cfg.seed, **OmegaConf.to_container(cfg.data.loader))
    datamodule.setup()
    loader = iter(datamodule._loader(datamodule.train_indices, train=True))
    batches = [next(loader) for _ in range(steps + 2)]
    timings = {"fp32": [], "bf16": []}
    cpu_times = {"fp32": [], "bf16": []}  # process CPU time: what other jobs on the machine do not inflate
    modules = {}
    for name in timings:
        torch.manual_seed(cfg.seed)
        module = TrainingModule(pretrain.build_model(cfg, datamodule.store), max_steps=steps)
        optimizer = module.configure_optimizers()["optimizer"]
        modules[name] = (module, optimizer)
    for i, batch in enumerate(batches):
        for name, (module, optimizer) in modules.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = module(batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if i >= 2:  # two warm-up steps
                timings[name].append(time.perf_counter() - started)
                cpu_times[name].append(time.process_time() - cpu_started)
    fp32, bf16 = (float(np.median(timings[k])) for k in ("fp32", "bf16"))
    model = modules["fp32"][0].model
    n_params = count_non_embedding_parameters(model)
    config = model.config
    flops = [batch_flops(b, n_params, config.num_hidden_layers, config.hidden_size) for b in batches]
    return {
        "cpu": cpu_description(),
        "steps_timed": steps,
        "batch_size": int(cfg.data.loader.batch_size),
        "hidden_size": int(config.hidden_size),
        "non_embedding_params": n_params,
        "flops_per_step": float(np.mean(flops)),
        "s_per_step_fp32": fp32,
        "s_per_step_bf16": bf16,
        # CPU seconds per step over torch's threads: the wall time of a step on idle cores, whatever the load now
        **{f"idle_s_per_step_{k}": float(np.median(v)) / torch.get_num_threads() for k, v in cpu_times.items()},
        "bf16_speedup": fp32 / bf16,
        "trainer_precision_chosen": resolve_cpu_precision("auto", **model_sizes(config)),
    }


def table(results: dict) -> str:
    from sc_foundation.training.model_card import probe_table

    return probe_table(results)


def _cell(scores: dict) -> str:
    """``kNN / AvgBIO / batch`` of one set (batch only where the set has batches)."""
    parts = [f"{scores['knn_accuracy']:.3f}", f"{scores['avg_bio']:.3f}"]
    if "batch_score" in scores:
        parts.append(f"{scores['batch_score']:.3f}")
    return " / ".join(parts)


def ablation_table(ablations: dict, steps: int) -> list[str]:
    """Markdown lines: one row per run (kNN / AvgBIO / batch score per probe set), then PCA and scVI of the same cells
    (the references of the first run: every run probes the same cells)."""
    sets = list(next(iter(ablations.values()))["probes"])
    lines = [
        f"## Ablations ({steps} steps each, one change from the recipe; kNN / AvgBIO / batch score per set)",
        "",
        "| run | change | cells/s | " + " | ".join(sets) + " |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in sets) + " |",
    ]
    for name, run in ablations.items():
        scores = " | ".join(_cell(run["probes"][s]["ours"]) for s in sets)
        cells = f"{run['train_cells_per_s']:.0f}" if run.get("train_cells_per_s") else "n/a"
        lines.append(f"| {name} | `{' '.join(run['overrides']) or '(recipe)'}` | {cells} | {scores} |")
    first = next(iter(ablations.values()))["probes"]
    for method, label in (("pca", "PCA-50 of HVGs (same cells)"), ("scvi", "scVI trained on the probe cells")):
        if all(method in first[s] for s in sets):
            lines.append(f"| {label} | | | " + " | ".join(_cell(first[s][method]) for s in sets) + " |")
    return lines


def markdown(record: dict) -> str:
    lines = ["# Pretraining quality: representation probes against PCA and scVI", ""]
    if record.get("recipe"):
        lines += [
            f"Export: `{record['recipe']['export']}` ({record['recipe'].get('steps')} steps, "
            f"{record['recipe'].get('wall_s')} s of training)."
            if record["recipe"].get("steps")
            else f"Export: `{record['recipe']['export']}`.",
            "",
            f"## Probe table ({record['probe_cells']} cells per set at most)",
            "",
            table(record["probes"]),
        ]
    if record.get("ablations"):
        lines += ["", *ablation_table(record["ablations"], record["ablation_steps"])]
    if record.get("precision"):
        p = record["precision"]
        lines += [
            "",
            "## fp32 against bf16 autocast on this CPU",
            "",
            f"CPU {p['cpu']['cpu']} (bf16 flags: {p['cpu']['bf16_flags'] or 'none'}): "
            f"{p['s_per_step_fp32']:.3f} s/step fp32, {p['s_per_step_bf16']:.3f} s/step bf16, "
            f"bf16 speed-up {p['bf16_speedup']:.2f}x; `trainer.precision=auto` picks {p['trainer_precision_chosen']}.",
        ]
    if record.get("precision_by_size"):
        lines += [
            "",
            "| width x heads | s/step fp32 | s/step bf16 | bf16 speed-up | auto picks |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for size, p in record["precision_by_size"].items():
            lines.append(
                f"| {size} | {p['s_per_step_fp32']:.3f} | {p['s_per_step_bf16']:.3f} | {p['bf16_speedup']:.2f}x | "
                f"{p['trainer_precision_chosen']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--pretrained", type=Path, help="score this export instead of running the recipe")
    parser.add_argument("--probe-cells", type=int, default=2000, help="cells per probe set in the final table")
    parser.add_argument("--ablations", nargs="*", default=None, help=f"ablations to run: {sorted(ABLATIONS)}")
    parser.add_argument("--ablation-steps", type=int, default=300)
    parser.add_argument("--ablations-only", action="store_true", help="skip the recipe run and its probe table")
    parser.add_argument(
        "--skip-baseline", action="store_true", help="no recipe run at the ablation steps (another process runs it)"
    )
    parser.add_argument("--scvi", action="store_true", help="score scVI on the probe cells beside PCA (baselines)")
    parser.add_argument(
        "--precision",
        type=int,
        default=0,
        metavar="STEPS",
        help="time this many fp32 and bf16 training steps (0: skip)",
    )
    parser.add_argument(
        "--precision-models",
        nargs="*",
        default=[],
        metavar="WIDTHxHEADS",
        help="with --precision: time these model sizes too, e.g. 64x4 128x2 512x8 (the tiny model's depth)",
    )
    parser.add_argument(
        "--recipe-overrides", nargs="*", default=[], help="Hydra overrides of the recipe (and of every ablation)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = list(args.recipe_overrides)
    record: dict = {"machine": machine_info(), "probe_cells": args.probe_cells, "recipe_overrides": base}
    if args.scvi:
        base = [*base, "probes.scvi=true"]
    history = []
    if args.pretrained:
        record["recipe"] = {"export": str(args.pretrained)}
    elif not args.ablations_only:
        run = train_run(args.out / "recipe", base)
        record["recipe"] = {k: v for k, v in run.items() if k != "probe_history"}
        history = run["probe_history"]
    if record.get("recipe"):
        record["probes"] = score_export(record["recipe"]["export"], args.probe_cells, base, args.scvi)
    if history:
        record["curve"] = str(curve_figure(history, args.out / "probe_curve.png"))
        record["probe_history"] = history
    if args.ablations is not None:
        names = args.ablations or sorted(ABLATIONS)
        record["ablation_steps"] = args.ablation_steps
        record["ablations"] = {}
        steps = [f"trainer.max_steps={args.ablation_steps}", f"trainer.val_check_interval={args.ablation_steps}"]
        if not args.skip_baseline:
            baseline = train_run(args.out / "ablations" / "recipe_short", [*base, *steps])
            baseline.pop("probe_history")
            record["ablations"]["recipe (same steps)"] = baseline
        for name in names:
            run = train_run(args.out / "ablations" / name, [*base, *ABLATIONS[name], *steps])
            run.pop("probe_history")
            record["ablations"][name] = run
            write_json_atomic(args.out / "pretrain_quality.json", record)  # keep what is done if a later run fails
    if args.precision:
        record["precision"] = precision_comparison(args.precision, base)
        record["precision_by_size"] = {}
        for size in args.precision_models:
            width, heads = (int(x) for x in size.split("x"))
            shape = model_shape_overrides(width, heads)
            record["precision_by_size"][size] = precision_comparison(args.precision, [*base, *shape])
    record["wall_s"] = round(time.perf_counter() - started, 1)
    write_report(args.out, "pretrain_quality", record, markdown(record))
    return record


if __name__ == "__main__":
    main()
