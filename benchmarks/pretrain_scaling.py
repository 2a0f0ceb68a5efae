"""Probe score against training compute: the recipe's width and corpus, at equal CPU time.

``python benchmarks/pretrain_scaling.py --out DIR --minutes 8`` trains the recipe (``experiment=cpu_pretrain``) at
each width of ``--widths`` on the recipe's corpus, and at the first width on each corpus of ``--corpora``, each for
about ``--minutes`` of training on this machine:

1. a short timing run (``pretrain_quality.precision_comparison``) gives the seconds per step at the precision
   ``trainer.precision=auto`` picks for that width, as CPU time over torch's threads (the wall time on idle cores,
   which other jobs on the machine do not inflate), and the estimated training FLOPs per step
   (``pretrain_quality.batch_flops``: ``6·N·T`` plus attention, over the masked pass and both views);
2. the run gets ``max_steps = minutes·60 / seconds per step`` (its learning-rate schedule completes), and the probes
   of ``conf/pretrain.yaml`` score it ``--rounds`` times along the way;
3. each probe round becomes a point: cumulative FLOPs against the probe score (``runs.probe_score``: the mean over
   sets of ours / PCA for kNN accuracy, AvgBIO and the batch score) and against the worst of those ratios (the
   issue's bar is every ratio at least 1).

``--precision-check`` adds the first width above 64 once more in fp32 at the same steps as its ``auto`` run, so
that bf16's probe scores can be compared at equal steps (and its speed at equal work).

Writes ``DIR/pretrain_scaling.json``, ``DIR/pretrain_scaling.md`` and ``DIR/scaling.png``. The FLOPs are an
estimate of the encoder's matmuls (the decoders and the loss heads are counted as if they ran per token, the
embedding lookups not at all); the seconds are this machine's, which the JSON states.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _corpus import atomic_path, machine_info, write_json_atomic, write_report
from pretrain_quality import model_shape_overrides, precision_comparison, train_run

CORPORA = {
    # the corpus of conf/experiment/cpu_pretrain.yaml before the Zheng 2017, 10x mouse and MERFISH sets joined it
    "6 sets": ["kang_ifnb", "pbmc3k", "cellbench_3cl", "eccite_pbmc_rna", "pbmc68k_reduced", "snare_mop_rna"],
    "10 sets": [
        "kang_ifnb",
        "pbmc3k",
        "cellbench_3cl",
        "eccite_pbmc_rna",
        "pbmc68k_reduced",
        "snare_mop_rna",
        "pbmc_facs_reference",
        "pbmc_donor_a",
        "mouse_10k",
        "merfish_mouse_brain",
    ],
}


def width_overrides(width: int) -> list[str]:
    """The tiny model at ``width`` with a 4x MLP: 64 wide as the recipe (4 heads of 16), wider with heads of 64
    dimensions as the published models (and as bf16 on a CPU needs to pay, ``hardware.BF16_CPU_MIN_HEAD_SIZE``)."""
    return model_shape_overrides(width, 4 if width == 64 else width // 64)


def corpus_overrides(corpus: str) -> list[str]:
    """``data.datasets`` of a corpus of :data:`CORPORA`; none for ``"recipe"`` (the recipe's own, or the overrides')."""
    return [] if corpus == "recipe" else [f"data.datasets=[{','.join(CORPORA[corpus])}]"]


def run_point(
    out: Path,
    name: str,
    overrides: list[str],
    minutes: float,
    rounds: int,
    precision: str | None = None,
    steps: int | None = None,
) -> dict:
    """One configuration trained for about ``minutes`` (or exactly ``steps`` when given), probed ``rounds`` times,
    at ``precision`` (None: what ``trainer.precision=auto`` picks)."""
    timing = precision_comparison(12, overrides)
    chosen = precision or timing["trainer_precision_chosen"]
    seconds = timing["idle_s_per_step_bf16" if chosen.startswith("bf16") else "idle_s_per_step_fp32"]
    every = max(1, int((steps / rounds) if steps else minutes * 60 / seconds / rounds))
    steps = every * rounds
    run_overrides = [
        *overrides,
        f"trainer.precision={chosen}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={every}",
        "trainer.limit_val_batches=2",
        f"optim.warmup_steps={max(10, min(200, steps // 10))}",
        "probes.every_n_validations=1",
    ]
    run = train_run(out / name.replace(", ", "_").replace(" ", "_"), run_overrides)
    from sc_foundation.training.runs import probe_score

    curve = [
        {
            "step": h["step"],
            "flops": h["step"] * timing["flops_per_step"],
            "probe_score": probe_score(h["results"]),
            "worst_ratio": min(v for result in h["results"].values() for v in result["ratio"].values()),
            "ratios": {s: result["ratio"] for s, result in h["results"].items()},
            "ours": {s: result["ours"] for s, result in h["results"].items()},
        }
        for h in run["probe_history"]
    ]
    return {
        "overrides": run_overrides,
        "precision": chosen,
        "s_per_step": seconds,
        "timing": timing,
        "steps": run["steps"],
        "wall_s": run["wall_s"],
        "train_cells_per_s": run["train_cells_per_s"],
        "curve": curve,
    }


def figure(points: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, point) in enumerate(points.items()):
        flops = [c["flops"] for c in point["curve"]]
        for ax, key in zip(axes, ("probe_score", "worst_ratio"), strict=True):
            ax.plot(flops, [c[key] for c in point["curve"]], "o-", color=f"C{i}", label=name)
    for ax, title in zip(axes, ("probe score (mean ratio to PCA)", "worst ratio to PCA"), strict=True):
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("estimated training FLOPs")
        ax.set_title(title)
    axes[0].legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown(record: dict) -> str:
    lines = [
        f"# Probe score against training compute ({record['minutes']} minutes of training per run)",
        "",
        "| run | precision | s/step | steps | FLOPs | probe score | worst ratio | best round (step: score) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, point in record["points"].items():
        last = point["curve"][-1]
        best = max(point["curve"], key=lambda c: c["probe_score"])
        lines.append(
            f"| {name} | {point['precision']} | {point['s_per_step']:.3f} | {point['steps']} | {last['flops']:.2e} | "
            f"{last['probe_score']:.3f} | {last['worst_ratio']:.3f} | {best['step']}: {best['probe_score']:.3f} |"
        )
    lines += ["", "Ratios to PCA at the last round (kNN / AvgBIO / batch):", ""]
    for name, point in record["points"].items():
        ratios = point["curve"][-1]["ratios"]
        cells = "; ".join(f"{s} " + " / ".join(f"{v:.2f}" for v in r.values()) for s, r in ratios.items())
        lines.append(f"- {name}: {cells}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    corpora = [*sorted(CORPORA), "recipe"]
    parser.add_argument("--corpora", nargs="*", default=["10 sets"], choices=corpora, help="extra corpora")
    parser.add_argument("--recipe-corpus", default="6 sets", choices=corpora, help="the widths' corpus")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time per run")
    parser.add_argument("--rounds", type=int, default=4, help="probe rounds per run")
    parser.add_argument("--precision-check", action="store_true", help="the first width above 64 again in fp32")
    parser.add_argument("--recipe-overrides", nargs="*", default=[], help="Hydra overrides of every run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    record: dict = {"machine": machine_info(), "minutes": args.minutes, "points": {}}
    plan = [
        (f"width {w}, {args.recipe_corpus}", [*width_overrides(w), *corpus_overrides(args.recipe_corpus)], None)
        for w in args.widths
    ]
    plan += [
        (f"width {args.widths[0]}, {c}", [*width_overrides(args.widths[0]), *corpus_overrides(c)], None)
        for c in args.corpora
        if c != args.recipe_corpus
    ]
    for name, overrides, precision in plan:
        point = run_point(args.out, name, [*args.recipe_overrides, *overrides], args.minutes, args.rounds, precision)
        record["points"][name] = point
        write_json_atomic(args.out / "pretrain_scaling.json", record)  # keep what is done if a later run fails
    wider = [w for w in args.widths if w > 64]
    if args.precision_check and wider:
        name = f"width {wider[0]}, {args.recipe_corpus}"
        auto = record["points"][name]
        overrides = [*args.recipe_overrides, *width_overrides(wider[0]), *corpus_overrides(args.recipe_corpus)]
        record["points"][f"{name}, fp32"] = run_point(
            args.out, f"{name}, fp32", overrides, args.minutes, args.rounds, "32-true", steps=auto["steps"]
        )
    record["figure"] = str(figure(record["points"], args.out / "scaling.png"))
    record["wall_s"] = round(time.perf_counter() - started, 1)
    write_report(args.out, "pretrain_scaling", record, markdown(record))
    return record


if __name__ == "__main__":
    main()
