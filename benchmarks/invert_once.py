"""Invert once, edit many: seconds of a new target on an inverted photo (the decode alone: the target prompt's
encoding, the reverse steps and the VAE decode) against a whole edit (inversion and decode), in the same run.

    python benchmarks/invert_once.py                          # the embedded model, PyTorch on the CPU
    python benchmarks/invert_once.py --backend onnxruntime --repeats 30 --json

Every timed call gets a target it has not seen (a colour and a shape of the embedded model's captions), so no
encoding is reused but the source's, which the inversion caches. Each row: the method, the median and 90th
percentile seconds of both, and the decode's share. The issue's goal for the decode alone: at most 0.1 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

from icdcli.diffusion.recipe import SamplerSettings, resolve_edit
from icdcli.editing.edits import edit
from icdcli.editing.inversion import edit_inversion, invert_for_edit
from icdcli.io.images import load_image
from icdcli.pipeline import ICDEditPipeline

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SOURCE = "a red circle on a blue background"
COLOURS = ("yellow", "green", "purple", "orange", "white", "black", "pink", "cyan")
SHAPES = ("circle", "square", "triangle")


def _targets():
    for colour, shape in itertools.cycle(itertools.product(COLOURS, SHAPES)):
        yield f"a {colour} {shape} on a blue background"


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 4), "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of each kind per method")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = ICDEditPipeline.from_pretrained(device="cpu", backend=args.backend).model
    image = load_image(EXAMPLE)
    targets = _targets()
    rows = []
    for method in ("swap", "p2p"):
        resolved = resolve_edit(model.info.edit, model.info.generate_guidance, method=method)
        settings = SamplerSettings("icd", 50, resolved.seed)
        kwargs = {"guidance": resolved.guidance, "tau": resolved.tau, "settings": settings, "p2p": resolved.p2p}
        inversion = invert_for_edit(model, image, SOURCE, settings)
        for _ in range(3):  # warm-up: first calls allocate
            edit(model, image, SOURCE, next(targets), **kwargs)
            edit_inversion(model, inversion, next(targets), **kwargs)
        whole, decode = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same load of the machine
            start = time.perf_counter()
            edit(model, image, SOURCE, next(targets), **kwargs)
            whole.append(time.perf_counter() - start)
            start = time.perf_counter()
            edit_inversion(model, inversion, next(targets), **kwargs)
            decode.append(time.perf_counter() - start)
        start = time.perf_counter()
        invert_for_edit(model, image, SOURCE, settings)
        rows.append({"method": method, "whole_edit": _quantiles(whole), "decode_alone": _quantiles(decode),
                     "invert_once": round(time.perf_counter() - start, 4),
                     "share": round(statistics.median(decode) / statistics.median(whole), 3)})  # fmt: skip
    report = {"model": model.info.name, "backend": args.backend, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "goal_seconds": 0.1, "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['model']} on {args.backend} (CPU, {report['threads']} threads), {args.repeats} calls each")
    for row in rows:
        whole, decode = row["whole_edit"], row["decode_alone"]
        print(
            f"  {row['method']:5s} whole edit {whole['median']:.4f} s (p90 {whole['p90']:.4f}) | new target on the "
            f"inversion {decode['median']:.4f} s (p90 {decode['p90']:.4f}) | {row['share']:.0%} of the whole edit"
        )


if __name__ == "__main__":
    main()
