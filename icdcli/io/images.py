"""Reading photos of any mode and size, fitting them to a model, and writing results atomically."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from icdcli.core.digests import file_sha256 as file_sha256  # where the commands look for it
from icdcli.core.errors import ICDError
from icdcli.io.atomic import atomic_path

MAX_IMAGE_PIXELS = 100_000_000
MIN_SIDE = 16
# decode a JPEG at 1/2, 1/4 or 1/8 scale when it holds over this many times the pixels the model works at
DRAFT_FACTOR = 4
ORIGINAL_SIZE = "icd_original_size"
OUTPUT_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
ORIENTATION_TAG = 0x0112  # EXIF's orientation
DEFAULT_QUALITY = {"JPEG": 95, "WEBP": 90}
"""The quality of lossy outputs unless one is asked for (`--quality`): past what an edit of a photo can show."""
XMP_RECORD = re.compile(r"<icd:record>(.*?)</icd:record>", re.DOTALL)


class ImageInputError(ICDError):
    """An input image that cannot be used."""


HEIF_SUFFIXES = frozenset({".heic", ".heif", ".hif"})
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
"""ISO base media `ftyp` brands of HEIF images (an iPhone's photos): Pillow reads them with pillow-heif."""
HEIF_INSTALL = 'pip install "icd[heif]" (pillow-heif)'


def _is_heif(path: Path) -> bool:
    """Whether a file is a HEIF/HEIC image, by its name or (for a file without one, an upload) its header."""
    if path.suffix.lower() in HEIF_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS


@functools.cache
def _heif_opener() -> bool:
    """Teach Pillow HEIF once, when pillow-heif is installed; whether it could."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited over white, 16-bit and float rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        peak = float(np.nanmax(array)) if array.size and not np.isnan(array).all() else 0.0
        high = 65535.0 if image.mode.startswith("I;16") or peak > 255 else 255.0
        if image.mode == "F" and peak <= 1.0:
            high = 1.0
        array = np.nan_to_num(array, nan=0.0, posinf=high, neginf=0.0)
        array *= 255.0 / high
        array += 0.5
        image = Image.fromarray(np.clip(array, 0, 255, out=array).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _is_srgb(profile: Any) -> bool:
    """Whether an ICC profile is sRGB by its name (IEC61966-2.1 and its variants): its pixels are used as they are."""
    from PIL import ImageCms

    return "srgb" in ImageCms.getProfileDescription(profile).lower()


@functools.cache
def _srgb_profile() -> Any:
    """littlecms' sRGB, made once."""
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def to_srgb(image: Image.Image, label: str = "the image") -> Image.Image:
    """`image` with its embedded ICC colour profile (Display P3, Adobe RGB, a CMYK press profile...) converted to
    sRGB, the space the models were trained in: read as raw numbers, a wide-gamut photo comes back desaturated.
    A HEIF photo's `nclx` colour box (primaries and transfer by code point, no profile) is converted the same way.
    An image without a profile or with an sRGB one is returned as it is; an unreadable profile is noted and ignored.
    """
    icc = image.info.get("icc_profile")
    modes = {"RGB": ("RGB ", "RGB"), "RGBA": ("RGB ", "RGBA"), "CMYK": ("CMYK", "RGB"), "L": ("GRAY", "RGB")}
    if not icc and isinstance(image.info.get("nclx_profile"), dict):
        return _nclx_to_srgb(image, label)
    if not icc or image.mode not in modes:
        return image
    from PIL import ImageCms

    space, output_mode = modes[image.mode]
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if _is_srgb(profile):
            return image
        if profile.profile.xcolor_space != space:
            raise ValueError(f"a {profile.profile.xcolor_space.strip()} profile on {image.mode} pixels")
        converted = ImageCms.profileToProfile(image, profile, _srgb_profile(), outputMode=output_mode)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as error:
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        logging.getLogger("icd").warning("%s: its colour profile cannot be used (%s); its pixels are taken as sRGB",
                                         label, reason)  # fmt: skip
        return image
    assert converted is not None
    converted.info = {key: value for key, value in image.info.items() if key != "icc_profile"}
    return converted


def _nclx_to_srgb(image: Image.Image, label: str) -> Image.Image:
    """`to_srgb` for a photo whose colour space is stated by an `nclx` box (`icdcli.io.nclx`), not a profile."""
    from icdcli.io.nclx import nclx_problem, nclx_to_srgb, needs_conversion

    nclx = image.info["nclx_profile"]
    if image.mode not in ("RGB", "RGBA") or not needs_conversion(nclx):
        return image
    problem = nclx_problem(nclx)
    if problem is not None:
        logging.getLogger("icd").warning("%s: %s; its pixels are taken as sRGB", label, problem)
        return image
    pixels = np.asarray(image)
    converted = np.concatenate([nclx_to_srgb(pixels[..., :3], nclx), pixels[..., 3:]], axis=-1)
    result = Image.fromarray(np.ascontiguousarray(converted), image.mode)
    result.info = {key: value for key, value in image.info.items() if key != "nclx_profile"}
    return result


def photo_rgb(image: Image.Image, label: str = "the image") -> Image.Image:
    """Any PIL image as the 8-bit sRGB the models take: its colour profile applied, transparency over white."""
    return _to_8bit_rgb(to_srgb(image, label))


def _draft_scale(opened: Image.Image, work_pixels: int | None) -> float:
    """How far below full size a JPEG may be decoded and still hold twice the model's working sides."""
    if work_pixels is None or opened.format != "JPEG":
        return 1.0
    pixels = opened.width * opened.height
    if pixels <= DRAFT_FACTOR * work_pixels:
        return 1.0
    return min(1.0, 2.0 * math.sqrt(work_pixels / pixels))


def _open_decoded(path: Path, work_pixels: int | None) -> Image.Image:
    with Image.open(path) as opened:
        full_size = opened.size
        turned = opened.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)  # orientations that swap the sides
        scale = _draft_scale(opened, work_pixels)
        if scale < 1.0:  # the JPEG decoder skips the detail the model would throw away
            width, height = (min(side, max(math.ceil(side * scale), 4 * MIN_SIDE)) for side in full_size)
            wanted = (width, height)
            opened.draft("RGB", wanted)
        frames = getattr(opened, "n_frames", 1)
        if frames > 1:
            logging.getLogger("icd").warning("%s: animated (%d frames); its first frame is used", path, frames)
        opened.load()
        reduced = opened.size != full_size
        image = ImageOps.exif_transpose(opened) or opened
        image = photo_rgb(image, str(path))
    if reduced:
        image.info[ORIGINAL_SIZE] = (full_size[1], full_size[0]) if turned else full_size
    return image


