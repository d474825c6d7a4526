"""Why a model's cross-attention maps do (not) localise words: where its UNet has cross-attention, what its text
encoder's states carry, where the maps put their mass, and how each resolution's maps overlap the shapes.

    python benchmarks/attention_maps.py --limit 100                # the embedded model
    python benchmarks/attention_maps.py --model RUN/package --json

The maps are those P2P's local blend collects (`icdcli.bench.scenes.source_attention_maps`: the source branch of an
iCD P2P decode of each held-out scene to its own caption), read at each resolution the UNet has cross-attention at.
"IoU (blend)" thresholds them as local blend does (3x3 max-pool, 0.3 of the maximum); "IoU (raw)" without the pool.
"ideal" is the same aggregation applied to a map equal to the region's coverage of each cell (not a ceiling: a map that
peaks inside the shape keeps fewer border cells).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from icdcli.bench.scenes import ATTRIBUTE, batches, heldout_scenes, source_attention_maps, word_region
from icdcli.bench.shapes_edit import WORD_KINDS, mask_iou
from icdcli.diffusion.p2p.tokens import word_indicator, word_token_positions
from icdcli.diffusion.recipe import P2POptions, P2PSettings, SamplerSettings
from icdcli.models.sources import DEFAULT_MODEL_DIR
from icdcli.training.scenes import render_batch


def cross_attention_layers(model) -> list[tuple[str, int]]:
    """(module name, side of its query grid) of each cross-attention layer of the reverse UNet."""
    unet, sides = model.reverse_unet, []
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: sides.append((name, int(args[0].shape[1] ** 0.5))), with_kwargs=True
        )
        for name, module in unet.named_modules()
        if name.endswith("attn2")
    ]
    side = model.info.native_size // model.vae_scale_factor
    latents = torch.zeros(1, unet.config.in_channels, side, side)
    cond = model.encode_prompt("a red circle on a blue background").hidden_states
    extra = {}
    if unet.config.time_cond_proj_dim:
        extra["timestep_cond"] = torch.zeros(1, unet.config.time_cond_proj_dim)
    with torch.no_grad():
        unet(latents, 500, encoder_hidden_states=cond, **extra)
    for hook in hooks:
        hook.remove()
    return sides


def text_states(model) -> dict[str, float]:
    """What the text encoder's states carry: whether a word's state depends on the words after it (a causal mask:
    it does not), how alike the end-of-text and padding states are, and how alike two captions' padding is."""
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]

    def states(caption: str) -> torch.Tensor:
        ids = tokenizer(caption, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            return encoder(ids.input_ids)[0][0]

    a, b = states("a red circle on a blue background"), states("a red square on a blue background")
    c = states("a green circle on a yellow background")
    cos = lambda x, y: float(F.cosine_similarity(x, y, dim=-1).mean())  # noqa: E731
    eos = len(tokenizer("a red circle on a blue background").input_ids) - 1
    return {
        "colour word, captions differing in the shape after it": cos(a[2], b[2]),
        "shape word, captions differing in the shape": cos(a[3], b[3]),
        "background colour word, captions differing in the shape before it": cos(a[6], b[6]),
        "end-of-text vs padding (same caption)": cos(a[eos : eos + 1].expand_as(a[eos + 1 :]), a[eos + 1 :]),
        "padding, captions differing in every attribute": cos(a[eos + 1 :], c[eos + 1 :]),
        "colour word vs shape word (same caption)": cos(a[2], a[3]),
    }


def measure(model, limit: int, batch: int) -> dict:
    size = model.info.native_size
    layers = cross_attention_layers(model)
    tokenizer = model.tokenizers[0]
    p2p: P2PSettings = P2POptions().resolve(model.info.edit)
    items = heldout_scenes(limit)
    report: dict = {"cross_attention_layers": layers, "text_states": text_states(model), "resolutions": []}
    for side in sorted({s for _, s in layers}, reverse=True):
        scores: dict[str, list] = {kind: [] for kind in WORD_KINDS}
        mass = {"begin": 0.0, "words": 0.0, "end": 0.0, "padding": 0.0}
        flat: dict[str, list[float]] = {kind: [] for kind in WORD_KINDS}
        with mock.patch("icdcli.diffusion.p2p.plan.blend_resolution", lambda latent_side, side=side: side):
            for chunk in batches(items, batch):
                pixels, captions = render_batch(chunk, size)
                maps, got = source_attention_maps(
                    model, pixels, captions, settings=SamplerSettings("icd", 50, 0),
                    guidance=model.info.edit_guidance, tau=model.info.tau, p2p=p2p,
                )  # fmt: skip
                assert got == side
                for scene, caption, found in zip(chunk, captions, maps, strict=True):
                    words = [p for ps in word_token_positions(tokenizer, caption) for p in ps]
                    per_token = found.sum(0) / found.sum()
                    mass["begin"] += float(per_token[0])
                    mass["words"] += float(per_token[words].sum())
                    mass["end"] += float(per_token[words[-1] + 1])
                    mass["padding"] += float(per_token[words[-1] + 2 :].sum())
                    shape = scene.coverage(size) >= 0.5
                    for kind in WORD_KINDS:
                        word = getattr(scene, ATTRIBUTE[kind])
                        truth = ~shape if kind == "background" else shape
                        tokens = word_indicator(tokenizer, caption, [word]).bool()
                        cell = found[:, tokens].sum(-1).reshape(1, 1, side, side)
                        flat[kind].append(float(cell.min() / cell.max()))
                        raw = F.interpolate(cell, size=truth.shape)[0, 0]
                        raw_region = (raw / raw.max() > p2p.blend_threshold).numpy()
                        region = word_region(
                            tokenizer, caption, word, found, side=side, image_hw=truth.shape,
                            threshold=p2p.blend_threshold,
                        )  # fmt: skip
                        ideal = ideal_region(scene.coverage(size), side, kind, p2p.blend_threshold, tokenizer, caption)
                        scores[kind].append(
                            (mask_iou(region, truth), mask_iou(raw_region, truth), mask_iou(ideal, truth))
                        )
        report["resolutions"].append(
            {
                "side": side,
                "layers": sum(1 for _, s in layers if s == side),
                "mass": {k: round(v / len(items), 3) for k, v in mass.items()},
                "words": {
                    kind: {
                        "iou_blend": round(float(np.mean([s[0] for s in values])), 3),
                        "iou_raw": round(float(np.mean([s[1] for s in values])), 3),
                        "iou_ideal": round(float(np.mean([s[2] for s in values])), 3),
                        "min_over_max": round(float(np.mean(flat[kind])), 3),
                    }
                    for kind, values in scores.items()
                },
            }
        )
    return report


def ideal_region(coverage: np.ndarray, side: int, kind: str, threshold: float, tokenizer, caption: str) -> np.ndarray:
    """Local blend's region from a coverage map: each cell the coverage of the word's region."""
    image = coverage.shape[0]
    cover = coverage if kind != "background" else 1.0 - coverage
    cell = torch.from_numpy(cover.reshape(side, image // side, side, image // side).mean(axis=(1, 3)).copy())
    word = caption.split()[1]
    maps = cell.reshape(-1, 1) * word_indicator(tokenizer, caption, [word])[None]
    return word_region(tokenizer, caption, word, maps, side=side, image_hw=coverage.shape, threshold=threshold)


def coverage_map_iou(limit: int, sides: tuple[int, ...] = (4, 8, 16, 32), image: int = 32) -> list[dict]:
    """Local blend's IoU with the shape from a coverage map at each side, with and without its 3x3 max-pool."""
    from icdcli.training.scenes import vocabulary
    from icdcli.training.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(vocabulary())
    rows = []
    for side in sides:
        blend, raw = [], []
        for scene in heldout_scenes(limit):
            coverage = scene.coverage(image)
            shape = coverage >= 0.5
            region = ideal_region(coverage, side, "shape", 0.3, tokenizer, scene.caption())
            blend.append(mask_iou(region, shape))
            cell = coverage.reshape(side, image // side, side, image // side).mean(axis=(1, 3))
            up = F.interpolate(torch.from_numpy(cell.copy())[None, None], size=(image, image))[0, 0]
            raw.append(mask_iou((up / up.max() > 0.3).numpy(), shape))
        rows.append(
            {
                "side": side,
                "iou_blend": round(float(np.mean(blend)), 3),
                "at_least_half_blend": round(float(np.mean(np.asarray(blend) >= 0.5)), 3),
                "iou_raw": round(float(np.mean(raw)), 3),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="an icd model folder")
    parser.add_argument("--limit", type=int, default=100, help="held-out scenes (seed 0)")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--ideal", action="store_true", help="only the ideal maps' IoU at sides 4-32 (no model)")
    args = parser.parse_args()
    if args.ideal:
        print(json.dumps(coverage_map_iou(args.limit), indent=1))
        return
    from icdcli.models.fusion import load_model_folder

    model = load_model_folder(args.model).to("cpu", torch.float32)
    report = measure(model, args.limit, args.batch)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print("cross-attention layers (name, query side):")
    for name, side in report["cross_attention_layers"]:
        print(f"  {name}: {side}x{side}")
    print("text encoder states, mean cosine similarity:")
    for name, value in report["text_states"].items():
        print(f"  {name}: {value:.3f}")
    print(
        "| map side | layers | mass: begin / words / end / padding | word | IoU (blend) | IoU (raw) | ideal | min/max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in report["resolutions"]:
        mass = " / ".join(f"{v:.2f}" for v in row["mass"].values())
        for kind, w in row["words"].items():
            print(
                f"| {row['side']} | {row['layers']} | {mass} | {kind} | {w['iou_blend']:.2f} | {w['iou_raw']:.2f} "
                f"| {w['iou_ideal']:.2f} | {w['min_over_max']:.2f} |"
            )


if __name__ == "__main__":
    main()
