"""What `icd serve` does with a request, without the web framework: one model, one worker thread that runs every
model call in turn, a bound on the requests waiting for it, the inversions (LRU) and the edited images.

The event loop never runs torch: `submit` hands a call to the worker and awaits it. The worker is the only thread
that touches the model and the caches' contents, so calls are serialised without a lock around torch; a counter
(under a lock) bounds how many may wait, and a request past the bound is refused at once (503).

Files: the images (and, while they are read, the uploads) go to a temporary folder made at start and removed at
`close` (or when the process ends); with `save_dir`, each edited PNG is also written there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import parts
from .fields import EDIT_FIELDS, INVERT_FIELDS, ApiError, EditFields, InvertFields

T = TypeVar("T")
log = logging.getLogger("icd")


@dataclass(frozen=True)
class Limits:
    """The bounds of a server: upload size, waiting requests, inversions and images kept."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_queue: int = 8
    """Requests that may wait while one runs; one more is refused with 503."""
    max_inversions: int = 32
    max_images: int = 256


@dataclass
class Stored:
    """One inversion the server keeps: the value, and what the record of its edits says about the photo."""

    id: str
    inversion: Any
    src: str
    seed: int
    name: str
    sha256: str
    size: tuple[int, int]
    seconds: float


class Editor:
    """The model and its caches behind the API.

    Args:
        pipeline: an `icdcli.ICDEditPipeline`, or a function that returns one (called once, in the worker thread,
            by the first call of `pipeline`: the app's startup submits it).
        limits: the bounds of uploads, the queue and the caches.
        label: the model's name in records (`icd edit` records the `--model` given; default: the model's name).
        save_dir: a folder that also receives every edited PNG (None: the temporary folder only).
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        limits: Limits | None = None,
        label: str | None = None,
        save_dir: Path | None = None,
    ) -> None:
        self.limits = limits or Limits()
        made = callable(pipeline) and not _is_pipeline(pipeline)
        self._factory: Callable[[], Any] | None = pipeline if made else None
        self._pipe: Any = None if made else pipeline
        self._label = label
        self.save_dir = save_dir
        self.folder = Path(tempfile.mkdtemp(prefix="icd-serve-"))
        self._remove_folder = weakref.finalize(self, shutil.rmtree, str(self.folder), ignore_errors=True)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icd-serve-model")
        self._waiting = 0
        self._count = threading.Lock()
        self._inversions: OrderedDict[str, Stored] = OrderedDict()
        self._images: OrderedDict[str, tuple[Path, str]] = OrderedDict()  # id: the file, its download name
        self._identity: dict[str, Any] | None = None

    # --- the model -------------------------------------------------------------------------------------------

    def pipeline(self) -> Any:
        """The pipeline, loaded on first use (worker thread only)."""
        if self._pipe is None:
            assert self._factory is not None
            self._pipe = self._factory()
        if self._identity is None:
            model = self._pipe.model
            self._identity = {
                "model": self._label or str(model.info.name),
                "model_hash": parts.model_hash(model),
                "files": parts.model_files(model),
            }
        return self._pipe

    def describe(self) -> dict[str, Any]:
        """What `GET /api` says: the model (once loaded), the fields each endpoint takes, the limits."""
        from icdcli import __version__

        described: dict[str, Any] = {"icd_version": __version__, "ready": self._identity is not None}
        if self._identity is not None:
            model = self._pipe.model
            info = model.info
            described["model"] = {
                "name": str(info.name),
                "label": self._identity["model"],  # what records call it: the --model given, as icd edit's
                "model_hash": self._identity["model_hash"],
                "backend": self._pipe.backend,
                "device": str(model.device),
                "precision": str(model.dtype).removeprefix("torch."),
                "steps": int(info.num_steps),
                "native_size": int(info.native_size),
                "recipe": info.edit.to_json(),
            }
        described["endpoints"] = {
            "POST /invert": {"fields": list(INVERT_FIELDS), "required": ["image", "src"]},
            "POST /edit": {"fields": list(EDIT_FIELDS), "required": ["inversion", "tgt"]},
            "GET /images/<id>.png": {},
        }
        described["limits"] = {"max_upload_bytes": self.limits.max_upload_bytes, "max_queue": self.limits.max_queue,
                               "max_inversions": self.limits.max_inversions,
                               "max_images": self.limits.max_images}  # fmt: skip
        return described

    # --- the queue -------------------------------------------------------------------------------------------

    async def submit(self, call: Callable[..., T], *args: Any) -> T:
        """Run `call(*args)` in the worker after the calls before it; 503 when `max_queue` calls wait already."""
        with self._count:
            if self._waiting > self.limits.max_queue:  # one runs, max_queue wait
                raise ApiError(503, f"busy: {self._waiting} requests are running or waiting (--max-queue "
                                    f"{self.limits.max_queue}); try again shortly", {"Retry-After": "1"})  # fmt: skip
            self._waiting += 1
        try:
            return await asyncio.wrap_future(self._worker.submit(call, *args))
        finally:
            with self._count:
                self._waiting -= 1

    @property
    def waiting(self) -> int:
        """Calls submitted and not finished: the one running and those waiting for it."""
        with self._count:
            return self._waiting

    def close(self) -> None:
        """Stop the worker (a running call finishes, waiting ones are dropped) and remove the temporary folder."""
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._remove_folder()

    # --- inversions ------------------------------------------------------------------------------------------

    def find_inversion(self, inversion: str) -> Stored:
        found = self._inversions.get(inversion)
        if found is None:
            raise ApiError(404, f"no inversion {inversion!r} here (unknown, or dropped as the least recently used "
                                f"of {self.limits.max_inversions}): POST /invert the photo again")  # fmt: skip
        return found

    def cached_inversion(self, data: bytes, fields: InvertFields) -> Stored | None:
        """The inversion of this photo, prompt and seed when it is kept already (no model call; any thread)."""
        if self._identity is None:
            return None
        return self._inversions.get(self._inversion_id(hashlib.sha256(data).hexdigest(), fields))

    def _inversion_id(self, sha256: str, fields: InvertFields) -> str:
        assert self._identity is not None and self._pipe is not None
        seed = self._pipe.model.info.edit.seed if fields.seed is None else fields.seed  # as the recipe resolves it
        key = [sha256, fields.src, int(seed), self._identity["model_hash"]]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def invert(self, data: bytes, name: str, fields: InvertFields) -> tuple[Stored, bool]:
        """Invert an uploaded photo (worker thread): the kept inversion and whether it was kept already."""
        pipe = self.pipeline()
        sha256 = hashlib.sha256(data).hexdigest()
        key = self._inversion_id(sha256, fields)
        if key in self._inversions:
            self._inversions.move_to_end(key)
            return self._inversions[key], True
        image = read_upload(self.folder, data, name, pipe.model.info.native_size**2)
        started = time.perf_counter()
        inversion = pipe.invert(image, fields.src, seed=fields.seed)
        seconds = time.perf_counter() - started
        stored = Stored(key, inversion, fields.src, int(inversion.settings.seed), name, sha256,
                        parts.original_size(image), seconds)  # fmt: skip
        self._inversions[key] = stored
        while len(self._inversions) > self.limits.max_inversions:
            self._inversions.popitem(last=False)
        return stored, False

    # --- edits -----------------------------------------------------------------------------------------------

    def edit(self, fields: EditFields) -> dict[str, Any]:
        """Decode a kept inversion under the target (worker thread); the result's id, seconds and record."""
        pipe = self.pipeline()
        stored = self.find_inversion(fields.inversion)
        self._inversions.move_to_end(stored.id)
        mask = None if fields.mask is None else read_mask(self.folder, fields.mask, stored.size)
        started = time.perf_counter()
        try:
            output = pipe.edit(stored.inversion, fields.tgt, **fields.pipeline_arguments(), mask_image=mask)
        except (ValueError, parts.ICDError) as error:  # P2PError: words not in their prompt; a non-finite result
            raise ApiError(422, str(error)) from None
        seconds = time.perf_counter() - started
        image = output[0]
        if image.size != stored.size:  # a large JPEG decoded at reduced scale: back to its own size, as icd edit
            from PIL import Image

            image = image.resize(stored.size, Image.Resampling.LANCZOS)
        record = self._record(stored, fields, output.settings)
        if fields.mask is not None:
            record.update(parts.mask_record(hashlib.sha256(fields.mask).hexdigest()))
        image_id = secrets.token_hex(8)
        self._store(image_id, image, record)
        return {"id": image_id, "image": f"/images/{image_id}.png", "seconds": round(seconds, 4),
                "width": image.width, "height": image.height, "record": record}  # fmt: skip

    def _record(self, stored: Stored, fields: EditFields, settings: Any) -> dict[str, Any]:
        """The record `icd edit` writes for this photo and these settings (`icdcli.batch.parameter_record`), plus
        the inversion it was decoded from."""
        from icdcli import __version__

        assert self._identity is not None
        model = self._pipe.model
        record = parts.parameter_record(
            method=settings.method,
            p2p=settings.p2p.to_record() if settings.method == "p2p" else None,
            model=self._identity["model"],
            model_hash=self._identity["model_hash"],
            backend=self._pipe.backend,
            precision=str(model.dtype).removeprefix("torch."),
            sampler=settings.sampling.sampler,
            steps=settings.sampling.steps(model.info.num_steps),
            src=stored.src,
            tgt=fields.tgt,
            guidance=settings.guidance,
            tau=settings.tau,
            seed=settings.seed,
            version=__version__,
            input_path=stored.name,
            input_size=stored.size,
            input_sha256=stored.sha256,
        )
        return {**record, **parts.unguided_record(settings.method, fields.unguided), "inversion": stored.id}

    def _store(self, image_id: str, image: Any, record: dict[str, Any]) -> None:
        """The PNG with its record (the `icd` and `parameters` text chunks of `icd edit`'s outputs)."""
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        for key, value in parts.image_text(record, self._identity["files"] if self._identity else None).items():
            info.add_text(key, value)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        images = self.folder / "images"
        images.mkdir(exist_ok=True)
        path, name = images / f"{image_id}.png", download_name(image_id, record)
        path.write_bytes(buffer.getvalue())
        if self.save_dir is not None:
            (self.save_dir / name).write_bytes(buffer.getvalue())
        self._images[image_id] = (path, name)
        while len(self._images) > self.limits.max_images:
            _, (dropped, _) = self._images.popitem(last=False)
            dropped.unlink(missing_ok=True)

    def image_file(self, image_id: str) -> tuple[Path, str]:
        """An edited PNG's file and the name it downloads as; 404 when it is not kept."""
        found = self._images.get(image_id)
        if found is None or not found[0].is_file():
            raise ApiError(404, f"no image {image_id!r} here (unknown, or dropped as the oldest of "
                                f"{self.limits.max_images} kept)")  # fmt: skip
        return found


