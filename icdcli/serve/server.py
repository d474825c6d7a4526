"""Serving the app with uvicorn on a socket bound first: in the foreground (`icd serve`) or in a thread (tests and
benchmarks, on a free port).

Binding before uvicorn starts makes a port in use one line before the model loads, and port 0 a free port whose
number is known before the first request.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from typing import Any

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: a free port), not yet listening; OSError when it cannot be."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]  # fmt: skip
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host in ("::", "") else 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    """The page's URL on a bound socket (`host` as given; a wildcard address shows as 127.0.0.1)."""
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/"


def uvicorn_server(app: Any, *, log_level: str = "warning") -> Any:
    """A uvicorn server of `app` (no access log: the page polls nothing, but each edit is a request)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


class ServerThread:
    """`app` served by uvicorn in a thread, on `host` and a free port unless one is given; a context manager.

    `url` is the page's address once `start` returns (the app's startup, the model's loading included, done).
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 300.0) -> None:
        self.sock = bind(host, port)
        self.url = url_of(self.sock, host)
        self.server = uvicorn_server(app)
        self.timeout = timeout
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="icd-serve-uvicorn")  # fmt: skip

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server stopped while starting (its log says why)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not start in {self.timeout:.0f} s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