def _missing(path: Path) -> str:
    """Why a path that does not exist as a file is missing: no such file, a dangling link, or a link loop."""
    import errno
    import os

    if not os.path.islink(path):
        return f"{path}: no such file"
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"{path}: a symbolic link that loops back on itself; point it at an image"
        if error.errno == errno.EACCES:
            return f"{path}: a symbolic link into a folder that cannot be read (permission denied)"
    return f"{path}: a symbolic link to {os.readlink(path)}, which does not exist"


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn whatever reading `path` raises into an ImageInputError that says what is wrong."""
    if not path.exists():
        raise ImageInputError(_missing(path))
    if path.is_dir():
        raise ImageInputError(f"{path}: is a folder, not an image")
    if not path.is_file():  # a FIFO, socket or device: opening it may block or never end
        raise ImageInputError(f"{path}: not a regular file (a pipe, socket or device); give an image file")
    if _is_heif(path) and not _heif_opener():
        raise ImageInputError(f"{path}: a HEIF (HEIC) photo; reading it needs pillow-heif: {HEIF_INSTALL}")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # decoders warn about damaged metadata they skip: not the user's concern
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageInputError:  # already says what is wrong (a mask that does not fit its photo, say)
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageInputError(
            f"{path}: over {MAX_IMAGE_PIXELS // 1_000_000} megapixels, refused as a possible decompression bomb; "
            "downscale it first"
        ) from error
    except PermissionError as error:
        raise ImageInputError(f"{path}: not readable (permission denied); check its permissions") from error
    except Image.UnidentifiedImageError as error:
        raise ImageInputError(f"{path}: not an image file that can be read") from error
    except MemoryError as error:
        raise ImageInputError(f"{path}: too large to decode in the memory available; downscale it first") from error
    except Exception as error:  # decoders of malformed files raise many types (OSError, SyntaxError, struct.error...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ImageInputError(f"{path}: damaged or unreadable image ({reason[:200]})") from error


def _check_sides(path: Path, size: tuple[int, int]) -> None:
    if min(size) < MIN_SIDE:
        raise ImageInputError(f"{path}: {size[0]}x{size[1]} is too small; both sides need >= {MIN_SIDE} px")


def probe_image(path: str | Path) -> tuple[int, int]:
    """The size an image file declares, from its header alone; ImageInputError when it is not a usable image."""
    path = Path(path)
    with _reading(path), Image.open(path) as opened:
        size = opened.size
    _check_sides(path, size)
    return size


def load_image(path: str | Path, work_pixels: int | None = None) -> Image.Image:
    """Open any image as 8-bit RGB with EXIF orientation applied; ImageInputError if it cannot be used.

    With `work_pixels` (the pixels the model works at), a JPEG far larger than that is decoded at
    a reduced scale, so memory stays bounded; `original_size` tells the size it had.
    """
    path = Path(path)
    with _reading(path):
        image = _open_decoded(path, work_pixels)
    _check_sides(path, original_size(image))
    return image


MASK_ASPECT_TOLERANCE = 0.02
"""How far a mask's aspect ratio may differ from its photo's (a mask saved at another resolution is resized)."""


def load_mask(path: str | Path, photo_size: tuple[int, int], *, photo: str | Path | None = None) -> Image.Image:
    """A mask file as 8-bit grey at `photo_size` (the photo's width, height), EXIF rotation applied: see
    `photo_mask`; `photo` names the photo in the errors."""
    path = Path(path)
    with _reading(path), Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened) or opened
        _check_sides(path, image.size)
        return photo_mask(image, photo_size, label=str(path), photo=None if photo is None else str(photo))


def photo_mask(image: Image.Image, photo_size: tuple[int, int], *, label: str = "the mask",
               photo: str | None = None) -> Image.Image:  # fmt: skip
    """A mask image as 8-bit grey at `photo_size`: white where the edit may change the photo, black where it must
    not, grey partly; transparent parts count as black. A mask of another aspect ratio than the photo's (beyond
    `MASK_ASPECT_TOLERANCE`), or black all over, is an ImageInputError."""
    if image.mode in ("P", "PA") or "A" in image.mode:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    mask = _to_8bit_rgb(image).convert("L")
    width, height = mask.size
    photo_width, photo_height = photo_size
    if abs((width / height) / (photo_width / photo_height) - 1.0) > MASK_ASPECT_TOLERANCE:
        of = f" ({photo})" if photo is not None else ""
        raise ImageInputError(
            f"{label}: the mask is {width}x{height}, the photo{of} {photo_width}x{photo_height}; give a mask of the "
            "photo's shape (white where it may change, black where it stays)"
        )
    if mask.getextrema()[1] == 0:
        raise ImageInputError(f"{label}: the mask is black all over, so nothing may change; paint white where the "
                              "photo may change")  # fmt: skip
    return mask if mask.size == photo_size else mask.resize(photo_size, Image.Resampling.BILINEAR)


def original_size(image: Image.Image) -> tuple[int, int]:
    """The size the image file had (larger than `image.size` when it was decoded at reduced scale)."""
    width, height = image.info.get(ORIGINAL_SIZE, image.size)
    return int(width), int(height)


def read_record(path: str | Path, key: str = "icd") -> dict | None:
    """The JSON parameter record an output of icd carries (PNG text chunk `key`, JPEG comment, WebP XMP); None if
    none."""
    if not Path(path).is_file():  # a FIFO or device would block or never end
        return None
    try:
        with Image.open(path) as opened:
            text = opened.info.get(key)
            if text is None and opened.format == "PNG":
                text = getattr(opened, "text", {}).get(key)
            if text is None and opened.format == "JPEG" and isinstance(opened.info.get("comment"), bytes):
                text = opened.info["comment"].decode("utf-8", "replace")
            if text is None and opened.format == "WEBP":
                text = _xmp_record(opened.info.get("xmp"))
    except Exception:  # anything unreadable simply has no record
        return None
    try:
        record = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def fit_size(width: int, height: int, *, native_size: int, multiple: int) -> tuple[int, int]:
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
    (image,) = tensors_to_images(pixels[:1] if pixels.ndim == 4 else pixels[None], [size])
    if isinstance(image, ICDError):
        raise image
    return image


def tensors_to_images(pixels, sizes: list[tuple[int, int] | None]) -> list[Image.Image | ICDError]:
    """Tensor (B, 3, H, W) in [-1, 1] -> one RGB image per row, resized to its size (width, height) if given, or an
    ICDError for a row that holds non-finite values. One conversion for the whole batch, then one image per row."""
    # in NumPy, in float32 as torch would: small torch ops wake torch's thread pool, which waits for cores that the
    # backend's threads hold (~10 ms a batch on 2 CPUs); rint rounds half to even, as torch.round does
    values = pixels.detach().float().cpu().numpy()
    finite = np.isfinite(values).reshape(len(values), -1).all(1).tolist()
    levels = np.rint((np.clip(values, -1.0, 1.0) + np.float32(1.0)) * np.float32(127.5))
    with np.errstate(invalid="ignore"):  # a non-finite row becomes an error below, not an image
        arrays = np.ascontiguousarray(levels.astype(np.uint8).transpose(0, 2, 3, 1))
    images: list[Image.Image | ICDError] = []
    for array, is_finite, size in zip(arrays, finite, sizes, strict=True):
        if not is_finite:
            images.append(ICDError("the result holds non-finite values (NaN or infinity): nothing was written; "
                                   "lower --guidance or --amplify"))  # fmt: skip
            continue
        image = Image.fromarray(array, "RGB")
        if size is not None and image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        images.append(image)
    return images


SIDE_LIMITS = {"WEBP": 16383, "JPEG": 65500}
"""The longest side each lossy output format can hold (libwebp's; libjpeg-turbo's)."""


def format_problem(size: tuple[int, int], target: Path) -> str | None:
    """Why an image of `size` (width, height) cannot be written as `target`'s format, or None."""
    fmt = OUTPUT_SUFFIXES.get(target.suffix.lower())
    limit = SIDE_LIMITS.get(fmt or "")
    if limit is None or max(size) <= limit:
        return None
    return (
        f"{size[0]}x{size[1]} pixels cannot be written as {fmt} (at most {limit:,} pixels a side); write a PNG "
        "(--format png, or -o NAME.png)"
    )


