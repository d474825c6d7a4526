"""`icd serve`: a local web page and JSON API to invert a photo once and try many edits (icdcli.serve).

Nothing heavy is imported here: Starlette, uvicorn and torch load when the command runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import click

from icdcli.cli.common import load_model, reports_errors
from icdcli.cli.console import console_options, say
from icdcli.cli.options import (
    BACKEND_CHOICES,
    BACKEND_SECTION,
    MODEL_SECTION,
    FiniteFloatRange,
    SectionedCommand,
    model_options,
)

SERVE_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "python-multipart": "python_multipart"}


def missing_serve_modules() -> list[str]:
    """The distributions of the `serve` extra that are not installed."""
    missing = []
    for distribution, module in SERVE_MODULES.items():
        names = (module, "multipart") if module == "python_multipart" else (module,)  # its older module name
        if not any(importlib.util.find_spec(name) is not None for name in names):
            missing.append(distribution)
    return missing


@click.command(
    "serve",
    cls=SectionedCommand,
    sections=[
        ("Server", ["host", "port", "max_upload_mb", "max_queue", "save_dir", "open_browser"]),
        MODEL_SECTION,
        BACKEND_SECTION,
    ],
    examples=[
        "# the embedded model on http://127.0.0.1:7860/",
        "icd serve",
        "# SD1.5 on a GPU, the page opened in the browser, every edit also kept in edited/",
        "icd serve --model sd15 --open --save-dir edited/",
        "# the API from a script (docs/serve.md)",
        "curl -F image=@cat.jpg -F src='a cat' http://127.0.0.1:7860/invert",
    ],
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on. The default answers this machine only; anything else makes the editor "
    "reachable by others, with no authentication.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True, help="Port (0: a free one).")
@click.option(
    "--max-upload-mb",
    type=FiniteFloatRange(0.01, 1024),
    default=20.0,
    show_default=True,
    help="Largest photo an upload may be, in MiB (larger: 413).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(0, 10_000),
    default=8,
    show_default=True,
    help="Requests that may wait while the model runs one (the model runs one call at a time); more: 503.",
)
@click.option(
    "--save-dir",
    type=click.Path(file_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also write every edited PNG (with its record) into this folder. Default: nothing is written outside a "
    "temporary folder removed when the server stops.",
)
@click.option("--open/--no-open", "open_browser", default=False, help="Open the page in a web browser once served.")
@click.option(
    "--backend",
    type=click.Choice(BACKEND_CHOICES),
    default="auto",
    show_default=True,
    envvar="ICD_BACKEND",
    help="Where the networks run (as icd edit's --backend). Env: ICD_BACKEND.",
)
@model_options
@console_options
@reports_errors
def serve(
    host: str,
    port: int,
    max_upload_mb: float,
    max_queue: int,
    save_dir: Path | None,
    open_browser: bool,
    backend: str,
    **model_opts: Any,
) -> None:
    """Serve a web page and JSON API for interactive editing: upload a photo, invert it once under its source
    prompt, then try target prompts, methods, guidance, tau and Prompt-to-Prompt settings on it; each edit is the
    decode alone and carries the record icd edit writes.

    The model loads once and runs one call at a time. Ctrl-C stops the server and removes its temporary folder.
    """
    missing = missing_serve_modules()
    if missing:
        raise click.ClickException(
            f'icd serve needs {", ".join(missing)}: pip install "icd[serve]" (from a checkout: pip install ".[serve]")'
        )
    from icdcli.serve.server import LOOPBACK_NAMES, bind, is_loopback, url_of

    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    try:
        sock = bind(host, port)
    except OSError as error:
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({error.strerror or error}): choose another --port or --host"
        ) from None
    url = url_of(sock, host)
    if not is_loopback(host):
        say(f"note: --host {host} lets other machines use this editor; it has no authentication")
    try:
        _serve(sock, url, max_upload_mb, max_queue, save_dir, open_browser, backend, model_opts,
               allowed_hosts=LOOPBACK_NAMES if is_loopback(host) else None)  # fmt: skip
    finally:
        sock.close()


def _serve(
    sock: Any,
    url: str,
    max_upload_mb: float,
    max_queue: int,
    save_dir: Path | None,
    open_browser: bool,
    backend: str,
    model_opts: dict[str, Any],
    *,
    allowed_hosts: tuple[str, ...] | None,
) -> None:
    from icdcli import ICDEditPipeline
    from icdcli.serve.app import create_app
    from icdcli.serve.engine import Limits
    from icdcli.serve.server import uvicorn_server

    loaded = load_model(model_opts, need_teacher=False, backend=backend)
    pipe = ICDEditPipeline(loaded.model, loaded.backend)
    limits = Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_queue=max_queue)
    app = create_app(pipe, limits=limits, label=loaded.label, save_dir=save_dir, allowed_hosts=allowed_hosts)
    server = uvicorn_server(app)
    line = f"icd serve: {url} (model {loaded.label} on {loaded.backend}, {pipe.device}; Ctrl-C stops)"
    _when_started(server, url, line, open_browser)
    server.run(sockets=[sock])


def _when_started(server: Any, url: str, line: str, open_browser: bool) -> None:
    """Once `server` accepts connections: say `line` (the URL works from then on) and open `url` if asked."""
    import threading
    import time

    def wait() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        say(line)
        if open_browser:
            import webbrowser

            webbrowser.open(url)

    threading.Thread(target=wait, daemon=True, name="icd-serve-started").start()
