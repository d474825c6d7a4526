"""Where icd keeps things, importable without torch: the cache root and its use markers."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

USED_MARKER = ".used"
MODEL_JSON = "icd.json"  # what makes a folder an icd model folder


def cache_root() -> Path:
    """Where fused models, exported graphs and engines are cached: ICD_CACHE_DIR, else XDG_CACHE_HOME/icd."""
    if os.environ.get("ICD_CACHE_DIR"):
        return Path(os.environ["ICD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "icd"


def mark_used(folder: Path) -> None:
    """Record that a cache entry was used now (best effort: a read-only cache stays as it is)."""
    with contextlib.suppress(OSError):
        (folder / USED_MARKER).touch()


def mark_cached_used(folder: Path) -> None:
    """`mark_used` for a folder in icd's cache; one elsewhere (an export the user placed with --out) is left as it
    is: a marker is icd's to write only in its own cache."""
    try:
        folder.resolve().relative_to(cache_root().resolve())
    except (ValueError, OSError):
        return
    mark_used(folder)


def free_bytes(where: str | os.PathLike[str]) -> int | None:
    """The space left on the file system that holds `where` (or would: its nearest existing folder); None when it
    cannot be read."""
    import shutil

    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def human_size(size: float) -> str:
    """A number of bytes as people read it: 512 B, 3.4 KB, 114.0 MB, 20.7 GB (binary units)."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """A size as people write it, in bytes: 20G, 500M, 1.5T, 4096, 0 (binary units; a trailing B or iB may follow);
    ValueError saying how to write one otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size: give a number with K, M, G or T (20G, 500M, 0)")
    number, unit = match.groups()
    return int(float(number) * SIZE_UNITS[unit.upper()])
