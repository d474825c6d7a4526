"""`icd serve`: a local web page and JSON API to invert a photo once and try many edits on it.

    from icdcli import ICDEditPipeline
    from icdcli.serve import create_app

    app = create_app(ICDEditPipeline.from_pretrained(device="cpu"))  # an ASGI app: uvicorn, or Starlette's TestClient

Starlette and uvicorn are the optional extra `serve` (`pip install "icd[serve]"`); they are imported only when
the app is made, so `import icdcli.serve` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from icdcli.core.lazy import lazy_exports

if TYPE_CHECKING:
    from .app import create_app
    from .engine import Limits
    from .server import ServerThread

__all__ = ["Limits", "ServerThread", "create_app"]

__getattr__, __dir__ = lazy_exports(
    __name__, globals(), {"create_app": "app", "Limits": "engine", "ServerThread": "server"}
)
