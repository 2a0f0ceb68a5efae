"""The exported model directory: what fine-tuning, inference and users load (never a Lightning ``.ckpt``).

A directory holds ``config.json`` and ``model.safetensors`` (``save_pretrained``) and the tokenizer it was trained
with beside them (``gene_vocab.json``, ``gene_tokenizer.json``), and last ``checksums.sha256``: the SHA-256 of every
file, which :func:`load_pretrained` verifies (:mod:`sc_foundation.models.checksums`).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from sc_foundation.data.genes import DAMAGED_FILE_FIX, VOCAB_FILE, current_umask, read_json
from sc_foundation.data.tokenization import TOKENIZER_FILE, GeneTokenizer
from sc_foundation.models import modeling
from sc_foundation.models.checksums import record_checksum, verify_checksums, write_checksums
from sc_foundation.models.modeling import ScFoundationPreTrainedModel, transformers_quiet
from sc_foundation.models.novelty import NoveltyReference

WEIGHTS_FILE = "model.safetensors"
EXPORT_FILES = ("config.json", WEIGHTS_FILE, VOCAB_FILE, TOKENIZER_FILE)


def export_pretrained(
    model: ScFoundationPreTrainedModel,
    tokenizer: GeneTokenizer,
    directory: str | os.PathLike,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` and ``tokenizer`` to ``directory`` atomically, replacing an earlier export there.

    Everything is written into a temporary folder beside ``directory`` and renamed into place, so a reader never
    sees a half-written export: at any moment ``directory`` is the old export, the new one, or briefly absent. The
    folder and its files get the modes the umask gives (0755 and 0644 under umask 022): others load exports.

    Args:
        state_dict: the weights to save instead of ``model.state_dict()`` (the full state dict an FSDP run gathers).
        extra_files: file name -> text written beside the weights (a model card ``README.md``, ``metrics.json``).
    """
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    _clean_after_killed_exports(directory)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{_OWNER}-", dir=directory.parent))
    retired = None
    try:
        with transformers_quiet():
            model.save_pretrained(staging, state_dict=state_dict)
        tokenizer.save(staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        write_checksums(staging)  # last: it covers every file above
        _share(staging)
        if directory.exists():  # os.replace cannot overwrite a non-empty folder: move the old one aside first
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-{_OWNER}-", dir=directory.parent))
            os.replace(directory, retired / directory.name)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and not directory.exists() and (retired / directory.name).exists():
            os.replace(retired / directory.name, directory)  # put the old export back
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    return directory


def add_export_file(directory: str | os.PathLike, name: str, write: Callable[[Path], object]) -> Path:
    """Add (or replace) the file ``name`` of an existing export and record it in the checksums.

    The export is verified first (a damaged export is never re-signed); ``write(path)`` writes the file to a
    temporary path beside its place, which is then renamed into place, and the manifest is rewritten atomically
    last with the new file's line (the other files were just verified, so they are not hashed again). Meant for the
    run that wrote the export, before anybody loads it: in between the two renames a loader would find a file its
    manifest does not list yet.
    """
    directory = Path(directory)
    verify_checksums(directory)
    target = directory / name
    staging = target.with_name(f".{name}.tmp-{_OWNER}")
    try:
        write(staging)
        staging.chmod(0o666 & ~current_umask())  # writers such as safetensors' leave 0600: unreadable to the group
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    record_checksum(directory, name)
    return target


_OWNER = f"{os.getpid()}@{socket.gethostname()}"
"""Written into the names of an export's temporary folders, so that a later export can tell a killed writer's."""


def _alive(owner: str) -> bool:
    """Whether the process named by a temporary folder's ``<pid>@<host>`` may still run (another host's: assume so)."""
    pid, _, host = owner.partition("@")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clean_after_killed_exports(directory: Path) -> None:
    """Remove the ``.<name>.tmp-*`` and ``.<name>.old-*`` folders that killed exports to ``directory`` left; a
    writer that is still alive keeps its own. An export killed between moving the old one aside and renaming the new
    one into place left ``directory`` absent: the old export is put back first."""
    for kind in ("old", "tmp"):  # the old export goes back before any staging folder is removed
        for leftover in directory.parent.glob(f".{directory.name}.{kind}-*"):
            owner = leftover.name[len(f".{directory.name}.{kind}-") :].rpartition("-")[0]
            if _alive(owner):
                continue
            if kind == "old" and not directory.exists() and (leftover / directory.name).is_dir():
                os.replace(leftover / directory.name, directory)
            shutil.rmtree(leftover, ignore_errors=True)


def _share(folder: Path) -> None:
    """Give ``folder`` (from ``mkdtemp``, 0700) and its files the modes a plain ``mkdir`` and ``open`` would."""
    umask = current_umask()
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)


def check_export_files(path: Path) -> None:
    """Refuse an export whose files are missing, truncated or corrupt, naming the file and the fix.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: ``config.json`` is not JSON, or ``model.safetensors`` is not a complete safetensors file
            (the tokenizer files are checked as they are read).
    """
    missing = [
        name for name in ("config.json", WEIGHTS_FILE, VOCAB_FILE, TOKENIZER_FILE) if not (path / name).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{path} is not an exported sc_foundation model directory: it lacks {missing}. An export holds "
            f"{list(EXPORT_FILES)} (see sc_foundation.models.export)."
        )
    read_json(path / "config.json", DAMAGED_FILE_FIX)
    weights = path / WEIGHTS_FILE
    try:
        with safe_open(weights, framework="pt") as opened:
            opened.keys()
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError, for damaged files
        raise ValueError(
            f"{weights} is corrupt or truncated ({weights.stat().st_size:,} bytes; safetensors says: {error}). "
            f"{DAMAGED_FILE_FIX}"
        ) from None


