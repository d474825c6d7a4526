"""Graphs an engine prepared from an export, kept in icd's cache so that a later process loads them instead of
preparing them again: OpenVINO's compiled graphs (`openvino/`) and ONNX Runtime's optimized CPU graphs
(`onnxruntime/`).

One cache entry per export (`<kind>/<export folder>-<digest of its path>`, what `icd cache` lists and prunes), one
folder in it per graph and settings (`<graph>-<settings digest>-<graph digest>`). The graph digest is the graph's
own - the sha256 its export recorded, and its files' sizes and modification times - since the engines' own keys are
not (OpenVINO keys by the model file's path and some of the settings): a graph exported again at the same path is
prepared into a new folder, and the old one is removed. The settings digest holds whatever makes a prepared graph
differ (OpenVINO's precision hint, which its own key leaves out; ONNX Runtime's version and the CPU's instructions).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from icdcli.core.digests import text_sha256
from icdcli.core.paths import cache_root, mark_used
from icdcli.export.manifest import GraphSpec
from icdcli.io.claims import file_lock

logger = logging.getLogger("icd")

OFF_VALUES = ("0", "off", "no", "false")
UNUSED_DAYS = 30
"""A graph prepared with other settings (an engine version or a CPU since replaced) and not used for this long is
removed when the graph is next prepared: it would otherwise keep its copy of the weights until the whole entry is
pruned, which its use keeps from happening."""


RESERVE_BYTES = 2**30
"""Space a prepared graph leaves free on its disk: the edit's own outputs must still fit after it."""


def no_room(folder: Path, needed: float) -> str | None:
    """Why a prepared graph of about `needed` bytes is not written into `folder` (None when it fits with
    `RESERVE_BYTES` to spare): a disk nearly full, where writing it would take the last of the space and fail."""
    from icdcli.core.paths import free_bytes, human_size

    free = free_bytes(folder)
    if free is None or free - needed >= RESERVE_BYTES:
        return None
    kept = human_size(RESERVE_BYTES)
    return f"{human_size(free)} free on its disk, about {human_size(needed)} needed and {kept} kept free"


def error_line(error: Exception) -> str:
    """An engine's error in one line: its first, at most 200 characters (its type where it says nothing)."""
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def cache_enabled(setting: str) -> bool:
    """Whether the environment variable `setting` leaves the cache on (it is, unless 0, off, no or false)."""
    return os.environ.get(setting, "1").strip().lower() not in OFF_VALUES


def cache_entry(kind: str, folder: Path) -> Path:
    """The cache entry of the graphs prepared from the export in `folder`: named after the export's folder and a
    digest of its full path, since an export may live outside the cache (`icd export --out`)."""
    return cache_root() / kind / f"{folder.name}-{text_sha256(str(folder.resolve()))[:8]}"


def graph_digest(folder: Path, spec: GraphSpec) -> str:
    """What a prepared graph was prepared from: the graph's sha256 as exported, and its files' sizes and modification
    times as they are now (a file changed in place, even where the manifest was not rewritten, gives a new digest)."""
    stats = []
    for path in spec.files(folder):
        stat = path.stat()
        stats.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return text_sha256("|".join([spec.sha256, *stats]))[:16]


def graph_bytes(folder: Path, spec: GraphSpec) -> float:
    """The size of a graph's files (infinite where one is missing: nothing to prepare)."""
    try:
        return sum(path.stat().st_size for path in spec.files(folder))
    except OSError:
        return float("inf")


def settings_tag(settings: dict[str, Any]) -> str:
    """A short name for the settings a graph was prepared with."""
    return text_sha256(json.dumps(settings, sort_keys=True, default=str))[:8]


def prepared_folder(
    kind: str, folder: Path, spec: GraphSpec, settings: dict[str, Any], *, setting: str, name: str | None = None
) -> Path | None:
    """The folder (made, its time stamp the time of this use) that holds `spec`'s graph of the export `folder`
    prepared with `settings`. The folders of this graph's earlier versions at the same settings are removed, and those
    at other settings not used for `UNUSED_DAYS`. None when the environment variable `setting` turns the cache off or
    the cache cannot be written (the graph is then prepared as before, every time)."""
    if not cache_enabled(setting):
        return None
    entry = cache_entry(kind, folder)
    try:
        prefix = f"{spec.name}-{settings_tag(settings)}-"
        target = entry / (prefix + graph_digest(folder, spec))
        unused_since = time.time() - UNUSED_DAYS * 86400
        with file_lock(entry / ".lock"):
            for other in entry.glob(f"{spec.name}-*-*"):
                stale = other.name.startswith(prefix) or other.stat().st_mtime < unused_since
                if other != target and other.is_dir() and stale:
                    shutil.rmtree(other, ignore_errors=True)
            target.mkdir(parents=True, exist_ok=True)
            os.utime(target)
            source = entry / "source.json"
            if not source.exists():
                source.write_text(json.dumps({"export": str(folder.resolve()), "info": {"name": name or folder.name}}))
    except OSError as error:
        logger.debug("%s: prepared graphs not cached (%s)", kind, error)
        return None
    mark_used(entry)
    return target