def read_upload(folder: Path, data: bytes, name: str, work_pixels: int) -> Any:
    """An uploaded photo read as `icd edit` reads a file (`icdcli.images.load_image`: any mode, EXIF rotation, size
    bounds); 400 with the reason when it is no usable image."""
    with as_file(folder, data) as path:
        try:
            return parts.load_image(path, work_pixels)
        except parts.ICDError as error:
            raise ApiError(400, str(error).replace(str(path), f"image {name!r}")) from None


def read_mask(folder: Path, data: bytes, size: tuple[int, int]) -> Any:
    """An edit's mask read as `icd edit --mask` reads a file (`icdcli.io.images.load_mask`), at the photo's size;
    400 when it is no usable image, 422 when it does not fit the photo."""
    with as_file(folder, data) as path:
        try:
            return parts.load_mask(path, size)
        except parts.ICDError as error:
            message = str(error).replace(f"{path}: ", "mask: ")
            raise ApiError(422 if "the mask is" in message else 400, message) from None


@contextlib.contextmanager
def as_file(folder: Path, data: bytes) -> Iterator[Path]:
    """`data` as a file in `folder`'s uploads while the block runs (images are read from files)."""
    uploads = folder / "uploads"
    uploads.mkdir(exist_ok=True)
    path = uploads / secrets.token_hex(8)
    path.write_bytes(data)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def download_name(image_id: str, record: dict[str, Any]) -> str:
    """The file name a result downloads as: its target prompt's first words and its id."""
    words = "".join(c if c.isascii() and c.isalnum() else "-" for c in str(record.get("tgt", "")).lower())
    slug = "-".join(part for part in words.split("-") if part)[:48].strip("-") or "edit"
    return f"{slug}-{image_id}.png"


def _is_pipeline(value: Any) -> bool:
    """An `ICDEditPipeline` (callable: it edits) rather than a function that makes one."""
    return hasattr(value, "invert") and hasattr(value, "edit") and hasattr(value, "model")
