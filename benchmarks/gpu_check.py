"""GPU acceptance check: everything this project has only run on CPUs, run once on one CUDA device, one JSON out.

Steps, each a subprocess of the real entry point with its own time limit (the whole check is sized for under 10
minutes on one H100/H200; ``--budget-s`` caps it), in this order:

1. ``gpu_tests``: ``pytest -m gpu`` (the varlen/SDPA parity and fallback tests, the CUDA paths of the benchmarks),
   counted from its JUnit XML;
2. ``train_gpu``: ``benchmarks/train_gpu.py``, padded batches through SDPA against packed batches through the varlen
   kernel, bf16, base model: cells/s, tokens/s and MFU of each;
3. ``gpu_pretrain``: ``train.py experiment=gpu_pretrain`` for ``--pretrain-steps`` steps with a validation and the
   representation probes twice: the losses, throughput and MFU it logged and the probe scores of its export;
4. ``fsdp_one_device``: the same run with ``trainer=fsdp trainer.devices=1`` (FSDP2 sharded per block, one
   process) for 60 steps: its throughput and that it exported;
5. ``finetune``: ``finetune.py task=annotation`` of step 3's export on CellBench for a few epochs: test macro-F1;
6. ``embed``: ``benchmarks/inference.py`` on CUDA, bf16 autocast: cells/s of ``sc_foundation.embed``.

A step that fails or runs out of time is recorded (return code, the tail of its output) and the next one runs; the
fine-tuning step needs step 3's export and is skipped, with the reason, without it. Without CUDA nothing runs and the
JSON says why. Exit status: 0 when every step passed, 1 when one failed, 2 when there was no GPU.

    python benchmarks/gpu_check.py --out gpu_check.json [--work-dir .bench/gpu_check] [--budget-s 570] [--dry-run]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _corpus import DEFAULT_DATA, REPO_ROOT, machine_info, write_json_atomic

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@dataclass
class Step:
    """One check: the command (run in the repository root), its time limit, and how to read its figures."""

    name: str
    command: list[str]
    timeout_s: int
    read: Callable[[], dict] = field(default=lambda: {})
    needs: Path | None = None  # a file an earlier step must have written


def last_logged(out: Path, keys: tuple[str, ...]) -> dict:
    """The last value of each of ``keys`` in the CSV logger's ``metrics.csv`` under ``out``."""
    found = {}
    for path in sorted(out.rglob("metrics.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                found |= {key: float(row[key]) for key in keys if row.get(key)}
    return found


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"missing": str(path)}


def junit_counts(path: Path) -> dict:
    """Tests, failures, errors and skips of a pytest JUnit XML file."""
    if not path.is_file():
        return {"missing": str(path)}
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


def plan(args: argparse.Namespace) -> list[Step]:
    """The steps of the check, with their outputs under ``args.work_dir``."""
    work, python = Path(args.work_dir).absolute(), sys.executable
    data = Path(args.data_dir)
    throughput = ("train/loss", "val/loss", "train/cells_per_s", "train/tokens_per_s", "train/mfu")
    pretrain_out = work / "gpu_pretrain"
    fsdp_out = work / "fsdp_one_device"
    finetune_out = work / "finetune"
    every = max(1, args.pretrain_steps // 2)
    return [
        Step(
            "gpu_tests",
            # -n0: one process, not the default suite's two xdist workers, which would share the one device and
            # spend the step's time limit starting a second CUDA context for two tests.
            [python, "-m", "pytest", "-q", "-n0", "-p", "no:cacheprovider", "-m", "gpu", f"--junitxml={work}/gpu.xml"],
            150,
            lambda: junit_counts(work / "gpu.xml"),
        ),
        Step(
            "train_gpu",
            [
                python,
                "benchmarks/train_gpu.py",
                f"--out={work}/train_gpu.json",
                "--model=base",
                "--context=1024",
                "--batch-size=32",
                "--steps=20",
                "--warmup-steps=5",
                "--cells=5000",
            ],
            150,
            lambda: read_json(work / "train_gpu.json"),
        ),
        Step(
            "gpu_pretrain",
            [
                python,
                "train.py",
                "experiment=gpu_pretrain",
                f"trainer.max_steps={args.pretrain_steps}",
                f"trainer.val_check_interval={every}",
                "trainer.log_every_n_steps=10",
                "probes.every_n_validations=1",
                f"output_dir={pretrain_out}",
                f"hydra.run.dir={pretrain_out}/hydra",
                *QUIET,
            ],
            240,
            lambda: {
                "logged": last_logged(pretrain_out, throughput),
                "export": read_json(pretrain_out / "export" / "final" / "metrics.json"),
            },
        ),
        Step(
            "fsdp_one_device",
            [
                python,
                "train.py",
                "experiment=gpu_pretrain",  # its corpus store, built by the step before
                "trainer=fsdp",
                "trainer.devices=1",
                "trainer.max_steps=60",
                "trainer.val_check_interval=30",
                "trainer.log_every_n_steps=10",
                "probes=null",
                f"output_dir={fsdp_out}",
                f"hydra.run.dir={fsdp_out}/hydra",
                *QUIET,
            ],
            120,
            lambda: {
                "logged": last_logged(fsdp_out, throughput),
                "exported": (fsdp_out / "export" / "final" / "model.safetensors").is_file(),
            },
        ),
        Step(
            "finetune",
            [
                python,
                "finetune.py",
                "task=annotation",
                f"pretrained={pretrain_out}/export/final",
                f"data.files=[{data / 'cellbench_3cl' / 'cellbench_3cl.h5ad'}]",
                "trainer.accelerator=gpu",
                "trainer.max_epochs=4",
                f"output_dir={finetune_out}",
                f"hydra.run.dir={finetune_out}/hydra",
                *QUIET,
            ],
            120,
            lambda: {
                key: value
                for key, value in read_json(finetune_out / "metrics.json").items()
                if key in ("model", "baselines", "steps", "epochs", "n_cells", "missing")
            },
            needs=pretrain_out / "export" / "final" / "config.json",
        ),
        Step(
            "embed",
            [
                python,
                "benchmarks/inference.py",
                f"--out={work}/inference.json",
                "--sizes",
                "base",
                "--cells=5000",
                "--repeats=2",
                "--no-cpu",
                "--published",
            ],
            150,
            lambda: read_json(work / "inference.json"),
        ),
    ]


def run_step(step: Step, timeout_s: float) -> dict:
    """Run one step; its return code, wall time, figures and, when it failed, the tail of its output."""
    if step.needs is not None and not step.needs.exists():
        return {"status": "skipped", "reason": f"needs {step.needs}, which an earlier step did not write"}
    if timeout_s < 30:
        return {"status": "skipped", "reason": f"only {timeout_s:.0f} s of the budget left"}
    started = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        returncode, output = None, f"timed out after {timeout_s:.0f} s\n" + str(expired.stdout or "")[-2000:]
    record = {
        "status": "passed" if returncode == 0 else "failed",
        "returncode": returncode,
        "wall_s": round(time.perf_counter() - started, 1),
        "command": " ".join(step.command),
    }
    try:
        record["result"] = step.read()
    except Exception as error:  # a figure that cannot be read is part of the report, not the end of the check
        record["result"] = {"unreadable": repr(error)}
    if returncode != 0:
        record["output_tail"] = output[-4000:]
    return record


def cuda_device() -> tuple[dict | None, str | None]:
    """The CUDA device's facts, or None and why there is none."""
    import torch

    if not torch.cuda.is_available():
        why = (
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
        return None, why
    properties = torch.cuda.get_device_properties(0)
    return {
        "name": properties.name,
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        for step in steps:
            print(f"{step.name} ({step.timeout_s} s): {' '.join(step.command)}")
        return 0
    device, reason = cuda_device()
    report = {"benchmark": "gpu_check", "device": device, "machine": machine_info(), "budget_s": args.budget_s}
    if device is None:
        report |= {"skipped": reason, "steps": {step.name: {"status": "skipped", "reason": reason} for step in steps}}
        write_json_atomic(args.out, report)
        print(f"gpu_check: {reason}; nothing ran ({args.out})")
        return 2
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    started, report["steps"] = time.perf_counter(), {}
    for step in steps:
        left = args.budget_s - (time.perf_counter() - started)
        report["steps"][step.name] = run_step(step, min(step.timeout_s, left))
        write_json_atomic(args.out, report)  # after every step: a killed check keeps what it measured
        print(f"gpu_check: {step.name} {report['steps'][step.name]['status']}", flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(args.out, report)
    return 0 if all(s["status"] == "passed" for s in report["steps"].values()) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON report")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / ".bench" / "gpu_check", help="run outputs")
    parser.add_argument("--budget-s", type=float, default=570, help="wall-clock budget of the whole check")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="steps of the gpu_pretrain run")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared real-data folder")
    parser.add_argument("--dry-run", action="store_true", help="print the steps' commands and exit")
    args = parser.parse_args(argv)
    if args.budget_s <= 0 or args.pretrain_steps < 2:
        parser.error("--budget-s must be positive and --pretrain-steps at least 2")
    return args


if __name__ == "__main__":
    sys.exit(main())
