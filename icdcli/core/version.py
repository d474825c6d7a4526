"""The installed icd's version, importable by every layer without the package face (`icdcli.__version__`)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:  # the one version number is pyproject.toml's, as the installed distribution reports it
    __version__ = version("icd")
except PackageNotFoundError:  # a source tree run without installing
    __version__ = "unknown"
