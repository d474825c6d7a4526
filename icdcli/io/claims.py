"""Files icd keeps beside its outputs while it works, and how it recognises the ones a dead run left.

- Temporary files: `.<name>.icd-<pid>-<random>.part`, written and renamed onto `<name>`; the writer holds
  an advisory lock (flock) on it while it lives. Staging folders of `atomic_folder` are named alike.
- Claims: `.<name>.icd-claim`, created and locked by the process making `<name>`, so that concurrent runs
  into one folder share the work: a process that cannot lock an output's claim leaves that output to its
  owner. A lock dies with its process, even one killed by SIGKILL.

- Cache locks: `file_lock(path)` holds the same lock on a lock file, waiting for whoever holds it, so two
  processes never build the same export or engine at once (`icdcli.export.files` re-exports it).

One lock for all of them: `flock` on POSIX; on Windows `msvcrt.locking` of one byte far past the file's
content (its locks are mandatory: a claim's process id stays readable). `sweep` removes, in one folder, the
temporary files and claims whose lock nobody holds and whose process is gone: what a killed run left
behind. Nothing else is touched. Where no lock can be taken (some network file systems) claims and cache
locks go on unlocked, and nothing is swept; on Windows nothing is swept either (an open file cannot be
removed there).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

CLAIM_SUFFIX = ".icd-claim"
PART_SUFFIX = ".part"
_PART = re.compile(r"^\..+\.icd-(\d+)-[0-9a-f]+\.part$")
_CLAIM = re.compile(r"^\..+\.icd-claim$")


LOCKED, HELD, UNSUPPORTED = "locked", "held", "unsupported"
WINDOWS_LOCK_BYTE = 1 << 30
"""Where a Windows lock sits: one byte far past any claim's or lock file's content (Windows may lock past the end)."""
_WINDOWS_BUSY = frozenset({errno.EACCES, errno.EDEADLK, getattr(errno, "EDEADLOCK", errno.EDEADLK)})


def _lock(fd: int, wait: bool = False) -> str:
    """Take the exclusive lock of an open file, waiting for its holder when `wait`: LOCKED, HELD (another open
    file has it; never with `wait`) or UNSUPPORTED (no locks here: some network file systems)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return HELD
        except OSError as error:
            return HELD if error.errno in (errno.EAGAIN, errno.EACCES) else UNSUPPORTED
        return LOCKED
    if msvcrt is not None:
        return _windows_lock(fd, wait)
    return UNSUPPORTED  # pragma: no cover - neither POSIX nor Windows


def _windows_lock(fd: int, wait: bool) -> str:
    """`_lock` through msvcrt: a lock of `WINDOWS_LOCK_BYTE`, polled while another holds it and `wait` is asked."""
    windows: Any = msvcrt  # typed for every platform: its functions exist on Windows only
    position = os.lseek(fd, 0, os.SEEK_CUR)
    try:
        while True:
            os.lseek(fd, WINDOWS_LOCK_BYTE, os.SEEK_SET)
            try:
                windows.locking(fd, windows.LK_NBLCK, 1)
                return LOCKED
            except OSError as error:
                if error.errno not in _WINDOWS_BUSY:
                    return UNSUPPORTED
                if not wait:
                    return HELD
            time.sleep(0.05)
    finally:
        os.lseek(fd, position, os.SEEK_SET)


def _unlock(fd: int) -> None:
    """Give up the lock `_lock` took (closing the file gives it up too; Windows says it may take a while)."""
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        elif msvcrt is not None:
            windows: Any = msvcrt
            position = os.lseek(fd, 0, os.SEEK_CUR)
            os.lseek(fd, WINDOWS_LOCK_BYTE, os.SEEK_SET)
            try:
                windows.locking(fd, windows.LK_UNLCK, 1)
            finally:
                os.lseek(fd, position, os.SEEK_SET)


