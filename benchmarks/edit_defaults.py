"""Choose a model's default edit guidance: `icd bench shapes-edit`'s measures for a grid of (w, tau), on held-out
scenes of a seed the tables do not use (1), all edit kinds together and per kind.

    python benchmarks/edit_defaults.py --model DIR --limit 30 --seed 1
    python benchmarks/edit_defaults.py --model DIR --grid 4/0.8,6/0.8 --method swap

Prints a markdown table (and with --json one JSON object) of accuracy, PSNR to the target and PSNR of the unchanged
region per (w, tau) and method; the model's P2P fractions and amplify are used as `icd edit` uses them.
"""

from __future__ import annotations

import argparse
import json

GRID = ((2.0, 0.8), (4.0, 0.8), (6.0, 0.8), (8.0, 0.8), (4.0, 1.0), (8.0, 1.0))


def parse_grid(text: str) -> tuple[tuple[float, float], ...]:
    """Parse "4/0.8,6/0.8" into ((4.0, 0.8), (6.0, 0.8))."""
    return tuple((float(w), float(tau)) for w, tau in (item.split("/") for item in text.split(",") if item.strip()))


def main() -> None:
    from icdcli.bench.shapes_edit import EditMethod, bench_shapes_edit
    from icdcli.models.sources import ModelRequest, load_requested_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--limit", type=int, default=30, help="scenes per edit kind are about a third of this")
    parser.add_argument("--seed", type=int, default=1, help="seed of the held-out scenes (tables use 0; choose on 1)")
    parser.add_argument("--grid", default=None, help="w/tau pairs, e.g. 4/0.8,6/0.8 (default: the usual grid)")
    parser.add_argument("--method", choices=["p2p", "swap", "both"], default="p2p")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = load_requested_model(ModelRequest(args.model, None, None, None, None))
    grid = parse_grid(args.grid) if args.grid else GRID
    editings = ("p2p", "swap") if args.method == "both" else (args.method,)
    methods = tuple(
        EditMethod(f"{editing} w{w:g} tau{tau:g}", "icd", w, tau, editing) for w, tau in grid for editing in editings
    )
    result = bench_shapes_edit(model, count=args.limit, seed=args.seed, methods=methods, localisation=False)
    if args.json:
        print(json.dumps({"model": model.info.name, "seed": args.seed, **result}))
        return
    print("| method | kind | accuracy | PSNR target | PSNR unchanged |\n|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['method']} | {row['kind']} | {row['accuracy']:.2f} | {row['psnr_target']:.2f} | "
              f"{row['psnr_background']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