def main_command_export(repo: str | os.PathLike = ".") -> Path:
    """The export of the newest run of the main command, ``python train.py`` without overrides, under
    ``<repo>/outputs/<date>/<time>``: its ``export/best``, or ``export/final`` when no validation ran.

    Runs with overrides (a 20-step ``experiment=cpu_smoke``, another corpus) are passed over: Hydra lists a run's
    overrides in ``.hydra/overrides.yaml``, an empty list for the main command.

    Raises:
        FileNotFoundError: no such run; the message says how to make one.
    """
    from omegaconf import OmegaConf

    runs = sorted(Path(repo, "outputs").glob("[0-9]*-[0-9]*-[0-9]*/[0-9]*-[0-9]*-[0-9]*"), reverse=True)
    for run in runs:
        overrides = run / ".hydra" / "overrides.yaml"
        if not overrides.is_file() or len(OmegaConf.load(overrides)):
            continue
        for name in ("best", "final"):
            if (run / "export" / name / "config.json").is_file():
                return run / "export" / name
    raise FileNotFoundError(
        f"no export of the main command (`python train.py` without overrides) under {Path(repo, 'outputs')}: run it "
        "(the README's first command), or pass the export you want."
    )


def load_pretrained(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    adapters: str | os.PathLike | None = None,
    verify: bool = True,
    **config_overrides,
) -> ScFoundationPreTrainedModel:
    """Load an exported directory: the saved head class (strictly), in eval mode, carrying its tokenizer.

    The tokenizer is ``model.gene_tokenizer``: everything that feeds the model AnnData takes it from there. An
    annotation export's novelty reference (:mod:`sc_foundation.models.novelty`) is ``model.novelty_reference``
    (None for other exports, and when ``config_overrides`` are given: they may change the cell embedding). A
    published scGPT or Geneformer folder is converted on the fly (see :mod:`sc_foundation.models.convert`).

    Args:
        path: a directory written by :func:`export_pretrained` (``save_pretrained`` plus the tokenizer files), or
            a published scGPT or Geneformer folder.
        device: where to put the model; default CUDA when available, else CPU.
        adapters: a folder of LoRA adapters exported separately (``finetune.lora.merge=false``) to load on top of
            ``path``, their base export; an adapter folder given as ``path`` loads on the base it records
            (:mod:`sc_foundation.models.adapters`).
        verify: check every file against the export's ``checksums.sha256`` first (about 1 s per GB); False skips it
            for speed. An export written before checksums existed has none and loads unchecked.
        config_overrides: config fields that need no other weights, e.g. ``pooling="mean"``, ``pooling_layer=-1``
            or ``normalize_cell_embedding=False`` to read another cell embedding than the model's own.

    Raises:
        FileNotFoundError: the directory does not exist, or lacks the model or the tokenizer files.
        ValueError: a file is corrupt or truncated or differs from its recorded checksum (named), or the tokenizer
            does not fit the model (vocabulary size or value encoding); a published folder that cannot be converted
            exactly (:class:`~sc_foundation.models.convert.ConversionError`).
    """
    from sc_foundation.models import adapters as lora
    from sc_foundation.models.convert import convert, detect

    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"{path} {what}: pass an exported model folder (a run's <output_dir>/export/best) or a published scGPT or "
            "Geneformer folder"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if adapters is None and lora.is_adapter_folder(path):
        path, adapters = lora.recorded_base(path), path
    if adapters is not None:
        if verify:  # both folders: a damaged base corrupts the task model as surely as a damaged adapter
            verify_checksums(path)
            verify_checksums(adapters)
        model = lora.load_with_adapters(path, adapters, **config_overrides).to(device)
        return _attach_novelty(model, adapters, config_overrides)
    if detect(path) is not None:
        return convert(path, **config_overrides).model.to(device)
    check_export_files(path)
    if verify:
        verify_checksums(path)
    config = AutoConfig.from_pretrained(path)
    architecture = (config.architectures or ["ScFoundationModel"])[0]
    model_class = getattr(modeling, architecture, None)
    if not (isinstance(model_class, type) and issubclass(model_class, ScFoundationPreTrainedModel)):
        raise ValueError(f"{path}: config.json names architecture {architecture!r}, not an sc_foundation model")
    tokenizer = GeneTokenizer.from_pretrained(path)
    if len(tokenizer.vocab) != config.vocab_size or tokenizer.config.encoding != config.value_encoding:
        raise ValueError(
            f"{path}: the tokenizer ({len(tokenizer.vocab)} genes, {tokenizer.config.encoding} encoding) does not fit "
            f"the model ({config.vocab_size} genes, {config.value_encoding} encoding)"
        )
    model = model_class.from_pretrained(path, **config_overrides).to(device)
    model.eval()
    model.gene_tokenizer = tokenizer
    return _attach_novelty(model, path, config_overrides)


def _attach_novelty(
    model: ScFoundationPreTrainedModel, folder: Path, config_overrides: Mapping
) -> ScFoundationPreTrainedModel:
    """Give ``model`` the novelty reference its export folder holds as ``model.novelty_reference`` (None when it
    holds none, or when ``config_overrides`` may change the cell embedding the reference was computed with)."""
    model.novelty_reference = None if config_overrides else NoveltyReference.load(folder)
    return model
