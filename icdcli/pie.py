"""PIE-Bench-format evaluation: read a benchmark folder, edit every item resumably, score the results.

The format (Ju et al., "PnP Inversion", 2023): `ROOT/mapping_file.json` is an object keyed by item id
("000000000000", ...); each value gives `image_path` (relative to `ROOT/annotation_images/`),
`original_prompt`, `editing_prompt` (the edited words in [brackets]), `editing_instruction`,
`editing_type_id` ("0".."9"), `blended_word` ("source target": the word that changes, before and
after) and `mask`, the region the edit should touch as run-length pairs (start, length) over the
row-major flattened image. Outputs go to `OUT/<method>/annotation_images/<image_path>`, the layout
the benchmark's own evaluation script reads.

Masks: PIE-Bench's images are 512x512 and its RLE runs over 512*512 pixels; here the runs are over
the image's own H*W (a 32x32 fixture stores RLE over 32*32), which is the same thing at 512. A run
that overflows the image is clipped, and the one-pixel border is always marked as edited (the
benchmark's guard against annotation errors at the edges), so background metrics never see it.

Metrics follow the benchmark's evaluation code:

- background PSNR, MSE, SSIM and LPIPS: both images multiplied by the unedited mask (1 - mask),
  then the ordinary full-image metric (the zeroed pixels count, with zero error); an item whose
  mask covers everything has none (skipped from the means);
- structure distance: the MSE between the self-similarity matrices of the last-layer attention keys
  of DINO ViT (dino_vitb8) on the two whole images, resized to a short side of 224 (long side at
  most 480) and ImageNet-normalised from their 0..255 values (the benchmark's own quirk, kept);
- CLIP score, 100 * max(cos(image, text), 0) with the editing prompt: on the whole edited image,
  and on the edited image multiplied by the mask (the edited region).

PSNR, MSE and SSIM always run. LPIPS (SqueezeNet), DINO and CLIP need network weights, taken from
local paths; without them the metric is skipped with a note.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .batch import decide, display
from .errors import ICDError
from .values import strict_json

MAPPING_FILE = "mapping_file.json"
IMAGES_FOLDER = "annotation_images"
EDIT_TYPES: dict[str, str] = {
    "0": "random",
    "1": "change object",
    "2": "add object",
    "3": "delete object",
    "4": "change attribute content",
    "5": "change attribute pose",
    "6": "change attribute color",
    "7": "change attribute material",
    "8": "change background",
    "9": "change style",
}
ITEM_FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")
METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")
# the benchmark's tables print these scaled (LPIPS x 10^3, ...); JSON keeps the raw values
SCALES: dict[str, tuple[float, str]] = {
    "structure_distance": (1e3, "structure ×10³"),
    "psnr": (1.0, "PSNR"),
    "lpips": (1e3, "LPIPS ×10³"),
    "mse": (1e4, "MSE ×10⁴"),
    "ssim": (1e2, "SSIM ×10²"),
    "clip_whole": (1.0, "CLIP whole"),
    "clip_edited": (1.0, "CLIP edited"),
}


class PieFormatError(ICDError):
    """A benchmark folder or mapping file that cannot be used."""


# --- masks ----------------------------------------------------------------------------------------


def decode_mask(encoded: Sequence[int], height: int, width: int, border: bool = True) -> np.ndarray:
    """The edited region (bool HxW) of a PIE-Bench RLE mask: (start, length) pairs over the flat image.

    A run past the end is clipped to the image; with `border` the outermost rows and columns are
    marked edited too, as the benchmark does.
    """
    if len(encoded) % 2:
        raise ValueError(f"an RLE mask has (start, length) pairs; got {len(encoded)} numbers")
    total = height * width
    flat = np.zeros(total, dtype=bool)
    for index in range(0, len(encoded), 2):
        start, length = int(encoded[index]), int(encoded[index + 1])
        if start < 0 or length < 0:
            raise ValueError(f"an RLE mask has non-negative starts and lengths; got ({start}, {length})")
        flat[start : start + min(length, max(total - start, 0))] = True
    mask = flat.reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """A boolean HxW mask as PIE-Bench RLE: [start, length, start, length, ...] of its runs of True."""
    flat = np.concatenate([[False], np.asarray(mask, dtype=bool).ravel(), [False]])
    changes = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = changes[0::2], changes[1::2]
    return [int(value) for pair in zip(starts, ends - starts, strict=True) for value in pair]


# --- the mapping file ---------------------------------------------------------------------------


def strip_brackets(prompt: str) -> str:
    """A PIE-Bench prompt without the [brackets] that mark its edited words."""
    return prompt.replace("[", "").replace("]", "")


@dataclass(frozen=True)
class PieItem:
    """One benchmark entry."""

    key: str
    image_path: str
    original_prompt: str
    editing_prompt: str
    editing_instruction: str
    editing_type_id: str
    blended_word: str
    mask: tuple[int, ...]

    @property
    def source_prompt(self) -> str:
        return strip_brackets(self.original_prompt)

    @property
    def target_prompt(self) -> str:
        return strip_brackets(self.editing_prompt)

    @property
    def blend(self) -> tuple[str, str] | None:
        """The (source, target) words for Prompt-to-Prompt's local blend, when the entry names exactly two."""
        words = self.blended_word.split()
        return (words[0], words[1]) if len(words) == 2 else None


