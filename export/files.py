"""Small filesystem helpers shared by the exporter and the engine cache: atomic folders and file locks.

Both are `icdcli`'s own, re-exported: `atomic_folder` from `icdcli.io.atomic`, and `file_lock`, the lock of
`icdcli.io.claims` (the one lock icd takes, on POSIX and on Windows) held on a lock file, waiting for its holder.
"""

from __future__ import annotations

from pathlib import Path

from icdcli.io.atomic import atomic_folder
from icdcli.io.claims import file_lock

__all__ = ["atomic_folder", "file_lock", "folder_size"]


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
