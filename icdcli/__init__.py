"""icd: text-guided editing of real photos with invertible Consistency Distillation."""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version number is pyproject.toml's, as the installed distribution reports it
    __version__ = version("icd")
except PackageNotFoundError:  # a source tree run without installing
    __version__ = "unknown"
