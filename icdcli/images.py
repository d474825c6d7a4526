"""Reading photos of any mode and size, fitting them to a model, and writing results atomically."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from .errors import ICDError

MAX_IMAGE_PIXELS = 100_000_000
MIN_SIDE = 16
OUTPUT_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


class ImageInputError(ICDError):
    """An input image that cannot be used."""


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited over white, 16-bit and float rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F" and array.max() <= 1.0:
            high = 1.0
        image = Image.fromarray(np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open any image as 8-bit RGB with EXIF orientation applied; ImageInputError if it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path}: no such file")
    if path.is_dir():
        raise ImageInputError(f"{path}: is a folder, not an image")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened) or opened
                image = _to_8bit_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageInputError(
            f"{path}: over {MAX_IMAGE_PIXELS // 1_000_000} megapixels, refused as a possible decompression bomb; "
            "downscale it first"
        ) from error
    except PermissionError as error:
        raise ImageInputError(f"{path}: not readable (permission denied)") from error
    except Image.UnidentifiedImageError as error:
        raise ImageInputError(f"{path}: not an image file that can be read") from error
    except (OSError, SyntaxError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageInputError(f"{path}: damaged or unreadable image ({reason})") from error
    if min(image.size) < MIN_SIDE:
        raise ImageInputError(f"{path}: {image.width}x{image.height} is too small; both sides need >= {MIN_SIDE} px")
    return image


def fit_size(width: int, height: int, native_size: int, multiple: int) -> tuple[int, int]:
    """The model's working size for a photo: about native_size**2 pixels, aspect kept, sides multiples of `multiple`."""
    scale = math.sqrt(native_size * native_size / (width * height))
    fitted_w = max(multiple, round(width * scale / multiple) * multiple)
    fitted_h = max(multiple, round(height * scale / multiple) * multiple)
    budget = native_size * native_size
    if min(fitted_w, fitted_h) == multiple and fitted_w * fitted_h > 1.25 * budget:
        # a very thin photo: the short side is at its minimum, so shorten the long side to keep the area
        long_side = max(multiple, budget // multiple // multiple * multiple)
        fitted_w, fitted_h = (long_side, multiple) if fitted_w > fitted_h else (multiple, long_side)
    return fitted_w, fitted_h


def image_to_tensor(image: Image.Image, size: tuple[int, int]):
    """RGB image -> float tensor (1, 3, H, W) in [-1, 1] at `size` (width, height)."""
    import torch

    resized = image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_image(pixels, size: tuple[int, int] | None = None) -> Image.Image:
    """Tensor (1, 3, H, W) or (3, H, W) in [-1, 1] -> RGB image, resized to `size` (width, height) if given."""
    if pixels.ndim == 4:
        pixels = pixels[0]
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().byte()
    image = Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def save_image(image: Image.Image, target: str | Path, text: dict[str, str] | None = None) -> Path:
    """Write `image` atomically; PNG outputs carry `text` as tEXt chunks."""
    target = Path(target)
    fmt = OUTPUT_SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        raise ICDError(f"{target}: unsupported output type; use one of {', '.join(sorted(OUTPUT_SUFFIXES))}")
    options: dict = {}
    if fmt == "PNG" and text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        options["pnginfo"] = info
    if fmt == "JPEG":
        options["quality"] = 95
    with atomic_path(target) as temporary:
        image.save(temporary, format=fmt, **options)
    return target
