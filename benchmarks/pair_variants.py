"""Inversion PSNR of every forward model paired with every reverse model among trained variants.

    python benchmarks/pair_variants.py runs/default/variants cd4 cd4+lf cd4+lf+lr --limit 100

Separates what each preservation loss does to the encoder from what it does to the decoder: each
pair encodes held-out scenes with one variant's forward model and decodes them with another's
reverse model, unguided and at w = 8 with dynamic guidance (tau 0.8). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy

import torch

from icdcli.bench.metrics import psnr
from icdcli.bench.scenes import GUIDED_W, batches, heldout_scenes, roundtrip, to_unit
from icdcli.diffusion.recipe import SamplerSettings
from icdcli.models.fusion import load_model_folder
from icdcli.training.scenes import render_batch


def pair_psnr(forward: object, reverse: object, scenes: list, guidance: float, tau: float) -> float:
    model = copy.copy(reverse)
    model.forward_unet = forward.forward_unet
    scores = []
    for chunk in batches(scenes, 50):
        pixels, captions = render_batch(chunk, model.info.native_size)
        decoded = to_unit(roundtrip(model, pixels, captions, settings=SamplerSettings(), guidance=guidance, tau=tau))
        scores.append(psnr(decoded, to_unit(pixels)))
    return float(torch.cat(scores).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="folder of variant model folders (what icd train --variant writes)")
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    models = {name: load_model_folder(f"{args.folder}/{name}") for name in args.variants}
    scenes = heldout_scenes(args.limit, args.seed)
    print("| forward \\ reverse | " + " | ".join(args.variants) + " |")
    print("|---" * (len(args.variants) + 1) + "|")
    for forward in args.variants:
        cells = []
        for reverse in args.variants:
            unguided = pair_psnr(models[forward], models[reverse], scenes, 1.0, 1.0)
            guided = pair_psnr(models[forward], models[reverse], scenes, GUIDED_W, models[reverse].info.tau)
            cells.append(f"{unguided:.2f} / {guided:.2f}")
        print(f"| {forward} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