def save_image(
    image: Image.Image,
    target: str | Path,
    *,
    text: dict[str, str] | None = None,
    exif: bytes | None = None,
    quality: int | None = None,
) -> Path:
    """Write `image` atomically and return the path; PNG outputs carry `text` as tEXt chunks, JPEGs a single
    entry as their comment, WebPs the `icd` entry in their XMP.

    Args:
        image: The image to write.
        target: The output path; its suffix picks the format.
        text: Metadata to embed (e.g. the `icd` record).
        exif: EXIF to embed (`input_exif`), in any of the formats.
        quality: JPEG or WebP quality, 1-100 (PNG is lossless: not used); None: `DEFAULT_QUALITY`.
    """
    target = Path(target)
    fmt = OUTPUT_SUFFIXES.get(target.suffix.lower())
    if fmt is None:
        raise ICDError(f"{target}: unsupported output type; use one of {', '.join(sorted(OUTPUT_SUFFIXES))}")
    problem = format_problem(image.size, target)
    if problem is not None:
        raise ICDError(f"{target}: {problem}")
    options = _save_options(fmt, text, quality)
    if exif:
        options["exif"] = exif
    with atomic_path(target) as temporary:
        image.save(temporary, format=fmt, **options)
    return target


def input_exif(path: str | Path) -> bytes | None:
    """The EXIF of an image file (camera, lens, date, GPS...) to copy into its edit, its orientation set upright (the
    pixels icd reads are already turned); None when it has none or it cannot be read."""
    try:
        with warnings.catch_warnings(), Image.open(path) as opened:
            warnings.simplefilter("ignore")
            exif = opened.getexif()
            if not exif:
                return None
            if ORIENTATION_TAG in exif:
                exif[ORIENTATION_TAG] = 1
            return exif.tobytes()
    except Exception:  # damaged EXIF (decoders raise many types): the edit goes on without it
        logging.getLogger("icd").warning("%s: its EXIF cannot be read; the output goes without it", path)
        return None


