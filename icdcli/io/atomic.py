"""Writes that either complete or leave nothing: a file or a folder staged beside its target, then renamed."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from icdcli.core.errors import no_space_error
from icdcli.io.claims import folder_beside, sweep, temporary_beside


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    with _space_named(target), temporary_beside(target) as temporary:  # named, locked: a dead run's leftovers known
        yield temporary
        temporary.chmod(0o666 & ~_umask())  # made private; the result is an ordinary file
        os.replace(temporary, target)


@contextlib.contextmanager
def _space_named(target: Path) -> Iterator[None]:
    """A full disk met while writing `target`, in whatever words the writer used (safetensors, torch.save, PIL, ONNX),
    raised as the OSError of a full disk at `target`: the path the user gave, not the temporary one."""
    try:
        yield
    except Exception as error:
        full = no_space_error(error, target)
        if full is None:
            raise
        raise full from error


# a folder icd wrote holds one of these: a model (icd.json) or an ONNX export (manifest.json)
ICD_FOLDER_MARKERS = ("icd.json", "manifest.json")


def _refuse_foreign_folder(
    target: Path, markers: tuple[str, ...] = ICD_FOLDER_MARKERS, owned: Callable[[Path], str | None] | None = None
) -> None:
    """An existing folder is replaced only when icd made it (one of `markers` is in it; with `owned`, what it says
    of the folder: None when icd made it and it holds nothing else, else why not and what to do) or it is empty;
    a file is never replaced by a folder."""
    if not os.path.lexists(target):
        return
    if not target.is_dir() or target.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists and is not a folder icd made; choose another path", str(target))
    if not any(target.iterdir()):
        return
    if owned is not None:
        problem = owned(target)
        if problem is not None:
            raise FileExistsError(errno.EEXIST, problem, str(target))
        return
    if not any((target / marker).is_file() for marker in markers):
        raise FileExistsError(
            errno.EEXIST,
            f"exists and was not made by icd for this (no {' or '.join(markers)} in it); choose another path or "
            "empty it",
            str(target),
        )


@contextlib.contextmanager
def atomic_folder(
    target: str | Path,
    markers: tuple[str, ...] = ICD_FOLDER_MARKERS,
    owned: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Yield a staging folder beside `target`; on success it replaces `target` in one rename.

    A failed or interrupted write leaves the previous `target` (or nothing) in place, never half a folder. An
    existing `target` is replaced only when it is empty or holds one of `markers` (what icd writes into such a
    folder), or, with `owned`, when that finds it icd's and holding nothing else; anything else raises
    FileExistsError.
    """
    target = Path(target)
    _refuse_foreign_folder(target, markers, owned)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent)  # staging folders of writes that were killed
    with _space_named(target), folder_beside(target) as staging:
        staging.chmod(0o755)  # made private; the result is an ordinary folder
        try:
            yield staging
            if target.exists():
                with folder_beside(target, ".old") as retired:
                    target.rename(retired / target.name)
                    staging.rename(target)
                    shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
