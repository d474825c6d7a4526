"""`icd serve`: a local web page and JSON API to invert a photo once and try many edits on it.

    from icdcli import ICDEditPipeline
    from icdcli.serve import create_app

    app = create_app(ICDEditPipeline.from_pretrained(device="cpu"))  # an ASGI app: uvicorn, or Starlette's TestClient

Starlette and uvicorn are the optional extra `serve` (`pip install "icd[serve]"`); they are imported only when
the app is made, so `import icdcli.serve` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .engine import Limits
    from .server import ServerThread

_LAZY = {"create_app": "app", "Limits": "engine", "ServerThread": "server"}
__all__ = ["Limits", "ServerThread", "create_app"]


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
