"""sha256 of files, JSON values and strings, and file stamps: the helpers every module may import (nothing heavy)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BLOCK = 1 << 20


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