def png_bytes(image: Image.Image, *, text: dict[str, str] | None = None) -> bytes:
    """`image` as the PNG `save_image` writes (its `text` as tEXt chunks), in memory: for stdout."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **_save_options("PNG", text))
    return buffer.getvalue()


def _save_options(fmt: str, text: dict[str, str] | None, quality: int | None = None) -> dict[str, Any]:
    """PIL's save options for `fmt`: PNGs carry `text` as tEXt chunks, JPEGs a single entry as their comment, WebPs
    the `icd` entry (else the first) in an XMP packet; JPEG and WebP at `quality` (None: `DEFAULT_QUALITY`)."""
    options: dict[str, Any] = {}
    if fmt == "PNG" and text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        options["pnginfo"] = info
    if fmt in DEFAULT_QUALITY:
        options["quality"] = DEFAULT_QUALITY[fmt] if quality is None else quality
    if fmt == "JPEG" and text:  # a JPEG has one comment: icd's record travels there
        options["comment"] = text.get("icd", next(iter(text.values()))).encode()
    if fmt == "WEBP" and text:
        options["xmp"] = _record_xmp(text.get("icd", next(iter(text.values()))))
    return options


def _record_xmp(record: str) -> bytes:
    """An XMP packet that holds icd's JSON record as the text of its `icd:record` property."""
    from xml.sax.saxutils import escape

    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:icd="urn:icd:record:1/">'
        f"<icd:record>{escape(record)}</icd:record></rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()


def _xmp_record(xmp: Any) -> str | None:
    """The record `_record_xmp` put in an XMP packet (found by pattern, never parsed as XML), or None."""
    from xml.sax.saxutils import unescape

    if isinstance(xmp, bytes):
        xmp = xmp.decode("utf-8", "replace")
    found = XMP_RECORD.search(xmp) if isinstance(xmp, str) else None
    return None if found is None else unescape(found.group(1))
