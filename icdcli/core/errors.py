"""Errors that the CLI reports as one line, with what to do about them."""


class ICDError(Exception):
    """A problem with the user's input, model or environment (not a bug in icd)."""


class ModelSourceError(ICDError):
    """A model cannot be found or loaded from what was given."""
