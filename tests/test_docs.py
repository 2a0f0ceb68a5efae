"""The README and the pages in docs/ cannot drift from the code: every shell command they show is checked against
what it calls (Hydra overrides compose, command-line flags parse, scripts and extras exist), every Python block
compiles and its ``sc_foundation`` imports resolve, every ``sc_foundation.*`` name they quote exists, every local
link points at a file, and every quoted message (a ``text`` block after ``<!-- message: NAME -->``) is what the code
prints for the input that :data:`MESSAGES` builds.

Running every command for real would take hours (an hour-long recipe, multi-node launches); the commands that users
meet first run for real in ``tests/test_wheel.py``, from an installed wheel.
"""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def blocks(language: str) -> list[tuple[str, str]]:
    """(page name, block text) of every fenced block of ``language`` in the README and docs."""
    found = []
    for page in PAGES:
        for lang, body in FENCE.findall(page.read_text()):
            if lang == language:
                found.append((page.name, body))
    return found


def shell_commands() -> list[tuple[str, list[str]]]:
    """(page name, argv) of every command of every bash block: continuation lines joined, ``&&`` chains split,
    comments dropped."""
    commands = []
    for page, body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv:
                cut = argv.index("&&") if "&&" in argv else len(argv)
                commands.append((page, argv[:cut]))
                argv = argv[cut + 1 :]
    return commands


# ------------------------------------------------------------------------------------------ what each command calls
def hydra_overrides(argv: list[str]) -> list[str]:
    """The overrides among a Hydra app's arguments (its own flags, such as ``--cfg job``, left out)."""
    overrides, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--cfg", "-c", "--config-dir", "-cd", "--config-name", "-cn", "--package", "-p"):
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def check_hydra(config_name: str, argv: list[str]) -> None:
    from sc_foundation.conf import compose

    compose(config_name, hydra_overrides(argv))


def check_command(argv: list[str]) -> None:
    """``sc-foundation`` / ``python -m sc_foundation`` with its arguments."""
    from sc_foundation.cli import HYDRA_COMMANDS, build_parser

    if argv and argv[0] in HYDRA_COMMANDS:
        check_hydra({"pretrain": "pretrain", "finetune": "finetune"}[argv[0]], argv[1:])
    else:
        build_parser().parse_args(argv)


def check_script(argv: list[str]) -> None:
    """``python train.py|finetune.py|benchmarks/x.py ...``."""
    script, args = argv[0], argv[1:]
    if script == "train.py":
        check_hydra("pretrain", args)
    elif script == "finetune.py":
        check_hydra("finetune", args)
    else:
        source = (ROOT / script).read_text()  # FileNotFoundError names a script that is gone
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert f'"{flag}"' in source, f"{script} has no option {flag}"


def check_pip(argv: list[str]) -> None:
    if argv[1] == "wheel":
        return
    for target in argv[2:]:
        if target == "-e":
            continue
        if target.startswith("torch=="):
            torch = next(r for r in map(Requirement, PYPROJECT["project"]["dependencies"]) if r.name == "torch")
            assert torch.specifier.contains(target.split("==")[1]), f"{target} is outside pyproject's {torch}"
        else:
            extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
            assert extras, f"pip install {target}: not the checkout"
            for extra in (extras.group(1) or "").split(","):
                assert not extra or extra in PYPROJECT["project"]["optional-dependencies"], f"no extra {extra!r}"


def check_pytest(argv: list[str]) -> None:
    markers = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
    for i, arg in enumerate(argv):
        if arg == "-m":
            assert argv[i + 1] in markers, f"no pytest marker {argv[i + 1]!r}"
        elif arg.startswith("tests/"):
            assert (ROOT / arg.split("::")[0]).exists(), arg