def _item(key: str, raw: Any) -> PieItem:
    where = f"{MAPPING_FILE}: item {key}"
    if not isinstance(raw, Mapping):
        raise PieFormatError(f"{where}: must be an object with {', '.join(ITEM_FIELDS)}")
    missing = [name for name in ITEM_FIELDS if name not in raw]
    if missing:
        raise PieFormatError(f"{where}: no {missing[0]}; every item needs {', '.join(ITEM_FIELDS)}")
    for name in ("image_path", "original_prompt", "editing_prompt"):
        if not isinstance(raw[name], str) or not raw[name].strip():
            raise PieFormatError(f"{where}: {name} must be non-empty text")
    path = Path(raw["image_path"])
    if path.is_absolute() or ".." in path.parts:
        raise PieFormatError(f"{where}: image_path must be relative to {IMAGES_FOLDER}/, without '..'")
    type_id = str(raw["editing_type_id"])
    if type_id not in EDIT_TYPES:
        raise PieFormatError(f"{where}: editing_type_id must be one of 0..9, not {raw['editing_type_id']!r}")
    mask = raw["mask"]
    if not isinstance(mask, list) or len(mask) % 2 or not all(isinstance(v, int) and v >= 0 for v in mask):
        raise PieFormatError(f"{where}: mask must be a list of (start, length) pairs of non-negative integers")
    return PieItem(
        key=str(key),
        image_path=raw["image_path"],
        original_prompt=raw["original_prompt"],
        editing_prompt=raw["editing_prompt"],
        editing_instruction=str(raw.get("editing_instruction") or ""),
        editing_type_id=type_id,
        blended_word=str(raw.get("blended_word") or ""),
        mask=tuple(mask),
    )


