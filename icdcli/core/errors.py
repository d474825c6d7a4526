"""Errors that the CLI reports as one line, with what to do about them.

Code below the command line raises these, never click's: `icdcli.cli.common.reports_errors` turns them into click's
errors in one place, an `ICDUsageError` into a usage error (exit 2), any other `ICDError` into a one-line error
(exit 1), with the same message.
"""

from __future__ import annotations

import errno
import os


class ICDError(Exception):
    """A problem with the user's input, model or environment (not a bug in icd)."""

    reported = False
    """True when the failure's JSON line (--json) was printed already: no second one for it."""


class ICDUsageError(ICDError):
    """What was asked for cannot be done as asked (a missing prompt, an output onto an input, a bad value): the
    command line reports it as a usage error (exit 2)."""


class ModelSourceError(ICDError):
    """A model cannot be found or loaded from what was given."""


NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""A write that found no space left, or the disk quota used up."""
_NO_SPACE_TEXTS = {
    "no space left on device": 28,  # ENOSPC, as libraries that drop the errno word it (safetensors: "os error 28")
    "os error 28": 28,
    "disk quota exceeded": 122,
    "os error 122": 122,
}
_WRITE_FAILED_TEXTS = ("file write failed", "failed writing file")
"""torch.save's words for a write the disk refused (PytorchStreamWriter), with no errno to say why."""
_LOW_SPACE_BYTES = 64 * 2**20


def space_errno(error: BaseException, where: str | os.PathLike[str] | None = None) -> int | None:
    """ENOSPC or EDQUOT when `error`, or an error it was raised from, is a write that found no space left; None for
    any other error. Libraries that raise their own types (safetensors, torch.save, ONNX) are read by their words;
    torch.save's bare "file write failed" counts where the file system of `where` has under 64 MB left."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE_ERRNOS:
            return current.errno
        text = str(current).lower()
        for words, code in _NO_SPACE_TEXTS.items():
            if words in text:
                return errno.ENOSPC if code == 28 else errno.EDQUOT
        if where is not None and any(words in text for words in _WRITE_FAILED_TEXTS) and _low_space(where):
            return errno.ENOSPC
        suppressed = current.__suppress_context__  # `raise ... from None`: the error it replaced was dealt with
        current = current.__cause__ or (None if suppressed else current.__context__)
    return None


def _low_space(where: str | os.PathLike[str]) -> bool:
    from icdcli.core.paths import free_bytes

    free = free_bytes(where)
    return free is not None and free < _LOW_SPACE_BYTES


def no_space_error(error: BaseException, where: str | os.PathLike[str]) -> OSError | None:
    """`error` as the OSError of a full disk at `where` (the file or folder being written; the path users know, not a
    temporary one), or None when `error` is not about space (see `space_errno`)."""
    code = space_errno(error, where)
    if code is None:
        return None
    return OSError(code, os.strerror(code), str(where))


class NotEnoughSpace(OSError):
    """A write that would not fit, refused before it starts: `needed` and `free` bytes at `where`."""

    def __init__(self, what: str, where: str | os.PathLike[str], needed: int, free: int):
        from icdcli.core.paths import human_size

        reason = f"{what} needs about {human_size(needed)} and its disk has {human_size(free)} free"
        super().__init__(errno.ENOSPC, reason, str(where))
        self.needed, self.free = needed, free


def space_reason(error: OSError) -> str:
    """What a full-disk OSError says, in icd's words: its own reason where icd gave one (`NotEnoughSpace`), else no
    space left or the quota used up."""
    if isinstance(error, NotEnoughSpace) and error.strerror:
        return error.strerror
    return "the disk quota is used up" if error.errno == errno.EDQUOT else "no space left on the device"


_MEMORY_WORDS = ("failed to allocate memory", "out of memory", "cannot allocate memory", "bad_alloc")


def memory_failure(error: BaseException) -> str | None:
    """A one-line message when `error` says memory ran out (MemoryError, torch's OutOfMemoryError, ONNX Runtime's
    or OpenVINO's failed allocation, whose words may come deep in a long message), else None."""
    text = " ".join(str(error).split())
    lowered = text.lower()
    found = max((lowered.find(words) for words in _MEMORY_WORDS), default=-1)
    named = isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
    if found < 0 and not named:
        return None
    said = f" ({text[max(found, 0) :][:120]})" if text else ""
    return (f"out of memory{said}: give a smaller image (--width/--height, or a smaller photo), --low-memory, or "
            "another --backend")  # fmt: skip
