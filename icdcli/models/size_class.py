"""Whether a model request is SD-size, told from the bytes of its UNet weights before anything is loaded.

`--backend auto` with `--precision auto` runs an SD-size model on PyTorch bf16 on a CPU with bf16 matrix instructions
(`icdcli.backends.accelerated.choose_run`); small models (the embedded one, the test models) keep their backend and
precision. The size is read from the file system alone (file sizes and `icd.json`, no weights, no network): a request
whose size cannot be known so (a hub id that is not in the hub cache) is of no size class (None).
"""

from __future__ import annotations

import json
from pathlib import Path

from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import MODEL_JSON
from icdcli.diffusion.recipe import SD15, SDXL
from icdcli.models import sources
from icdcli.models.sources import (
    DEFAULT_MODEL,
    HUB_ID,
    HUB_IGNORE,
    PRESETS,
    ModelRequest,
    find_release_files,
)

LARGE_UNET_BYTES = 500 * 10**6
"""UNet weights of this many bytes or more make a model SD-size: SD1.5's UNet is 1.7 GB in float16 (3.4 GB in
float32), SDXL's 5.1 GB; the embedded model's is 12 MB."""

FAMILY_UNET_BYTES = {SD15: 1_719_000_000, SDXL: 5_135_000_000}
"""A family's UNet in float16: the size of a preset's (whose files may not be here yet) or of a release folder's
whose UNet is not local (its base comes from the hub)."""

WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt"})


def is_sd_size(unet_bytes: int | None, threshold: int | None = None) -> bool | None:
    """Whether UNet weights of `unet_bytes` make an SD-size model (`threshold`, default `LARGE_UNET_BYTES`, or more);
    None when the size is unknown."""
    if unet_bytes is None:
        return None
    return unet_bytes >= (LARGE_UNET_BYTES if threshold is None else threshold)


def request_is_sd_size(request: ModelRequest) -> bool | None:
    """Whether the model `request` names is SD-size (`is_sd_size` of `request_unet_bytes`); None when unknown."""
    return is_sd_size(request_unet_bytes(request))


def request_unet_bytes(request: ModelRequest) -> int | None:
    """The bytes of one UNet of the model `request` names, read the way `load_requested_model` reads the request:
    a preset by its family, a model folder by its UNet (or its teacher's, or its base's), a release folder or parts by
    the teacher, else the base's UNet; a hub id only from the hub cache. None when it cannot be told cheaply."""
    name = request.model
    if name in PRESETS:
        return FAMILY_UNET_BYTES[PRESETS[name].family]
    parts = bool(request.base or request.forward_lora or request.reverse_lora)
    if name in (None, DEFAULT_MODEL):
        return _parts_bytes(request) if parts else _model_folder_bytes(sources.DEFAULT_MODEL_DIR)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _folder_bytes(folder, request)
    if not folder.exists() and HUB_ID.fullmatch(name):
        cached = _cached_hub_folder(name)
        return None if cached is None else _folder_bytes(cached, request)
    return None


def _first(*sizes: int | None) -> int | None:
    return next((size for size in sizes if size is not None), None)


def _file_bytes(path: Path | str | None) -> int | None:
    if path is None:
        return None
    path = Path(path).expanduser()
    return path.stat().st_size if path.is_file() else None


def _weights_bytes(folder: Path) -> int | None:
    """The largest weights file of a UNet folder (a folder may hold a float32 file beside its float16 variant)."""
    if not folder.is_dir():
        return None
    sizes = [p.stat().st_size for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return max(sizes, default=None)


def _base_bytes(base: Path | str | None) -> int | None:
    """A base's UNet: a pipeline folder's `unet/` weights, or a single-file checkpoint (mostly its UNet) whole."""
    if base is None:
        return None
    base = Path(base).expanduser()
    return _weights_bytes(base / "unet") if base.is_dir() else _file_bytes(base)


def _parts_bytes(request: ModelRequest) -> int | None:
    return _first(_file_bytes(request.teacher), _base_bytes(request.base))


def _model_folder_bytes(folder: Path) -> int | None:
    """An icd model folder's UNet: a merged folder's forward UNet; a `lora` folder's teacher, else its base's UNet."""
    try:
        data = json.loads((folder / MODEL_JSON).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("format") != "lora":
        return _weights_bytes(folder / "forward_unet")
    teacher, base = data.get("teacher"), data.get("base")
    return _first(
        _file_bytes(folder / teacher) if isinstance(teacher, str) else None,
        _base_bytes(folder / base) if isinstance(base, str) else None,
    )


def _folder_bytes(folder: Path, request: ModelRequest) -> int | None:
    """A model folder's UNet, or a release tarball's folder's: its teacher, else the base's UNet, else its family's."""
    if (folder / MODEL_JSON).is_file():
        return _model_folder_bytes(folder)
    try:
        found = find_release_files(folder)
    except (ModelSourceError, OSError):
        return None  # loading it says what is wrong
    if found is None:
        return None
    family = FAMILY_UNET_BYTES.get(found.family) if found.family is not None else None
    return _first(_file_bytes(request.teacher), _file_bytes(found.teacher), _base_bytes(request.base), family)


def _cached_hub_folder(repo: str) -> Path | None:
    """The hub cache's snapshot of `repo`, without the network; None when it is not cached."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, ignore_patterns=HUB_IGNORE, local_files_only=True))
    except (OSError, ValueError):
        return None