def _remove_and_close(fd: int, path: Path) -> None:
    """Remove `path` if it still names the open file `fd`, and close it. Windows cannot remove an open file: there
    it is closed first, and left to whoever opened it meanwhile."""
    if fcntl is None:
        _unlock(fd)
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        return
    if _same_file(fd, path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    os.close(fd)


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold the exclusive lock of the lock file `path` (made with its folder if missing), waiting while another
    process or thread holds it: two processes never build the same artifact at once. The file stays.

    Where no lock can be taken (some network file systems) it goes on unlocked, as claims do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _lock(fd, wait=True)
        yield
    finally:
        _unlock(fd)
        os.close(fd)


def _try_lock(fd: int) -> bool:
    """Whether this process may go on as the holder: it took the lock, or locks do not exist here."""
    return _lock(fd) != HELD


def _hold_for_sweep(fd: int) -> None:
    """Lock a temporary file or folder while it lives, so that `sweep` leaves it alone: on POSIX only, where sweeps
    run (a Windows lock would be mandatory and stop the writer of a temporary file past `WINDOWS_LOCK_BYTE`)."""
    if fcntl is not None:
        _try_lock(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the open file `fd` (not removed or replaced since it was opened)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def part_prefix(target: Path) -> str:
    """The start of the name of a temporary file for `target` made by this process."""
    return f".{target.name}.icd-{os.getpid()}-"


@contextlib.contextmanager
def temporary_beside(target: Path) -> Iterator[Path]:
    """A new, empty, locked temporary file in `target`'s folder; removed afterwards unless renamed away."""
    for _ in range(100):
        path = target.parent / f"{part_prefix(target)}{secrets.token_hex(4)}{PART_SUFFIX}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as error:  # about the target, not a name the user never gave
            raise OSError(error.errno, error.strerror, str(target)) from None
        break
    else:  # pragma: no cover - a hundred random names taken
        raise FileExistsError(f"no free temporary name beside {target}")
    try:
        _hold_for_sweep(fd)
        yield path
    finally:
        _remove_and_close(fd, path)


@contextlib.contextmanager
def folder_beside(target: Path, role: str = "") -> Iterator[Path]:
    """A new, locked, private folder in `target`'s folder named like a temporary file; the caller removes or
    renames it (a sweep removes it once this process is gone)."""
    for _ in range(100):
        path = target.parent / f".{target.name}{role}.icd-{os.getpid()}-{secrets.token_hex(4)}{PART_SUFFIX}"
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue
        break
    else:  # pragma: no cover - a hundred random names taken
        raise FileExistsError(f"no free temporary name beside {target}")
    fd = os.open(path, os.O_RDONLY)
    try:
        _hold_for_sweep(fd)
        yield path
    finally:
        os.close(fd)


@dataclass
class Claim:
    """The lock on one output, held until `release`."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        _remove_and_close(fd, self.path)


def claim_path(output: Path) -> Path:
    return output.parent / f".{output.name}{CLAIM_SUFFIX}"


def _lock_unless_held(fd: int, path: Path, patience: float = 0.2) -> bool:
    """Lock a claim; False when a process holds it. A sweep holds a stale claim's lock only for the moment it
    takes to remove it: wait that long, and report a removed claim as lockable (the caller opens it anew)."""
    deadline = time.monotonic() + patience
    while not _try_lock(fd):
        if not _same_file(fd, path):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def claim(output: Path) -> Claim | None:
    """Claim `output` for this process; None when another live process holds its claim."""
    path = claim_path(output)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _lock_unless_held(fd, path):
            os.close(fd)
            return None
        if not _same_file(fd, path):  # removed by a sweep or its owner between the open and the lock
            os.close(fd)
            continue
        held = Claim(path, fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:  # a full disk takes the new, empty file but not its line: no claim left behind
            held.release()
            raise
        return held
    return None  # pragma: no cover - the claim kept changing under us: leave the output to whoever holds it


def claim_owner(output: Path) -> str:
    """The process id written in an output's claim ('' when unknown)."""
    try:
        return claim_path(output).read_text(errors="replace").strip()[:20]
    except OSError:
        return ""


def _stale(entry: Path) -> bool:
    match = _PART.match(entry.name)
    return not (match and process_alive(int(match.group(1))))


def sweep(folder: Path) -> list[Path]:
    """Remove the temporary files and claims that dead icd processes left in `folder`; the paths removed."""
    if fcntl is None:
        return []
    removed: list[Path] = []
    try:
        entries = [Path(entry.path) for entry in os.scandir(folder) if entry.name.startswith(".")]
    except OSError:
        return removed
    for entry in entries:
        if not (_PART.match(entry.name) or _CLAIM.match(entry.name)) or not _stale(entry):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _lock(fd) == LOCKED and _same_file(fd, entry):  # never on a file system without locks
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
