"""The PIE-Bench folder: its mapping file, items and RLE masks, and where a run's outputs go.

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
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icdcli.core.errors import ICDError
from icdcli.core.texts import TextError, check_text
from icdcli.run.batch import display

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


class PieFormatError(ICDError):
    """A benchmark folder or mapping file that cannot be used."""


# --- masks ----------------------------------------------------------------------------------------


def decode_mask(encoded: Sequence[int], height: int, width: int, *, border: bool = True) -> np.ndarray:
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


def parse_item(key: str, raw: Any) -> PieItem:
    """One entry of the mapping file, checked; PieFormatError naming the item and field otherwise."""
    where = f"{MAPPING_FILE}: item {key}"
    if not isinstance(raw, Mapping):
        raise PieFormatError(f"{where}: must be an object with {', '.join(ITEM_FIELDS)}")
    missing = [name for name in ITEM_FIELDS if name not in raw]
    if missing:
        raise PieFormatError(f"{where}: no {missing[0]}; every item needs {', '.join(ITEM_FIELDS)}")
    for name in ("image_path", "original_prompt", "editing_prompt"):
        if not isinstance(raw[name], str) or not raw[name].strip():
            raise PieFormatError(f"{where}: {name} must be non-empty text")
    _check_texts(where, raw)
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


def _check_texts(where: str, raw: Mapping[str, Any]) -> None:
    """An item's prompts, blend words and image path held to icd's text bounds (`icdcli.core.texts`), as every prompt a
    user gives is: a PieFormatError naming the item and field otherwise."""
    fields = (("image_path", "path"), ("original_prompt", "prompt"), ("editing_prompt", "prompt"),
              ("blended_word", "word"))  # fmt: skip
    for name, kind in fields:
        value = raw.get(name)
        if value is None:
            continue
        try:
            check_text(kind, value if isinstance(value, str) else str(value), name)
        except TextError as error:
            raise PieFormatError(f"{where}: {error}") from None


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
    return sorted((parse_item(key, raw) for key, raw in data.items()), key=lambda item: item.key)


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
