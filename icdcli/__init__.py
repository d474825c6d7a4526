"""icd: text-guided editing of real photos with invertible Consistency Distillation.

The distribution installs as `icd` and imports as `icdcli`; its Python face is `ICDEditPipeline`
(`from icdcli import ICDEditPipeline`), imported when first named so that `import icdcli` and `icd --help`
stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from icdcli.core.version import __version__

if TYPE_CHECKING:
    from icdcli.pipeline import ICDEditOutput, ICDEditPipeline

_LAZY = {"ICDEditPipeline": "pipeline", "ICDEditOutput": "pipeline"}
__all__ = ["ICDEditOutput", "ICDEditPipeline", "__version__"]


def __getattr__(name: str) -> Any:
    """The package's exports, each imported from its module when first asked for (PEP 562)."""
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
