"""Edit accuracy of Prompt-to-Prompt at several cross/self-replace fractions and amplify factors, beside prompt swap.

    python benchmarks/p2p_fractions.py --limit 100 --kind shape

Uses the embedded default model (or --model DIR) and the held-out shape edits of `icd bench shapes-edit` (seed 0).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from icdcli.bench.scenes import classify, edit_pairs, p2p_roundtrip, roundtrip, to_unit
from icdcli.diffusion.recipe import P2PSettings, SamplerSettings
from icdcli.models.sources import ModelRequest, load_requested_model
from icdcli.training.scenes import render_batch

# (cross, self, amplify of new words): the embedded model's recipe, ablations, and the release's SD1.5 recipe
FRACTIONS = ((0.8, 0.4, 1.0), (0.8, 0.0, 1.0), (0.4, 0.0, 1.0), (0.0, 0.0, 1.0), (0.3, 0.6, 1.0), (0.3, 0.6, 4.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--kind", default="shape", choices=["colour", "shape", "background"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out scenes (tables use 0; choose on 1)")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--rows", default=None, help="only these rows, e.g. 0.8/0.4/1,0.3/0.6/4")
    args = parser.parse_args()
    model = load_requested_model(ModelRequest(args.model, None, None, None, None))
    pairs = [pair for pair in edit_pairs(args.limit, args.seed) if pair[2] == args.kind]
    rows = FRACTIONS
    if args.rows:
        rows = tuple(tuple(float(v) for v in row.split("/")) for row in args.rows.split(","))
    pixels, captions = render_batch([source for source, _, _ in pairs], model.info.native_size)
    targets = [target.caption() for _, target, _ in pairs]
    guidance, tau, settings = model.info.edit_guidance, model.info.tau, SamplerSettings()

    def accuracy(edited: torch.Tensor) -> float:
        images = to_unit(edited)
        found = [
            classify((images[i].permute(1, 2, 0).numpy() * 255).round(), target, args.kind)
            for i, (_, target, _) in enumerate(pairs)
        ]
        return float(np.mean([f == getattr(t, args.kind) for f, (_, t, _) in zip(found, pairs, strict=True)]))

    print(f"| method | {args.kind} accuracy ({len(pairs)} edits) |\n|---|---|")
    swapped = roundtrip(model, pixels, captions, settings=settings, guidance=guidance, tau=tau, target_captions=targets)
    print(f"| swap | {accuracy(swapped):.2f} |")
    for cross, self_, amplify in rows:
        p2p = P2PSettings(cross, self_, amplify_new=amplify)
        edited = p2p_roundtrip(
            model, pixels, captions, settings=settings, guidance=guidance, tau=tau, target_captions=targets, p2p=p2p
        )
        print(f"| p2p cross {cross} self {self_} amplify {amplify:g} | {accuracy(edited):.2f} |", flush=True)


if __name__ == "__main__":
    main()
