"""The entries of icd's cache, as `icd cache` lists and prunes them, and the size bound `ICD_CACHE_MAX_SIZE` keeps.

Every entry is one folder: `merged/<key>` (a fused model), `bases/<key>` (a single-file base converted
to a diffusers folder), `onnx/<key>` (an export of one model and precision), `engines/<key>` (the engines
built from one export), `openvino/<key>` and `onnxruntime/<key>` (the graphs OpenVINO compiled, and ONNX Runtime
optimized for the CPU, from one export). An entry's last use is the newest time stamp of the folder and its `.used`
marker, which loading refreshes. An entry used in the last `BUSY_SECONDS` may be in use by another process: it is
never removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icdcli.core.errors import ICDError
from icdcli.core.paths import USED_MARKER, cache_root, human_size, parse_size

KINDS = {
    "merged": "fused model",
    "bases": "converted base",
    "onnx": "onnx export",
    "engines": "tensorrt engines",
    "openvino": "openvino graphs",
    "onnxruntime": "ort optimized",
}
BUSY_SECONDS = 120  # an entry touched this recently may be in use by another process: never pruned
PREPARED_KINDS = ("openvino", "onnxruntime")
"""Kinds whose entries were prepared from an export (`source.json` names it): of no use once it is gone."""


@dataclass
class CacheEntry:
    kind: str
    path: Path
    name: str
    bytes: int
    last_used: float
    orphaned: bool = False  # prepared from an export that is gone

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "name": self.name, "bytes": self.bytes,
                "last_used": round(self.last_used, 3), "orphaned": self.orphaned}  # fmt: skip


def source_export(kind: str, folder: Path) -> Path | None:
    """The export a prepared entry was prepared from (its `source.json`); None for other kinds, or where not known."""
    if kind not in PREPARED_KINDS:
        return None
    try:
        return Path(str(json.loads((folder / "source.json").read_text())["export"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def orphaned(kind: str, folder: Path) -> bool:
    """Whether a prepared entry's export is gone: no manifest where it was (an entry of unknown source is kept)."""
    export = source_export(kind, folder)
    return export is not None and not (export / "manifest.json").is_file()


def in_use(entries: list[CacheEntry], now: float) -> set[Path]:
    """The entries used in the last `BUSY_SECONDS`, and the graphs prepared from an export among them (an edit
    prepares them only when it first runs a graph, after its load has marked the export)."""
    busy = {entry.path for entry in entries if now - entry.last_used < BUSY_SECONDS}
    busy_exports = {path.resolve() for path in busy}
    for entry in entries:
        export = source_export(entry.kind, entry.path)
        if export is not None and export.resolve() in busy_exports:
            busy.add(entry.path)
    return busy


def entry_name(kind: str, folder: Path) -> str:
    """The model an entry holds, by its `icd.json`, `manifest.json` or `source.json` ("?" where none says)."""
    for candidate in ("icd.json", "manifest.json", "source.json"):
        try:
            data = json.loads((folder / candidate).read_text())
        except (OSError, ValueError):
            continue
        info = data.get("info", data) if isinstance(data, dict) else {}
        if isinstance(info, dict) and info.get("name"):
            return str(info["name"]) + (f" ({data['precision']})" if kind == "onnx" and data.get("precision") else "")
    return "?"


def read_entry(kind: str, folder: Path) -> CacheEntry:
    size, newest = 0, folder.stat().st_mtime
    for path in folder.rglob("*"):
        try:
            stat = path.stat()
        except OSError:
            continue
        if path.is_file():
            size += stat.st_size
        if path.name == USED_MARKER:
            newest = max(newest, stat.st_mtime)
    return CacheEntry(kind, folder, entry_name(kind, folder), size, newest, orphaned(kind, folder))


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every entry in the cache under `root`, least recently used first."""
    entries = []
    for kind in KINDS:
        folder = root / kind
        if not folder.is_dir():
            continue
        entries += [read_entry(kind, p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return sorted(entries, key=lambda entry: entry.last_used)


def over_size(entries: list[CacheEntry], max_bytes: int, removable: set[Path]) -> list[CacheEntry]:
    """The least recently used of the `removable` entries whose removal brings `entries` to `max_bytes` or under
    (all of them removable when it cannot: the others stay whatever their size)."""
    total = sum(entry.bytes for entry in entries)
    chosen = []
    for entry in entries:  # least recently used first
        if total <= max_bytes:
            break
        if entry.path in removable:
            chosen.append(entry)
            total -= entry.bytes
    return chosen


MAX_SIZE_SETTING = "ICD_CACHE_MAX_SIZE"
"""Environment variable: a size (20G, 500M) the cache is kept to; each command that loads a model removes the least
recently used entries past it."""


def max_size() -> int | None:
    """`ICD_CACHE_MAX_SIZE` in bytes (None where it is not set); ICDError for a value that is not a size."""
    value = os.environ.get(MAX_SIZE_SETTING, "").strip()
    if not value:
        return None
    try:
        return parse_size(value)
    except ValueError as error:
        raise ICDError(f"{MAX_SIZE_SETTING}={value!r}: {error}") from None


def remove_entry(path: Path) -> None:
    """Remove a cache entry's folder; a link someone put in the cache goes without what it points to. OSError when
    it cannot be removed."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def keep_within_max_size(say: Callable[[str], None]) -> None:
    """Remove the least recently used idle entries past `ICD_CACHE_MAX_SIZE`, if it is set, with one note."""
    limit = max_size()
    if limit is None:
        return
    root = cache_root()
    entries = cache_entries(root)
    idle = {entry.path for entry in entries} - in_use(entries, time.time())
    freed, removed = 0, 0
    for entry in over_size(entries, limit, idle):
        try:
            remove_entry(entry.path)
        except OSError:  # left for `icd cache prune`, which says why
            continue
        freed, removed = freed + entry.bytes, removed + 1
    if removed:
        say(f"note: removed {removed} least recently used cache entries ({human_size(freed)}) to keep {root} within "
            f"{MAX_SIZE_SETTING}={human_size(limit)}")  # fmt: skip