def read_mapping(root: Path) -> list[PieItem]:
    """The items of `root/mapping_file.json`, sorted by key."""
    path = Path(root) / MAPPING_FILE
    if not path.is_file():
        raise PieFormatError(f"{display(root)}: no {MAPPING_FILE}; give --root the PIE-Bench folder that holds it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PieFormatError(f"{display(path)}: not valid UTF-8 JSON ({error}); fix or re-download it") from None
    if not isinstance(data, Mapping):
        raise PieFormatError(f"{display(path)}: must be a JSON object keyed by item id")
    return sorted((_item(key, raw) for key, raw in data.items()), key=lambda item: item.key)


def parse_types(values: Iterable[str]) -> set[str] | None:
    """`--types 0,6 --types 8` as {"0", "6", "8"}; None (every type) when none is given."""
    chosen = {part.strip() for value in values for part in value.split(",") if part.strip()}
    unknown = sorted(chosen - set(EDIT_TYPES))
    if unknown:
        raise ValueError(f"--types {unknown[0]}: editing types are 0..9 (PIE-Bench's editing_type_id)")
    return chosen or None


def select_items(items: list[PieItem], types: set[str] | None, limit: int | None) -> list[PieItem]:
    """The items of the chosen types, the first `limit` of them by key."""
    chosen = [item for item in items if types is None or item.editing_type_id in types]
    return chosen if limit is None else chosen[:limit]


def source_path(root: Path, item: PieItem) -> Path:
    return Path(root) / IMAGES_FOLDER / item.image_path


def output_path(folder: Path, item: PieItem) -> Path:
    """Where the benchmark's evaluation expects a method's result: `<method folder>/annotation_images/<image_path>`."""
    return Path(folder) / IMAGES_FOLDER / item.image_path


def method_name(sampler: str, steps: int, method: str) -> str:
    """The default name of a run's folder: icd4-swap, ddim50-swap, icd4-p2p, ..."""
    return f"{sampler}{steps}-{method}"


# --- editing, resumably ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EditPlan:
    """How every item of a run is edited (the parts of its record that do not depend on the item).

    `p2p` is the run's Prompt-to-Prompt settings (the model's recipe under the flags); each item adds
    its `blended_word` as per-prompt blend words, a missing word adding no region (as the release does).
    """

    method: str
    sampler: str
    steps: int
    guidance: float
    tau: float
    seed: int
    p2p: Any = None  # icdcli.p2p.P2PSettings for --method p2p

    def p2p_for(self, item: PieItem) -> Any:
        """The item's P2P settings; None for prompt swap."""
        if self.method != "p2p":
            return None
        words = item.blend or ((), ())
        source, target = (tuple(w.split()) if isinstance(w, str) else w for w in words)
        return replace(self.p2p, blend_source=source, blend_target=target, strict_blend=False)

    def p2p_record(self, item: PieItem) -> dict[str, Any] | None:
        """The Prompt-to-Prompt settings of an item's edit as `icd edit` records them; None for prompt swap."""
        settings = self.p2p_for(item)
        return None if settings is None else settings.to_record()


def wanted_record(base: Mapping[str, Any], item: PieItem) -> dict[str, Any]:
    """The record an output of `item` must carry: batch.parameter_record's, plus the item's id and type."""
    record = {**base, "pie": {"key": item.key, "editing_type_id": item.editing_type_id}}
    return json.loads(json.dumps(record))  # as it reads back from the file


@dataclass
class Outcome:
    """What happened to one item: 'done', 'skipped' or 'failed'."""

    key: str
    status: str
    output: str
    seconds: float | None = None
    error: str | None = None


class StopRun(ICDError):
    """A failure that ends the whole run (a full or read-only disk)."""


def _write_error(error: OSError, out: Path) -> str:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StopRun(
            f"{display(out)}: no space left on the device; free space and run again (finished outputs are kept)"
        )
    if error.errno == errno.EROFS:
        raise StopRun(f"{display(out)}: the file system is read-only; choose another --out")
    return f"{display(out)}: cannot write it ({error.strerror or error}); check the folder or choose another --out"


def recorded_seconds(record: Mapping[str, Any] | None) -> float | None:
    """The seconds of the edit (inversion + decoding) an output's record holds, if any."""
    seconds = record.get("seconds") if isinstance(record, Mapping) else None
    value = seconds.get("edit") if isinstance(seconds, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


EditFunction = Callable[[Any, PieItem, Any], Any]
"""(PIL image, item, editing.Timings) -> the edited PIL image."""
RecordFunction = Callable[[PieItem, Path, str, tuple[int, int]], dict[str, Any]]
"""(item, input path, input sha256, input size) -> the record its output must carry."""


def edit_item(
    item: PieItem, root: Path, folder: Path, record_for: RecordFunction, edit: EditFunction, overwrite: bool
) -> Outcome:
    """Edit one item into its output unless a matching output is there; failures become a failed Outcome."""
    from PIL import Image

    from .editing import Timings
    from .images import file_sha256, load_image, probe_image, read_record, save_image

    source, out = source_path(root, item), output_path(folder, item)
    try:
        size = probe_image(source)
        wanted = record_for(item, source, file_sha256(source), size)
    except ICDError as error:
        return Outcome(item.key, "failed", str(out), error=str(error))
    except OSError as error:
        return Outcome(item.key, "failed", str(out), error=f"{display(source)}: cannot be read ({error.strerror})")
    exists = os.path.lexists(out)
    existing = read_record(out) if exists and not overwrite else None
    decision = decide(exists, existing, wanted, overwrite)
    if decision.action == "skip":
        return Outcome(item.key, "skipped", str(out), seconds=recorded_seconds(existing))
    if decision.action == "refuse":
        return Outcome(item.key, "failed", str(out), error=f"{display(out)} {decision.reason}")
    timings = Timings()
    try:
        image = load_image(source)
        result = edit(image, item, timings)
    except ICDError as error:
        return Outcome(item.key, "failed", str(out), error=str(error))
    if result.size != image.size:
        result = result.resize(image.size, Image.Resampling.LANCZOS)
    seconds = sum(timings.seconds.get(stage, 0.0) for stage in ("encode", "decode"))
    record = {**wanted, "seconds": {**{k: round(v, 4) for k, v in timings.seconds.items()}, "edit": round(seconds, 4)}}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        from .outputs import image_text

        save_image(result, out, image_text(record))
    except ICDError as error:
        return Outcome(item.key, "failed", str(out), error=str(error))
    except OSError as error:
        return Outcome(item.key, "failed", str(out), error=_write_error(error, out))
    return Outcome(item.key, "done", str(out), seconds=round(seconds, 4))


# --- metrics ---------------------------------------------------------------------------------------


def _unit(image: np.ndarray):
    """uint8 HxWx3 -> float64 tensor (1, 3, H, W) in [0, 1]."""
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0).permute(2, 0, 1)[None]


def background_metrics(source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> dict[str, float | None]:
    """PSNR, MSE and SSIM of the unedited region: both uint8 images times (1 - mask), then the whole-image metric."""
    from .metrics import mse, psnr, ssim

    keep = ~np.asarray(mask, dtype=bool)
    if not keep.any():
        return {"psnr": None, "mse": None, "ssim": None}
    weight = _unit(np.repeat(keep[..., None], 3, axis=2).astype(np.uint8) * 255)
    a, b = _unit(source) * weight, _unit(edited) * weight
    return {"psnr": float(psnr(a, b)[0]), "mse": float(mse(a, b)[0]), "ssim": float(ssim(a, b)[0])}


# --- LPIPS (SqueezeNet 1.1 features, LPIPS v0.1 linear heads) -----------------------------------------

# torchvision's squeezenet1_1 `features`: a conv, then max-pools and Fire(in, squeeze, expand1x1, expand3x3)
_SQUEEZE_LAYERS: tuple[tuple[Any, ...], ...] = (
    ("conv",), ("relu",), ("pool",), ("fire", 64, 16, 64, 64), ("fire", 128, 16, 64, 64), ("pool",),
    ("fire", 128, 32, 128, 128), ("fire", 256, 32, 128, 128), ("pool",), ("fire", 256, 48, 192, 192),
    ("fire", 384, 48, 192, 192), ("fire", 384, 64, 256, 256), ("fire", 512, 64, 256, 256),
)  # fmt: skip
# LPIPS taps the features after these layer indices (its slices 1..7) with these widths
_LPIPS_TAPS = (1, 4, 7, 9, 10, 11, 12)
_LPIPS_CHANNELS = (64, 128, 256, 384, 384, 512, 512)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _lpips_network():
    """LPIPS-squeeze as a torch module with torchvision's and lpips' parameter names (features.N, linK)."""
    import torch
    from torch import nn

    class Fire(nn.Module):
        def __init__(self, inplanes: int, squeeze: int, expand1: int, expand3: int):
            super().__init__()
            self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
            self.expand1x1 = nn.Conv2d(squeeze, expand1, 1)
            self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1)

        def forward(self, x):
            x = torch.relu(self.squeeze(x))
            return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)

    def layer(spec: tuple[Any, ...]) -> nn.Module:
        if spec[0] == "conv":
            return nn.Conv2d(3, 64, 3, stride=2)
        if spec[0] == "relu":
            return nn.ReLU()
        if spec[0] == "pool":
            return nn.MaxPool2d(3, 2, ceil_mode=True)
        return Fire(*spec[1:])

    class LPIPS(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*(layer(spec) for spec in _SQUEEZE_LAYERS))
            for k, channels in enumerate(_LPIPS_CHANNELS):
                self.add_module(f"lin{k}", nn.Conv2d(channels, 1, 1, bias=False))
            self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

        def taps(self, x):
            found = []
            x = (x - self.shift) / self.scale
            for index, module in enumerate(self.features):
                x = module(x)
                if index in _LPIPS_TAPS:
                    found.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            return found

        def forward(self, a, b):
            """LPIPS distance per image of two (B, 3, H, W) batches in [-1, 1]."""
            total = 0
            for k, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b), strict=True)):
                total = total + getattr(self, f"lin{k}")((fa - fb) ** 2).mean((2, 3))
            return total[:, 0]

    return LPIPS()


