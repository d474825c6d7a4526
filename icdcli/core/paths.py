"""Where icd keeps things, importable without torch: the cache root and its use markers."""

from __future__ import annotations

import contextlib
import os
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
