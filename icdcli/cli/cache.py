"""`icd cache list|prune`: what icd keeps in its cache (fused models, ONNX exports, TensorRT engines, OpenVINO's
compiled graphs, ONNX Runtime's optimized CPU graphs; `icdcli.io.cache_entries`), and removing what has not been used
for a while. Heavy libraries are not imported here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from icdcli.cli.common import given_flags
from icdcli.cli.console import console, console_options
from icdcli.cli.options import FiniteFloatRange
from icdcli.core.paths import cache_root, human_size, parse_size
from icdcli.io.cache_entries import (
    BUSY_SECONDS,
    KINDS,
    MAX_SIZE_SETTING,
    cache_entries,
    in_use,
    over_size,
    remove_entry,
)


def _age(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:.0f} days ago" if days >= 1 else f"{seconds / 3600:.1f} hours ago"


def _root() -> Path:
    """The cache root, its path held to icd's path bound (`icdcli.core.texts`): ICD_CACHE_DIR is text a user gives."""
    from icdcli.core.texts import TextError, check_text

    root = cache_root()
    try:
        check_text("path", str(root), "ICD_CACHE_DIR")
    except TextError as error:
        raise click.ClickException(str(error)) from None
    return root


@click.group()
@console_options
def cache() -> None:
    """List or prune icd's cache: fused models, ONNX exports, TensorRT engines, OpenVINO's compiled graphs and ONNX
    Runtime's optimized ones (ICD_CACHE_DIR moves it)."""


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: root, entries, total bytes.")
@console_options
def cache_list(as_json: bool) -> None:
    """Show every cache entry with its size and last use, least recently used first."""
    root = _root()
    entries = cache_entries(root)
    total = sum(entry.bytes for entry in entries)
    if as_json:
        console().json({"root": str(root), "entries": [e.to_json() for e in entries], "bytes": total})
        return
    now = time.time()
    for entry in entries:
        name = f"{entry.name} (export gone)" if entry.orphaned else entry.name
        console().report(f"{human_size(entry.bytes):>9}  {_age(now - entry.last_used):>15}  {KINDS[entry.kind]:<16} "
                         f"{name:<24} {entry.path}")  # fmt: skip
    console().report(f"{len(entries)} entries, {human_size(total)} in {root}")


class ByteSize(click.ParamType):
    """A size such as 20G, 500M, 1.5T or 0 (`icdcli.core.paths.parse_size`): bytes, an int."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)


@cache.command("prune")
@click.option(
    "--older-than",
    "days",
    type=FiniteFloatRange(min=0.0),
    default=30.0,
    show_default=True,
    help="Remove entries not used for this many days (with --max-size: only when given).",
)
@click.option(
    "--max-size",
    type=ByteSize(),
    default=None,
    help="Remove the least recently used entries until the cache (of --kind) holds at most SIZE: 20G, 500M. "
    f"({MAX_SIZE_SETTING}=SIZE does this whenever a command loads a model.)",
)
@click.option("--all", "everything", is_flag=True, help="Remove every entry (not one in use right now).")
@click.option("--kind", type=click.Choice(list(KINDS)), default=None, help="Only entries of this kind.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed, remove nothing.")
@console_options
def cache_prune(days: float, max_size: int | None, everything: bool, kind: str | None, dry_run: bool) -> None:
    """Remove cache entries not used for a while, or the least recently used down to a size; they are made again
    when needed. Graphs prepared from an export that is gone go too. An entry used in the last two minutes (by
    another process, say) is never removed, nor are the graphs prepared from an export in use."""
    now = time.time()
    by_age = everything or max_size is None or "days" in given_flags()
    limit = 0.0 if everything else days * 86400
    every = cache_entries(_root())
    busy = in_use(every, now)
    entries = [entry for entry in every if kind is None or entry.kind == kind]
    idle = [entry for entry in entries if entry.path not in busy]
    chosen = [entry for entry in idle if entry.orphaned or (by_age and now - entry.last_used >= limit)]
    if max_size is not None:
        taken = {entry.path for entry in chosen}
        left = [entry for entry in entries if entry.path not in taken]
        chosen += over_size(left, max_size, {entry.path for entry in idle} - taken)
    freed, removed, failed = 0, 0, 0
    for entry in chosen:
        if not dry_run:
            try:
                remove_entry(entry.path)
            except OSError as error:
                console().error(f"could not remove {entry.path}: {error.strerror or error}")
                failed += 1
                continue
        freed, removed = freed + entry.bytes, removed + 1
        verb = "would remove" if dry_run else "removed"
        gone = ", its export is gone" if entry.orphaned else ""
        console().report(f"{verb} {KINDS[entry.kind]} {entry.name} ({human_size(entry.bytes)}{gone})")
    console().report(f"{'would free' if dry_run else 'freed'} {human_size(freed)} ({removed} entries)")
    left_bytes = sum(entry.bytes for entry in entries) - freed
    if max_size is not None and left_bytes > max_size:
        console().report(f"{human_size(left_bytes)} left, over --max-size {human_size(max_size)}: entries in use "
                         f"in the last {BUSY_SECONDS // 60} minutes are kept")  # fmt: skip
    if failed:
        raise click.ClickException(f"{failed} of {len(chosen)} entries could not be removed (see above)")