def _lpips_key(key: str) -> str:
    """lpips / torchmetrics / torchvision parameter names -> this module's."""
    key = key.removeprefix("module.").removeprefix("net.")
    key = re.sub(r"^slice\d+\.(\d+)\.", r"features.\1.", key)
    key = re.sub(r"^lins\.(\d+)\.model\.1\.", r"lin\1.", key)
    return re.sub(r"^lin(\d+)\.model\.1\.", r"lin\1.", key)


def load_lpips(path: Path):
    """LPIPS-squeeze from one local file: the state dict of `lpips.LPIPS(net="squeeze")` (.pth or .safetensors)."""
    from .models import load_state_dict

    network = _lpips_network()
    if not Path(path).is_file():
        raise ICDError(f"--lpips {display(path)}: no such file; give the LPIPS-squeeze weights file")
    try:
        raw = load_state_dict(path)
    except ICDError as error:
        raise ICDError(f"--lpips {display(path)}: not a state dict of tensors ({error})") from None
    state = {_lpips_key(key): value for key, value in raw.items()}
    wanted = network.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ICDError(
            f"--lpips {display(path)}: no {missing[0]} (and {len(missing) - 1} more); give the state dict of "
            'lpips.LPIPS(net="squeeze") (see docs/pie-bench.md)'
        )
    network.load_state_dict({key: state[key] for key in wanted})
    return network.eval().requires_grad_(False)


