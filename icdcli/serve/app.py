"""The ASGI app of `icd serve` (Starlette): the page, the JSON API and the edited images.

    POST /invert   the photo (multipart field `image`, or base64 in a JSON `image`), `src`, optional `seed`
    POST /edit     JSON: `inversion`, `tgt` and the decode's settings (names of a spec row / the edit flags)
    GET  /images/<id>.png   an edited PNG with its parameter record
    GET  /api, /health      the model, the fields each endpoint takes, the limits
    GET  /          the page (static/index.html)

Every error is JSON, `{"error": "..."}`, with a 4xx status that says whose it is (see docs/serve.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from icdcli.core.errors import space_errno

from .engine import Editor, Limits
from .fields import ApiError, base64_image, edit_fields, invert_fields

STATIC = Path(__file__).parent / "static"
IMAGE_ID = re.compile(r"^[0-9a-f]{16}$")
FORM_OVERHEAD = 64 * 1024
"""Room a request has beyond its image: the other fields, multipart boundaries and headers."""
log = logging.getLogger("icd")


def create_app(
    pipeline: Any,
    *,
    limits: Limits | None = None,
    label: str | None = None,
    save_dir: Path | None = None,
    allowed_hosts: Sequence[str] | None = None,
    warm_up: bool = True,
) -> Starlette:
    """The app over one model.

    Args:
        pipeline: an `icdcli.ICDEditPipeline`, or a function that returns one (called once, in the model's
            worker thread: at startup with `warm_up`, else on the first request).
        limits: upload size, waiting requests and the inversions and images kept (`engine.Limits`).
        label: the model's name in records (default: the model's own).
        save_dir: a folder that also receives every edited PNG.
        allowed_hosts: the Host header names served (any port); others get 400, which keeps a web page that
            rebinds its DNS name to 127.0.0.1 out. None: any.
        warm_up: load the model at startup rather than on the first request.
    """
    editor = Editor(pipeline, limits=limits, label=label, save_dir=save_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if warm_up:
            await editor.submit(editor.pipeline)
        try:
            yield
        finally:
            editor.close()

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/api", describe, methods=["GET"]),
        Route("/health", describe, methods=["GET"]),
        Route("/invert", invert, methods=["POST"]),
        Route("/edit", edit, methods=["POST"]),
        Route("/images/{name}", image, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers: dict[Any, Callable[..., Any]] = {ApiError: api_error, HTTPException: http_error, Exception: crash}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.editor = editor
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, hosts=tuple(allowed_hosts))
    return app


# --- errors -------------------------------------------------------------------------------------------------


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ApiError)
    return error_response(error.status, error.message, error.headers)


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    detail = error.detail if isinstance(error.detail, str) and error.detail else "HTTP error"
    if error.status_code == 404:
        detail = f"no such page: {request.url.path} (GET /api lists the endpoints)"
    elif error.status_code == 405:
        detail = f"{request.method} is not what {request.url.path} takes (GET /api lists the endpoints)"
    return error_response(error.status_code, detail, dict(error.headers or {}))


async def crash(request: Request, error: Exception) -> Response:
    if space_errno(error) is not None:  # the server's disk, not the request: 507, and one line in the log
        log.error("icd serve: %s %s: no space left on the device; free space on it", request.method, request.url.path)
        return error_response(507, "no space left on the server's disk: free space there and try again")
    log.exception("icd serve: %s %s failed", request.method, request.url.path)
    return error_response(500, f"internal error ({type(error).__name__}): see the server's log")


class HostCheck:
    """Serve only requests whose Host header names one of `hosts` (any port)."""

    def __init__(self, app: ASGIApp, hosts: tuple[str, ...]) -> None:
        self.app = app
        self.hosts = {host.lower() for host in hosts}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            host = headers.get(b"host", b"").decode("latin-1").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]") not in {h.strip("[]") for h in self.hosts}:
                response = error_response(400, f"this server answers to {', '.join(sorted(self.hosts))}, "
                                               f"not the host {host!r}")  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def same_origin(request: Request) -> None:
    """403 for a POST a page of another origin makes (a browser names it in Origin): a site the user visits cannot
    use this server."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser's cross-origin request: curl, scripts, a form of this very page
        return
    host = request.headers.get("host", "")
    if origin.split("://", 1)[-1].rstrip("/").lower() != host.lower():
        raise ApiError(403, f"a page of {origin} may not use this server; open it from http://{host}/")


# --- request bodies -----------------------------------------------------------------------------------------


def editor_of(request: Request) -> Editor:
    return request.app.state.editor


