"""Keeping the model libraries' warnings and weight-loading bars off the user's stderr.

diffusers and transformers log a warning for each module cast with `.to()` ("There are modules in ... that should be
kept in float32") and draw a bar for each weight file they load or write: noise about icd's own loading, not about
the user's work. The command line quiets them for its whole run (`quiet_libraries`, through `icdcli.cli.console`); the
Python API only while it loads or moves a model (`libraries_quieted`), and gives the caller's settings back after.

No click and nothing heavy at import: both libraries are imported when the functions run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


def _library_logging() -> tuple[ModuleType, ...]:
    import diffusers.utils.logging
    import transformers.utils.logging

    return diffusers.utils.logging, transformers.utils.logging


def quiet_libraries() -> None:
    """diffusers and transformers: errors only, no progress bars, from now on (the command line's setting)."""
    for library in _library_logging():
        library.set_verbosity_error()
        library.disable_progress_bar()


@contextmanager
def libraries_quieted() -> Iterator[None]:
    """`quiet_libraries` for the duration of a `with` block; the libraries' verbosity and bars are restored after."""
    saved = [(library, library.get_verbosity(), library.is_progress_bar_enabled()) for library in _library_logging()]
    quiet_libraries()
    try:
        yield
    finally:
        for library, verbosity, bars in saved:
            library.set_verbosity(verbosity)
            if bars:
                library.enable_progress_bar()
            else:
                library.disable_progress_bar()
