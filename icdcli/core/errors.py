"""Errors that the CLI reports as one line, with what to do about them.

Code below the command line raises these, never click's: `icdcli.cli.common.reports_errors` turns them into click's
errors in one place, an `ICDUsageError` into a usage error (exit 2), any other `ICDError` into a one-line error
(exit 1), with the same message.
"""


class ICDError(Exception):
    """A problem with the user's input, model or environment (not a bug in icd)."""

    reported = False
    """True when the failure's JSON line (--json) was printed already: no second one for it."""


class ICDUsageError(ICDError):
    """What was asked for cannot be done as asked (a missing prompt, an output onto an input, a bad value): the
    command line reports it as a usage error (exit 2)."""


class ModelSourceError(ICDError):
    """A model cannot be found or loaded from what was given."""