async def bounded_body(request: Request, limit: int) -> bytes:
    """The request's body, 413 as soon as it passes `limit` bytes (by its Content-Length or as it arrives)."""
    declared = request.headers.get("content-length")
    too_large = f"the request is over {limit:,} bytes; the server takes photos up to --max-upload-mb"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(body: bytes, where: str) -> dict[str, Any]:
    try:
        given = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise ApiError(400, f"{where}: the body is not JSON ({error})") from None
    except RecursionError:  # arrays or objects nested past Python's recursion limit
        raise ApiError(400, f"{where}: the body is not JSON icd reads (nested too deep)") from None
    if not isinstance(given, dict):
        raise ApiError(422, f"{where}: send a JSON object of fields, not {type(given).__name__}")
    return given


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def upload(request: Request, limit: int) -> tuple[bytes, str, dict[str, Any]]:
    """The photo's bytes, its name and the other fields of a `POST /invert` (multipart or JSON)."""
    kind = media_type(request)
    body = await bounded_body(request, limit * 4 // 3 + FORM_OVERHEAD)  # base64 takes 4 bytes for 3
    if kind == "multipart/form-data":
        data, name, fields = await _form_upload(request, body)
    elif kind == "application/json":
        fields = json_object(body, "/invert")
        data, name = base64_image(fields.pop("image", None), "image", "the photo's PNG or JPEG bytes"), "upload"
    else:
        raise ApiError(415, f"/invert takes multipart/form-data (field image) or application/json (image as base64), "
                            f"not {kind or 'a body without a Content-Type'}")  # fmt: skip
    if len(data) > limit:
        raise ApiError(413, f"the photo is {len(data):,} bytes; the server takes up to {limit:,} (--max-upload-mb)")
    return data, name, fields


class InMemoryParts(MultiPartParser):
    """Starlette's multipart parser, its uploads kept in memory: the body is there already (bounded by
    --max-upload-mb), and the stock parser would spill an upload over 1 MB into the system's temporary folder."""

    spool_max_size = max_file_size = 2**40  # the attribute's name in Starlette >= 0.40, and before


async def _form_upload(request: Request, body: bytes) -> tuple[bytes, str, dict[str, Any]]:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await InMemoryParts(request.headers, stream(), max_files=1, max_fields=32).parse()
    except MultiPartException as error:
        raise ApiError(400, f"/invert: not a multipart form that can be read ({error.message})") from None
    fields: dict[str, Any] = {}
    data, name = None, "upload"
    for key, value in form.multi_items():
        if key == "image" and not isinstance(value, str):
            data, name = await value.read(), Path(value.filename or "upload").name or "upload"
        else:
            fields[key] = value
    await form.close()
    if data is None:
        raise ApiError(422, "image is needed: upload the photo as the multipart file field image")
    return data, name, fields


# --- endpoints ----------------------------------------------------------------------------------------------


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


async def describe(request: Request) -> Response:
    return JSONResponse(editor_of(request).describe())


async def invert(request: Request) -> Response:
    """`POST /invert`: the inversion's id (kept: the same photo, prompt and seed give it without a model call)."""
    same_origin(request)
    started = time.perf_counter()
    editor = editor_of(request)
    data, name, given = await upload(request, editor.limits.max_upload_bytes)
    fields = invert_fields(given)
    kept = editor.cached_inversion(data, fields)
    stored, cached = (kept, True) if kept is not None else await editor.submit(editor.invert, data, name, fields)
    return JSONResponse({
        "inversion": stored.id, "seconds": round(stored.seconds, 4), "cached": cached,
        "width": stored.size[0], "height": stored.size[1], "src": stored.src, "seed": stored.seed,
        "wall_seconds": round(time.perf_counter() - started, 4),
    })  # fmt: skip


async def edit(request: Request) -> Response:
    """`POST /edit`: decode a kept inversion under a target prompt; the result's URL, seconds and record."""
    same_origin(request)
    started = time.perf_counter()
    editor = editor_of(request)
    if media_type(request) != "application/json":
        raise ApiError(415, "/edit takes application/json: an object of fields (GET /api lists them)")
    limit = FORM_OVERHEAD + editor.limits.max_upload_bytes * 4 // 3  # a mask travels as base64
    fields = edit_fields(json_object(await bounded_body(request, limit), "/edit"))
    editor.find_inversion(fields.inversion)  # 404 before waiting in the queue
    result = await editor.submit(editor.edit, fields)
    return JSONResponse({**result, "wall_seconds": round(time.perf_counter() - started, 4)})


async def image(request: Request) -> Response:
    """`GET /images/<id>.png`: the edited PNG, its record in the `icd` text chunk, named for download."""
    name = request.path_params["name"]
    image_id = name.removesuffix(".png")
    if not name.endswith(".png") or not IMAGE_ID.match(image_id):
        raise ApiError(404, f"no image {name!r}: image URLs are /images/<id>.png as /edit returns them")
    path, filename = editor_of(request).image_file(image_id)
    return FileResponse(path, media_type="image/png", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "private, max-age=3600",
    })  # fmt: skip