def check(argv: list[str]) -> None:
    """Raises when ``argv`` would not run as the docs promise; fails on a command no rule knows."""
    if argv[0] == "srun":
        argv = argv[1:]
    if argv[0] == "torchrun":
        argv = ["python", *[a for a in argv[1:] if not a.startswith("--")]]
    if argv[0] in ("python", "python3") and argv[1:3] == ["-m", "sc_foundation"]:
        argv = ["sc-foundation", *argv[3:]]
    match argv:
        case ["sc-foundation", *rest]:
            check_command(rest)
        case ["python" | "python3", "-m", "venv", _] | [".", _]:
            pass
        case ["python" | "python3", "-m", "pytest", *rest]:
            check_pytest(rest)
        case ["python" | "python3", script, *_] if script.endswith(".py"):
            check_script(argv[1:])
        case ["pip", "install" | "wheel", *_]:
            check_pip(argv)
        case ["jupyter", "lab", folder]:
            assert (ROOT / folder).is_dir(), folder
        case _:
            raise AssertionError(f"tests/test_docs.py has no rule for this command: {shlex.join(argv)}")


COMMANDS = shell_commands()


@pytest.mark.parametrize(("page", "argv"), COMMANDS, ids=[f"{p}:{shlex.join(a)[:60]}" for p, a in COMMANDS])
def test_every_shell_command_matches_the_code(page, argv):
    check(argv)


def test_the_rules_reject_drifted_commands():
    """The checks can fail: a renamed key, a flag that is gone, an unknown extra, an unknown command."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        check(["python", "train.py", "trainer.max_stepz=3"])
    with pytest.raises(SystemExit):
        check(["sc-foundation", "embed", "--model", "m", "--input", "a.h5ad", "--output", "b.h5ad", "--no-such-flag"])
    with pytest.raises(AssertionError, match="no extra"):
        check(["pip", "install", "-e", ".[nonexistent]"])
    with pytest.raises(AssertionError, match="no option --nope"):
        check(["python", "benchmarks/quality.py", "--nope", "1"])
    with pytest.raises(AssertionError, match="no rule"):
        check(["make", "all"])


# ---------------------------------------------------------------------------------------------- Python and names
PYTHON = blocks("python")


@pytest.mark.parametrize(("page", "code"), PYTHON, ids=[f"{p}:{i}" for i, (p, _) in enumerate(PYTHON)])
def test_every_python_block_compiles_and_its_imports_resolve(page, code):
    compile(code, page, "exec")
    for line in code.splitlines():
        if re.match(r"\s*(from sc_foundation[\w.]* import .+|import sc_foundation[\w.]*)\s*(#.*)?$", line):
            exec(line.split("#")[0].strip(), {})


def quoted_names() -> list[str]:
    names = set()
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", page.read_text()):
            names.update(re.findall(r"\bsc_foundation(?:\.\w+)+", span))
    return sorted(names)


@pytest.mark.parametrize("name", quoted_names())
def test_every_quoted_sc_foundation_name_exists(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)  # AttributeError names what is gone
        return
    raise AssertionError(f"{name}: no such module")


def test_every_local_link_points_at_a_file():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


# ------------------------------------------------------------------------------------------------ quoted messages
def _log_normalised() -> None:
    """The error of the README's example: pbmc68k_reduced's log-normalised X given as counts."""
    import scanpy as sc

    from sc_foundation.data.io import counts_from_anndata

    adata = sc.datasets.pbmc68k_reduced()
    adata.X = np.asarray(adata.X) - np.asarray(adata.X).min()
    next(counts_from_anndata(adata).iter_chunks())


MESSAGES: dict[str, Callable[[], None]] = {"log_normalised": _log_normalised}


def quoted_messages() -> list[tuple[str, str, str]]:
    found = []
    for page in PAGES:
        for name, text in re.findall(r"<!-- message: (\w+) -->\n```text\n(.*?)\n```", page.read_text(), re.S):
            found.append((page.name, name, text))
    return found


@pytest.mark.parametrize(("page", "name", "text"), quoted_messages())
def test_every_quoted_message_is_what_the_code_prints(page, name, text):
    assert name in MESSAGES, f"{page} quotes message {name!r}; add the input that produces it to MESSAGES"
    with pytest.raises(Exception) as raised:
        MESSAGES[name]()
    assert f"{type(raised.value).__name__}: {raised.value}" == text