LPIPS_MIN_SIDE = 64


def lpips_distance(network, a, b):
    """LPIPS of image batches in [-1, 1], one value per image. Images with a side under 64 px are first
    upsampled (bilinear) to 64: SqueezeNet's pooling leaves nothing of smaller ones."""
    import torch
    import torch.nn.functional as F

    side = min(a.shape[-2:])
    if side < LPIPS_MIN_SIDE:
        size = [round(d * LPIPS_MIN_SIDE / side) for d in a.shape[-2:]]
        a, b = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (a, b))
    with torch.no_grad():
        return network(a, b).reshape(-1)


def lpips_background(network, source: np.ndarray, edited: np.ndarray, mask: np.ndarray) -> float | None:
    """LPIPS of the unedited region: both images times (1 - mask), mapped to [-1, 1], as the benchmark does."""
    import torch

    keep = ~np.asarray(mask, dtype=bool)
    if not keep.any():
        return None
    weight = torch.from_numpy(keep.astype(np.float32))[None, None]
    a = _unit(source).float() * weight * 2 - 1
    b = _unit(edited).float() * weight * 2 - 1
    return float(lpips_distance(network, a, b)[0])


# --- DINO structure distance ------------------------------------------------------------------------


def _key_projection(model: Any, layer: int):
    """The attention-key Linear of transformer block `layer` of a transformers ViTModel (4.x or 5.x names)."""
    blocks = getattr(model, "layers", None)
    if blocks is None and hasattr(model, "encoder"):
        blocks = model.encoder.layer
    if blocks is None:
        raise ICDError("--dino: not a ViT model (no transformer blocks found); give a transformers ViTModel folder")
    attention = blocks[layer].attention
    for path in ("k_proj", "attention.key", "key"):
        module = attention
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return module
    raise ICDError("--dino: cannot find the attention keys of the ViT; give a transformers ViTModel folder")


