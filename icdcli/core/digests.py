"""sha256 of files, JSON values and strings, and file stamps: the helpers every module may import (nothing heavy)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BLOCK = 1 << 20
HASHES_FILE = "hashes.json"
"""In icd's cache: the sha256 of files hashed before, by resolved path, size and modification time."""


def files_sha256(paths: Iterable[str | Path]) -> str:
    """Hex sha256 over the bytes of several files, in order (a graph and its external-data file)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """`sha256:<hex>` of one file's bytes: how records and model metadata name a file's content."""
    return "sha256:" + files_sha256([path])


def json_sha256(value: Any) -> str:
    """Hex sha256 of a JSON value with sorted keys (values JSON cannot write are written as `str`)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def text_sha256(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes (lone surrogates of undecodable file names kept)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def file_stamp(path: str | Path, *, name: str | None = None) -> list[Any]:
    """`[name, size, mtime_ns]` of a file: identity by stat, cheap enough for every load, blind to a rewrite
    that keeps both size and time.

    Args:
        path: The file.
        name: What to call it in the stamp; its resolved path when not given.
    """
    stat = Path(path).stat()
    return [str(Path(path).resolve()) if name is None else name, stat.st_size, stat.st_mtime_ns]


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
    from icdcli.io.atomic import atomic_path
    from icdcli.run.claims import file_lock

    cache.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache.with_name(f".{cache.name}.lock")):
        known = {key: value for key, value in _known_hashes(cache).items() if os.path.exists(key)}
        known[name] = entry
        with atomic_path(cache) as temporary:
            temporary.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
