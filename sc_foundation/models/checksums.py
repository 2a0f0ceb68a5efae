"""SHA-256 checksums of an export folder: ``checksums.sha256``, written last, verified on load.

The manifest lists every file of the folder (sub-folders included, whatever the export holds: weights, tokenizer,
model card, adapters), one ``<hex digest>  <relative path>`` line each, the format of ``sha256sum``, so a user can
also check a copied folder with ``sha256sum -c checksums.sha256`` from inside it. A flipped bit anywhere in a file,
even inside tensor data that still parses, then names the damaged file instead of loading silently.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sc_foundation.data.genes import DAMAGED_FILE_FIX, _atomic_write_text

MANIFEST = "checksums.sha256"
_BLOCK = 1 << 20  # bytes hashed per read: a multi-GB safetensors file is never held in memory at once


class ChecksumError(ValueError):
    """A file of an export does not match its recorded SHA-256, or the manifest itself is damaged."""


def file_digest(path: str | os.PathLike) -> str:
    """The hex SHA-256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` but the manifest, as sorted POSIX paths relative to it."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST
    )


def write_checksums(folder: str | os.PathLike) -> Path:
    """Record the SHA-256 of every file under ``folder`` in ``folder/checksums.sha256`` (atomically). Call it last,
    once nothing else will be written there."""
    folder = Path(folder)
    return _write_manifest(folder, {name: file_digest(folder / name) for name in _files(folder)})


def record_checksum(folder: str | os.PathLike, name: str) -> Path:
    """Add or replace the line of the one file ``name`` in ``folder/checksums.sha256`` (atomically) and keep the
    others as recorded: for a file added to a folder just verified, without hashing every other file again (a
    published-size export is GBs). A folder without a manifest gets one for all its files (:func:`write_checksums`).
    """
    folder = Path(folder)
    recorded = read_checksums(folder)
    if recorded is None:
        return write_checksums(folder)
    recorded[name] = file_digest(folder / name)
    return _write_manifest(folder, recorded)


def _write_manifest(folder: Path, digests: dict[str, str]) -> Path:
    """``folder/checksums.sha256`` from ``{relative path: hex digest}``, sorted by path, written atomically."""
    _atomic_write_text(folder / MANIFEST, "".join(f"{digests[name]}  {name}\n" for name in sorted(digests)))
    return folder / MANIFEST


def read_checksums(folder: str | os.PathLike) -> dict[str, str] | None:
    """``{relative path: hex digest}`` from ``folder/checksums.sha256``; None when the folder has no manifest (an
    export written before checksums existed).

    Raises:
        ChecksumError: the manifest itself is damaged (a line that is not ``<64 hex digits>  <path>``).
    """
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return None
    damaged = f"{manifest} is corrupt or truncated"
    try:
        lines = manifest.read_text().splitlines()
    except UnicodeDecodeError:
        raise ChecksumError(f"{damaged} (not text). {DAMAGED_FILE_FIX}") from None
    if not lines:  # an export always holds files: an empty manifest lost its lines
        raise ChecksumError(f"{damaged} (empty). {DAMAGED_FILE_FIX}")
    recorded = {}
    for number, line in enumerate(lines, start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdef" for c in digest):
            raise ChecksumError(f"{damaged} (line {number} is not '<sha256>  <file>'). {DAMAGED_FILE_FIX}")
        recorded[name] = digest
    return recorded


def verify_checksums(folder: str | os.PathLike) -> bool:
    """Check every file listed in ``folder/checksums.sha256`` against its recorded SHA-256.

    Returns:
        True when the folder has a manifest and every file matches; False when it has none (nothing to check).

    Raises:
        FileNotFoundError: a listed file is missing (named, with the fix).
        ChecksumError: a listed file differs from its checksum (the first such file is named, with the fix).
    """
    folder = Path(folder)
    recorded = read_checksums(folder)
    if recorded is None:
        return False
    for name, expected in recorded.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing, or its name in {folder / MANIFEST} is damaged: the manifest lists it. "
                f"{DAMAGED_FILE_FIX}"
            )
        if file_digest(path) != expected:
            raise ChecksumError(
                f"{path} is corrupt or truncated: its SHA-256 differs from the one in {folder / MANIFEST} (unless "
                f"that line of the manifest is what was damaged). {DAMAGED_FILE_FIX}"
            )
    return True
