"""A PIE-Bench-format folder made from procedural scenes, so the benchmark runner can run end to end here.

Each item is a held-out scene (one shape on a background) and one edit of it, mapped onto the
benchmark's editing types:

- 1 "change object": the shape becomes another shape (circle -> square), the object's identity;
- 6 "change attribute color": the shape's colour changes;
- 8 "change background": the background colour changes;
- 0 "random": one of the three above, drawn at random, as the benchmark's random set mixes edit kinds.

Items cycle through 0, 1, 6, 8. Types 2-5, 7 and 9 (add, delete, content, pose, material, style) have no
counterpart in a one-shape scene language and are not produced. The mask is the region the edit
changes (pixels whose rendered colour differs between source and target), RLE-encoded over the
image's own H*W; prompts bracket the changed word and `blended_word` names it before and after.

    python -m icdcli.bench.pie_fixture OUT --count 100
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from icdcli.io.atomic import atomic_path
from icdcli.pie.dataset import EDIT_TYPES, IMAGES_FOLDER, MAPPING_FILE, encode_mask
from icdcli.training.scenes import EDIT_KINDS, Scene, change_mask, edit_scene, scene_at, split_rng

SPLIT = "heldout"
TYPE_CYCLE = ("0", "1", "6", "8")
KIND_OF_TYPE = {"1": "shape", "6": "colour", "8": "background"}
FIRST_INDEX = 50_000
"""Scenes from this index of the held-out stream on: clear of the indices the other benches draw."""
EDIT_STREAM = 10_000_000
"""Each item's edit draws from held-out stream EDIT_STREAM + index, so item i is the same whatever the count."""


def edit_kind(type_id: str, rng: np.random.Generator) -> str:
    """The scene edit of an editing type; "0" (random) draws one."""
    return KIND_OF_TYPE.get(type_id) or EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]


def _words(scene: Scene) -> list[str]:
    return scene.caption().split()


def bracketed(source: Scene, target: Scene) -> str:
    """The target caption with the words that differ from the source's in [brackets]."""
    return " ".join(f"[{b}]" if a != b else b for a, b in zip(_words(source), _words(target), strict=True))


def entry(key: str, image_path: str, *, source: Scene, target: Scene, kind: str, type_id: str, size: int) -> dict:
    """One mapping-file value for an edit of `source` into `target`."""
    if kind == "background":
        instruction, blended = f"Change the background to {target.background}", "background background"
    elif kind == "colour":
        instruction, blended = f"Make the {source.shape} {target.colour}", f"{source.shape} {target.shape}"
    else:
        instruction, blended = f"Turn the {source.shape} into a {target.shape}", f"{source.shape} {target.shape}"
    return {
        "image_path": image_path,
        "original_prompt": source.caption(),
        "editing_prompt": bracketed(source, target),
        "editing_instruction": instruction,
        "editing_type_id": type_id,
        "blended_word": blended,
        "mask": encode_mask(change_mask(source, target, size=size)),
    }


def mapping_text(mapping: dict[str, Any]) -> str:
    """The mapping as JSON with one item per line."""
    lines = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in mapping.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_fixture(root: Path, count: int, *, seed: int = 0, size: int = 32) -> dict[str, Any]:
    """Write `count` items (images and mapping file) under `root`; returns the mapping."""
    root = Path(root)
    mapping: dict[str, Any] = {}
    for index in range(count):
        type_id = TYPE_CYCLE[index % len(TYPE_CYCLE)]
        rng = split_rng(SPLIT, EDIT_STREAM + index, seed=seed)
        source = scene_at(SPLIT, FIRST_INDEX + index, seed=seed)
        kind = edit_kind(type_id, rng)
        target = edit_scene(source, kind, rng)
        key = f"{type_id}{index:011d}"
        image_path = f"{type_id}_{EDIT_TYPES[type_id].replace(' ', '_')}/{key}.png"
        path = root / IMAGES_FOLDER / image_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            Image.fromarray(source.render(size)).save(temporary, format="PNG")
        mapping[key] = entry(key, image_path, source=source, target=target, kind=kind, type_id=type_id, size=size)
    with atomic_path(root / MAPPING_FILE) as temporary:
        temporary.write_text(mapping_text(mapping), encoding="utf-8")
    return mapping


def target_scene(source: Scene, target_prompt: str) -> tuple[Scene, str]:
    """The scene an item's target prompt describes, and the attribute (an edit kind) that differs from `source`."""
    words = target_prompt.split()  # "a {colour} {shape} on a {background} background"
    target = replace(source, colour=words[1], shape=words[2], background=words[5])
    kind = next(kind for kind in EDIT_KINDS if getattr(source, kind) != getattr(target, kind))
    return target, kind


def fixture_accuracy(root: Path, folder: Path, *, seed: int = 0) -> dict[str, Any]:
    """Edit success on a fixture, which PIE-Bench scores with CLIP: does the output show the target's attribute?

    Each output is matched to every rendering of its target scene with the edited attribute varied
    (`icdcli.bench.scenes.classify`); accuracy is the share of outputs closest to the right one, per type
    and overall. Only fixture folders written by `write_fixture` have the scenes this needs.
    """
    from icdcli.bench.scenes import classify
    from icdcli.pie.dataset import output_path, read_mapping

    hits: dict[str, list[bool]] = {}
    for item in read_mapping(root):
        out = output_path(folder, item)
        if not out.is_file():
            continue
        source = scene_at(SPLIT, FIRST_INDEX + int(item.key[1:]), seed=seed)
        target, kind = target_scene(source, item.target_prompt)
        image = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
        hits.setdefault(item.editing_type_id, []).append(classify(image, target, kind) == getattr(target, kind))
    everything = [hit for values in hits.values() for hit in values]
    per_type = {type_id: {"n": len(v), "accuracy": float(np.mean(v))} for type_id, v in sorted(hits.items())}
    overall = {"n": len(everything), "accuracy": float(np.mean(everything)) if everything else None}
    return {"overall": overall, "per_type": per_type}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a PIE-Bench-format folder of procedural scene edits.")
    parser.add_argument("root", type=Path, help="folder to write (mapping_file.json and annotation_images/)")
    parser.add_argument("--count", type=int, default=100, help="items (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes (default 0)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32, the model's)")
    parser.add_argument(
        "--accuracy",
        type=Path,
        metavar="RUN",
        help="instead of writing: print the edit accuracy (JSON) of the outputs in RUN (OUT/NAME of icd bench pie)",
    )
    args = parser.parse_args(argv)
    if args.accuracy is not None:
        print(json.dumps(fixture_accuracy(args.root, args.accuracy, seed=args.seed)))
        return
    if args.count < 1 or args.size < 16:
        parser.error("--count must be >= 1 and --size >= 16")
    write_fixture(args.root, args.count, seed=args.seed, size=args.size)
    print(f"wrote {args.count} items to {args.root}")


if __name__ == "__main__":
    main()
