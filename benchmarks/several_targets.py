"""Several targets of one photo: seconds per edit when each photo takes K targets (its inversion made once and
reused) against the same number of edits of as many different photos (an inversion each), through `icd edit`.

    python benchmarks/several_targets.py                            # the embedded model, PyTorch on the CPU
    python benchmarks/several_targets.py --backend onnxruntime --photos 8 --targets 4 --json
    python benchmarks/several_targets.py --side 512 --photos 2 --targets 3 --repeats 1 \
        --icd-args "--base B --teacher T --forward-lora F --reverse-lora R"   # an SD1.5-size model

Both runs edit N*K items of the same size with the same method from a spec, one process each, the model loaded
before the clock starts (`seconds - load_seconds` of the run's summary); each figure is the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from icdcli.bench.scenes import edit_pairs


def _distinct_scenes(count: int, side: int) -> list[tuple[Image.Image, str, str]]:
    """`count` scenes with different pixels, each with a target caption."""
    found: dict[str, tuple[Image.Image, str, str]] = {}
    for source, target, _ in edit_pairs(40 * count):
        found.setdefault(source.caption(), (Image.fromarray(source.render(side)), source.caption(), target.caption()))
        if len(found) == count:
            break
    if len(found) < count:
        raise SystemExit(f"only {len(found)} different scenes: ask for fewer photos")
    return list(found.values())


def _spec(folder: Path, rows: list[tuple[Image.Image, str, str]], name: str) -> Path:
    lines = []
    for index, (image, source, target) in enumerate(rows):
        path = folder / f"{name}-{index}.png"
        if not path.exists():
            image.save(path)
        lines.append(
            json.dumps({"image": path.name, "src": source, "tgt": target, "output": f"{name}-out/{index}.png"})
        )
    spec = folder / f"{name}.jsonl"
    spec.write_text("\n".join(lines) + "\n")
    return spec


def _seconds(spec: Path, method: str, backend: str, extra: list[str]) -> float:
    """Seconds per edit of one `icd edit --spec` run, the model's loading left out."""
    command = [sys.executable, "-m", "icdcli", "edit", "--spec", str(spec), "--method", method, "--backend", backend,
               "--overwrite", "--json", "-q", *extra]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ})
    summary = [json.loads(line) for line in done.stdout.splitlines() if '"summary"' in line][-1]
    if summary["failed"]:
        raise SystemExit(f"{summary['failed']} edits failed: {done.stdout}")
    return (summary["seconds"] - summary["load_seconds"]) / summary["done"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--photos", type=int, default=8, help="photos N of the shared run")
    parser.add_argument("--targets", type=int, default=4, help="targets K of each photo")
    parser.add_argument("--side", type=int, default=128, help="the photos' side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--icd-args", default="", help="more options of icd edit, e.g. the model's (--base ...)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    extra = shlex.split(args.icd_args)
    count = args.photos * args.targets
    scenes = _distinct_scenes(count, args.side)
    targets = [target for _, _, target in scenes[: args.targets]]
    shared = [(image, source, target) for image, source, _ in scenes[: args.photos] for target in targets]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        shared_spec = _spec(Path(folder), shared, "shared")
        separate_spec = _spec(Path(folder), scenes, "separate")
        for method in ("swap", "p2p"):
            times: dict[str, list[float]] = {"shared": [], "separate": []}
            for _ in range(args.repeats):  # interleaved, so that a busy moment touches both
                times["shared"].append(_seconds(shared_spec, method, args.backend, extra))
                times["separate"].append(_seconds(separate_spec, method, args.backend, extra))
            shared_s, separate_s = (statistics.median(times[key]) for key in ("shared", "separate"))
            saved = round(1 - shared_s / separate_s, 3)
            rows.append({"method": method, "edits": count, "per_edit_shared": round(shared_s, 4),
                         "per_edit_separate": round(separate_s, 4), "saved": saved})  # fmt: skip
    result = {"backend": args.backend, "photos": args.photos, "targets": args.targets, "side": args.side,
              "icd_args": args.icd_args, "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.backend}: {args.photos} photos x {args.targets} targets against {count} photos x 1, {args.side} px")
    for row in rows:
        print(f"{row['method']}: {row['per_edit_shared']:.4f} s/edit shared, {row['per_edit_separate']:.4f} s/edit "
              f"separate ({100 * row['saved']:.0f}% saved)")  # fmt: skip


if __name__ == "__main__":
    main()