def pie_resize(pixels, short: int = 224, max_long: int = 480):
    """torchvision Resize(short, max_size=max_long) on a (1, 3, H, W) tensor: bilinear, antialiased."""
    import torch.nn.functional as F

    height, width = pixels.shape[-2:]
    small, large = min(height, width), max(height, width)
    new_small, new_large = short, int(short * large / small)
    if new_large > max_long:
        new_small, new_large = int(max_long * small / large), max_long
    size = (new_small, new_large) if height <= width else (new_large, new_small)
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)


class StructureDistance:
    """PIE-Bench's structure distance on a DINO ViT: MSE of last-layer key self-similarities."""

    def __init__(self, model: Any):
        import torch

        self.model = model.eval().requires_grad_(False)
        self.layer = int(model.config.num_hidden_layers) - 1  # 11 for DINO ViT-S/B, as the benchmark uses
        self.mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        self.std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def self_similarity(self, image: np.ndarray):
        """Cosine similarities (T x T) of the keys of every token (CLS first) of one uint8 HxWx3 image."""
        import torch

        # the benchmark normalises the 0..255 values with ImageNet's statistics for [0, 1]: kept as it is
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        pixels = (pie_resize(pixels) - self.mean) / self.std
        captured: list[torch.Tensor] = []
        hook = _key_projection(self.model, self.layer).register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            with torch.no_grad():
                self.model(pixel_values=pixels, interpolate_pos_encoding=True)
        finally:
            hook.remove()
        keys = captured[0][0].float()
        unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return unit @ unit.T

    def __call__(self, source: np.ndarray, edited: np.ndarray) -> float:
        import torch.nn.functional as F

        return float(F.mse_loss(self.self_similarity(edited), self.self_similarity(source)))


def load_dino(path: Path) -> StructureDistance:
    """A local transformers ViTModel folder (facebook/dino-vitb8 for the benchmark's numbers)."""
    from transformers import ViTModel

    try:
        model = ViTModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
    except Exception as error:
        raise ICDError(
            f"--dino {display(path)}: not a transformers ViT folder ({str(error).splitlines()[0]})"
        ) from None
    return StructureDistance(model)


# --- CLIP score ------------------------------------------------------------------------------------------


class ClipScore:
    """torchmetrics' CLIPScore: 100 * max(cos(image embedding, text embedding), 0)."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    def __call__(self, image: np.ndarray, text: str) -> float:
        import torch

        pixels = self.processor(images=[np.asarray(image, dtype=np.uint8)], return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer([text], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.no_grad():
            out = self.model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels
            )
        image_embed = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text_embed = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return max(100.0 * float((image_embed * text_embed).sum()), 0.0)


def load_clip(path: Path) -> ClipScore:
    """A local transformers CLIP folder (openai/clip-vit-large-patch14 for the benchmark's numbers)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise ICDError(
            f"--clip {display(path)}: not a transformers CLIP folder ({str(error).splitlines()[0]})"
        ) from None
    return ClipScore(model, tokenizer, processor)


# --- scoring a run ------------------------------------------------------------------------------------------


@dataclass
class Scorers:
    """The optional network metrics that could be loaded, and why the others are skipped."""

    lpips: Any = None
    dino: StructureDistance | None = None
    clip: ClipScore | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def load_scorers(lpips: Path | None, dino: Path | None, clip: Path | None) -> Scorers:
    """Load what was given; note what was not (PSNR, MSE and SSIM need nothing)."""
    scorers = Scorers()
    if lpips is None:
        scorers.skipped["lpips"] = "no --lpips weights given (the state dict of lpips.LPIPS(net='squeeze'))"
    else:
        scorers.lpips = load_lpips(lpips)
    if dino is None:
        scorers.skipped["structure_distance"] = "no --dino model given (a local copy of facebook/dino-vitb8)"
    else:
        scorers.dino = load_dino(dino)
    if clip is None:
        reason = "no --clip model given (a local copy of openai/clip-vit-large-patch14)"
        scorers.skipped["clip_whole"] = scorers.skipped["clip_edited"] = reason
    else:
        scorers.clip = load_clip(clip)
    return scorers


def _rgb(path: Path) -> np.ndarray:
    from .images import load_image

    return np.asarray(load_image(path), dtype=np.uint8)


