"""One lock for icd: the cache lock of exports and engines (`file_lock`) is the claims' lock, held by one process or
thread at a time, on POSIX through flock and on Windows through msvcrt."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from icdcli.export.files import file_lock
from icdcli.io import claims


def test_the_export_cache_lock_is_the_claims_lock():
    assert file_lock is claims.file_lock


def test_two_threads_take_the_lock_one_after_the_other(tmp_path):
    lock = tmp_path / "cache" / ".export.lock"  # its folder is made on the way
    events: list[str] = []
    held = threading.Event()

    def first() -> None:
        with file_lock(lock):
            events.append("first in")
            held.set()
            time.sleep(0.4)
            events.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    assert held.wait(10)
    started = time.monotonic()
    with file_lock(lock):  # waits for the first holder
        events.append("second in")
        waited = time.monotonic() - started
    thread.join()
    assert events == ["first in", "first out", "second in"]
    assert waited > 0.2  # it did wait (the holder slept 0.4 s)
    assert lock.is_file()  # the lock file stays for the next build


def test_a_process_waits_for_the_lock_another_process_holds(tmp_path):
    lock, marker = tmp_path / ".build.lock", tmp_path / "built"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from icdcli.io.claims import file_lock\n"
         f"with file_lock(Path({str(lock)!r})):\n    print('held', flush=True)\n    time.sleep(0.5)\n"
         f"    Path({str(marker)!r}).write_text('done')"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        fd = os.open(lock, os.O_RDWR)
        try:
            assert claims._lock(fd) == claims.HELD  # the claims' own test sees the other process's lock
        finally:
            os.close(fd)
        with file_lock(lock):
            assert marker.read_text() == "done"  # the other process finished before this one got in
    finally:
        holder.wait(30)
    assert holder.returncode == 0


def test_a_claim_and_a_cache_lock_exclude_each_other(tmp_path):
    output = tmp_path / "out.png"
    held = claims.claim(output)
    assert held is not None
    fd = os.open(claims.claim_path(output), os.O_RDWR)
    try:
        assert claims._lock(fd) == claims.HELD
    finally:
        os.close(fd)
    held.release()
    with file_lock(claims.claim_path(output)):
        assert claims.claim(output) is None  # whoever holds the file's lock, by either door, holds it


def test_without_locks_the_cache_lock_goes_on_as_claims_do(tmp_path, monkeypatch):
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(claims.fcntl, "flock", no_locks)
    with file_lock(tmp_path / ".x.lock"), file_lock(tmp_path / ".x.lock"):
        pass  # an NFS without locks: no error, no wait for ever


class _FakeMsvcrt:
    """msvcrt.locking's rules, for this test: byte ranges locked per open file, a busy range is EACCES."""

    LK_NBLCK, LK_UNLCK = 2, 0

    def __init__(self) -> None:
        self.held: dict[tuple[int, int], int] = {}
        self.calls: list[int] = []

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        key = (os.fstat(fd).st_ino, os.lseek(fd, 0, os.SEEK_CUR))
        self.calls.append(key[1])
        if mode == self.LK_UNLCK:
            self.held.pop(key, None)
        elif self.held.get(key, fd) != fd:
            raise PermissionError(errno.EACCES, "Permission denied")
        else:
            self.held[key] = fd


def test_on_windows_the_same_lock_is_msvcrts_far_past_the_content(tmp_path, monkeypatch):
    fake = _FakeMsvcrt()
    monkeypatch.setattr(claims, "fcntl", None)
    monkeypatch.setattr(claims, "msvcrt", fake)
    output = tmp_path / "x-edit.png"
    mine = claims.claim(output)
    assert mine is not None and claims.claim(output) is None  # a second claim is refused, as on POSIX
    assert claims.claim_owner(output) == str(os.getpid())  # the id stays readable: the lock is past it
    assert set(fake.calls) == {claims.WINDOWS_LOCK_BYTE}
    mine.release()
    assert not claims.claim_path(output).exists()
    lock = tmp_path / ".export.lock"
    order: list[str] = []

    def second() -> None:
        with file_lock(lock):
            order.append("second")

    with file_lock(lock):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.3)
        order.append("first out")
    waiter.join(10)
    assert order == ["first out", "second"]
    assert Path(lock).read_bytes() == b""  # nothing written into the lock file's content
