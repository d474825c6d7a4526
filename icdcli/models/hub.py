"""Files from the Hugging Face hub: the local cache first, the network only when it answers.

Without a network, `huggingface_hub` retries each request for a minute or more; a user who asked for
a preset deserves an answer in seconds. So before the first download icd checks, once per process
and with a short timeout, that the hub's host accepts a connection; `HF_HUB_OFFLINE=1` skips even
that. "Not cached", "not there" and "no network" all mean "not available" (the caller names what is
missing and how to fetch it); any other hub error (authentication, a gated repository, a server
error) is reported as the hub gave it.
"""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from icdcli.core.errors import ModelSourceError

PROBE_SECONDS = 3.0
_reachable: dict[str, bool] = {}


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def reachable() -> bool:
    """Whether the hub's host accepts a TCP connection within PROBE_SECONDS (asked once per process)."""
    url = endpoint()
    if url not in _reachable:
        parsed = urlparse(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            with socket.create_connection((parsed.hostname or "", port), timeout=PROBE_SECONDS):
                _reachable[url] = True
        except OSError:
            _reachable[url] = False
    return _reachable[url]


def unavailable_reason() -> str:
    """Why the network was not used, for error messages ("" when it was)."""
    if offline():
        return "HF_HUB_OFFLINE is set, so nothing was downloaded"
    if _reachable.get(endpoint()) is False:
        return (
            f"no network: {urlparse(endpoint()).hostname} did not answer within {PROBE_SECONDS:g} s "
            "(set HF_HUB_OFFLINE=1 to skip this check)"
        )
    return ""


def not_available(error: Exception) -> bool:
    from huggingface_hub import errors

    quiet = (
        errors.LocalEntryNotFoundError,
        errors.EntryNotFoundError,
        errors.RepositoryNotFoundError,
        errors.RevisionNotFoundError,
    )
    if isinstance(error, quiet) and not isinstance(error, errors.GatedRepoError):
        return True
    return isinstance(error, OSError) and not isinstance(error, errors.HfHubHTTPError)  # connection trouble


def hub_error(repo: str, what: str, error: Exception) -> ModelSourceError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelSourceError(f"the hub refused {repo}/{what}: {first} (log in with `hf auth login` if it is gated)")


def _from_hub(repo: str, what: str, fetch: Callable[[bool], str]) -> Path | None:
    """`fetch(local_files_only)` from the cache, then from the network when it may be used and answers."""
    for local_only in [True] if offline() else [True, False]:
        if not local_only and not reachable():
            break
        try:
            return Path(fetch(local_only))
        except Exception as error:
            if not not_available(error):
                raise hub_error(repo, what, error) from None
    return None


def hub_file(repo: str, filename: str) -> Path | None:
    """A file of a hub repository, from the cache or downloaded; None when it is not available."""
    from huggingface_hub import hf_hub_download

    return _from_hub(repo, filename, lambda local: hf_hub_download(repo, filename, local_files_only=local))


def hub_snapshot(repo: str, patterns: list[str] | None = None, ignore: list[str] | None = None) -> Path | None:
    """A repository's files matching `patterns` (all when None) but not `ignore`, from the cache or downloaded;
    None when it is not available."""
    from huggingface_hub import snapshot_download

    def fetch(local: bool) -> str:
        return snapshot_download(repo, allow_patterns=patterns, ignore_patterns=ignore, local_files_only=local)

    return _from_hub(repo, "", fetch)


def fetch_command(repo: str, files: list[str], folder: str) -> str:
    """The shell command that fetches exactly `files` (names or glob patterns) of `repo` into `folder`."""
    names = [f for f in files if not any(c in f for c in "*?[")]
    parts = ["hf", "download", repo, *names]
    for pattern in (f for f in files if f not in names):
        parts += ["--include", pattern]
    return shlex.join([*parts, "--local-dir", folder])
