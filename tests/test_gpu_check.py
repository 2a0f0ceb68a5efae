"""benchmarks/gpu_check.py, the GPU acceptance script, in what a CPU machine can check: its arguments, the Hydra
overrides of every run it starts, the JSON it writes (steps passed, failed, skipped, with reasons) and that it runs
nothing without CUDA."""

import json
import sys

import pytest
import torch

from sc_foundation.conf import compose


@pytest.fixture
def gpu_check(import_benchmark):
    return import_benchmark("gpu_check")


def test_every_run_it_starts_composes(gpu_check, tmp_path):
    """A typo in an override would only show on the GPU: each train.py and finetune.py command composes here."""
    args = gpu_check.parse_args(["--out", str(tmp_path / "g.json"), "--work-dir", str(tmp_path)])
    steps = gpu_check.plan(args)
    assert [step.name for step in steps] == [
        "gpu_tests",
        "train_gpu",
        "gpu_pretrain",
        "fsdp_one_device",
        "finetune",
        "embed",
    ]
    assert args.budget_s < 10 * 60, "the whole check stops within 10 minutes; each step's limit is its own ceiling"
    entry = {"train.py": "pretrain", "finetune.py": "finetune"}
    composed = 0
    for step in steps:
        script = next((arg for arg in step.command if arg in entry), None)
        if script is None:
            continue
        overrides = [arg for arg in step.command[step.command.index(script) + 1 :] if not arg.startswith("hydra.")]
        cfg = compose(entry[script], overrides)
        assert cfg.trainer.accelerator == "gpu", step.name
        composed += 1
    assert composed == 3
    fsdp = next(step for step in steps if step.name == "fsdp_one_device")
    assert "FullyShardedStrategy" in compose("pretrain", fsdp.command[2:-1]).trainer.strategy._target_


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_nothing_runs_and_the_json_says_why(gpu_check, tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out), "--work-dir", str(tmp_path / "work")]) == 2
    report = json.loads(out.read_text())
    assert report["device"] is None and "no CUDA device" in report["skipped"]
    assert {step["status"] for step in report["steps"].values()} == {"skipped"} and len(report["steps"]) == 6
    assert not (tmp_path / "work").exists()


def test_steps_that_pass_fail_or_lack_their_input_are_all_reported(gpu_check, tmp_path, monkeypatch):
    """With a device faked and three stand-in steps: figures read after a passing step, the output's tail kept for a
    failing one, a step whose input an earlier step did not write skipped with the reason; exit status 1."""
    figures = tmp_path / "figures.json"
    steps = [
        gpu_check.Step(
            "passes",
            [sys.executable, "-c", f"open({str(figures)!r}, 'w').write('{{\"cells_per_s\": 12.5}}')"],
            60,
            lambda: gpu_check.read_json(figures),
        ),
        gpu_check.Step("fails", [sys.executable, "-c", "raise SystemExit('broken on purpose')"], 60),
        gpu_check.Step("needs", [sys.executable, "-c", "pass"], 60, needs=tmp_path / "never_written"),
    ]
    monkeypatch.setattr(gpu_check, "plan", lambda args: steps)
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: ({"name": "stand-in"}, None))
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out), "--work-dir", str(tmp_path / "work")]) == 1
    report = json.loads(out.read_text())["steps"]
    assert report["passes"]["status"] == "passed" and report["passes"]["result"] == {"cells_per_s": 12.5}
    assert report["fails"]["status"] == "failed" and "broken on purpose" in report["fails"]["output_tail"]
    assert report["needs"]["status"] == "skipped" and "never_written" in report["needs"]["reason"]


def test_bad_arguments_are_refused(gpu_check):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", "x.json", "--budget-s", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args([])