def score_item(item: PieItem, root: Path, folder: Path, scorers: Scorers) -> dict[str, Any]:
    """Every metric of one item's output against its source; an `error` instead when it cannot be scored."""
    from .images import read_record

    out = output_path(folder, item)
    row: dict[str, Any] = {"key": item.key, "editing_type_id": item.editing_type_id}
    try:
        source, edited = _rgb(source_path(root, item)), _rgb(out)
    except ICDError as error:
        return {**row, "error": str(error)}
    if source.shape != edited.shape:
        sizes = f"{edited.shape[1]}x{edited.shape[0]}, its source {source.shape[1]}x{source.shape[0]}"
        return {**row, "error": f"{display(out)}: {sizes}; outputs must keep their source's size"}
    mask = decode_mask(item.mask, source.shape[0], source.shape[1])
    row.update(background_metrics(source, edited, mask))
    if scorers.lpips is not None:
        row["lpips"] = lpips_background(scorers.lpips, source, edited, mask)
    if scorers.dino is not None:
        row["structure_distance"] = scorers.dino(source, edited)
    if scorers.clip is not None:
        row["clip_whole"] = scorers.clip(edited, item.target_prompt)
        region = (edited * mask[..., None]).astype(np.uint8)
        row["clip_edited"] = scorers.clip(region, item.target_prompt) if mask.any() else None
    row["seconds_per_edit"] = recorded_seconds(read_record(out))
    return row


def _mean(rows: list[dict[str, Any]], name: str) -> float | None:
    values = [row[name] for row in rows if isinstance(row.get(name), (int, float)) and not math.isnan(row[name])]
    return float(np.mean(values)) if values else None


def summarise(rows: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Means per editing type and over everything (items without a value for a metric are left out of it)."""
    scored = [row for row in rows if "error" not in row]
    columns = [*metrics, "seconds_per_edit"]

    def table(group: list[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(group), **{name: _mean(group, name) for name in columns}}

    per_type = {
        type_id: {"name": EDIT_TYPES[type_id], **table([row for row in scored if row["editing_type_id"] == type_id])}
        for type_id in sorted({row["editing_type_id"] for row in scored})
    }
    return {"overall": table(scored), "per_type": per_type}


def present_metrics(scorers: Scorers) -> list[str]:
    return [name for name in METRICS if name not in scorers.skipped]


def _cell(value: Any, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value * scale:.2f}"
    return str(value)


def markdown_tables(summary: Mapping[str, Any], metrics: Sequence[str], notes: Mapping[str, str]) -> str:
    """The overall and per-type tables (PIE-Bench's scaling in the headers), then the skipped metrics."""
    headers = [SCALES[name][1] for name in metrics] + ["s/edit"]

    def line(label: list[str], values: Mapping[str, Any]) -> str:
        cells = [_cell(values.get(name), SCALES[name][0]) for name in metrics]
        seconds = values.get("seconds_per_edit")
        return (
            "| " + " | ".join([*label, str(values["n"]), *cells, "-" if seconds is None else f"{seconds:.3f}"]) + " |"
        )

    overall = ["| items | " + " | ".join(headers) + " |", "|" + "---|" * (len(headers) + 1)]
    overall.append(line([], summary["overall"]))
    per_type = ["| type | edit | items | " + " | ".join(headers) + " |", "|" + "---|" * (len(headers) + 3)]
    per_type += [line([type_id, values["name"]], values) for type_id, values in summary["per_type"].items()]
    text = "\n".join(overall) + "\n\n" + "\n".join(per_type)
    by_reason: dict[str, list[str]] = {}
    for name, reason in notes.items():
        by_reason.setdefault(reason, []).append(name)
    if by_reason:
        text += "\n\n" + "\n".join(f"skipped {', '.join(names)}: {reason}" for reason, names in by_reason.items())
    return text


def write_report(folder: Path, report: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    """`metrics.json` and `metrics.md` in the run's folder, each written atomically."""
    from .atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "metrics.json", folder / "metrics.md")
    for path, text in zip(paths, (strict_json(report, indent=1), markdown + "\n"), strict=True):
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    return paths
