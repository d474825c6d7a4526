"""The sha256 of large files, read once: a digest cache in icd's cache folder keyed by path, size and modification
time, written under a lock."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from icdcli.core.digests import file_stamp, files_sha256
from icdcli.io.atomic import atomic_path
from icdcli.io.claims import file_lock

HASHES_FILE = "hashes.json"
"""In icd's cache: the sha256 of files hashed before, by resolved path, size and modification time."""


def cached_file_sha256(path: str | Path, *, cache_file: str | Path | None = None) -> str:
    """Hex sha256 of a file's bytes, read once: later calls find it in the cache's `hashes.json` as long as the
    file keeps its path, size and modification time (a multi-GB checkpoint is not read again on every edit).

    Args:
        path: The file.
        cache_file: Where the known digests are kept; `hashes.json` in icd's cache when not given. A cache that
            cannot be written costs a new read next time, never an error.
    """
    from icdcli.core.paths import cache_root

    before = file_stamp(path)
    name, size, mtime = before
    cache = Path(cache_file) if cache_file is not None else cache_root() / HASHES_FILE
    entry = _known_hashes(cache).get(name)
    if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [size, mtime] and isinstance(entry[2], str):
        return entry[2]
    digest = files_sha256([path])
    if file_stamp(path) == before:  # not changed while it was read
        with contextlib.suppress(OSError):
            _store_hash(cache, name, [size, mtime, digest])
    return digest


def _known_hashes(cache: Path) -> dict[str, Any]:
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _store_hash(cache: Path, name: str, entry: list[Any]) -> None:
    """Add one digest to the cache file, under its lock (another process may add its own meanwhile); entries of
    files that are gone are dropped."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache.with_name(f".{cache.name}.lock")):
        known = {key: value for key, value in _known_hashes(cache).items() if os.path.exists(key)}
        known[name] = entry
        with atomic_path(cache) as temporary:
            temporary.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
