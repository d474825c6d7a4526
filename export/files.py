"""Small filesystem helpers shared by the exporter and the engine cache: atomic folders and file locks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from icdcli.atomic import atomic_folder

__all__ = ["atomic_folder", "file_lock", "folder_size"]


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) on `path`, so two processes never build the same artifact at once.

    Where fcntl does not exist (Windows) the lock is a no-op.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
