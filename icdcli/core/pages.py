"""Memory an engine no longer uses, given back: freed heap (`trim_freed_heap`) and the pages of mapped weight files.

OpenVINO maps an ONNX graph's weight file, reads it while compiling and again while its first run repacks every
weight into the CPU's blocked layouts, and keeps the mapping for shapes it may meet later. The mapped pages stay
resident after that although nothing reads them again: 3.4 GB of an SD1.5 UNet beside its 2.7 GB of repacked copies.
`madvise(MADV_DONTNEED)` on a read-only mapping takes the pages out of this process; a later read maps them again
from the page cache or the file, with the same bytes. Linux only (its /proc/self/maps); elsewhere nothing happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

MADV_DONTNEED = 4
DROP_INTERVAL_S = 0.2
"""How often pages are dropped while an engine reads a mapped file: often enough that a 3.4 GB file never becomes
resident (a UNet's compile and first run read it in 2.5 and 5 s on a 2-core CPU)."""


def trim_freed_heap() -> None:
    """Give freed heap back to the system (glibc's `malloc_trim`; elsewhere nothing): the freed weights of a closed
    ONNX Runtime UNet session otherwise stay in the process (about 1.7 GB after an SD1.5 edit)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def read_only_mappings(paths: Iterable[Path], maps: str) -> list[tuple[int, int]]:
    """(start, end) of each mapping in `maps` (the text of /proc/self/maps) of one of `paths` that cannot be
    written: only those are safe to drop (a writable private mapping may hold changes the file lacks)."""
    names = {str(Path(path).resolve()) for path in paths}
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].strip() in names and "w" not in fields[1]:
            start, end = (int(value, 16) for value in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def drop_mapped_pages(paths: Iterable[Path]) -> int:
    """Take the resident pages of this process's read-only mappings of `paths` out of it; returns the bytes of the
    mappings advised (0 where the platform has no /proc/self/maps or madvise)."""
    try:
        maps = Path("/proc/self/maps").read_text()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end in read_only_mappings(paths, maps):
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            advised += end - start
    return advised


@contextlib.contextmanager
def pages_dropped(paths: Iterable[Path], interval: float = DROP_INTERVAL_S) -> Iterator[None]:
    """While the body runs (an engine reading mapped weight files), drop their pages every `interval` seconds, and
    once more when it ends."""
    files = [Path(path) for path in paths]
    stop = threading.Event()

    def keep_dropping() -> None:
        while not stop.wait(interval):
            drop_mapped_pages(files)

    worker = threading.Thread(target=keep_dropping, name="icd-drop-pages", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        drop_mapped_pages(files)
