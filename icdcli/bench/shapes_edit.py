"""Editing against rendered ground truth: each held-out scene is edited to a copy with one attribute changed
and compared with that copy rendered exactly (PSNR to the target, PSNR of the unchanged region to the
source, and whether the edited attribute reads as the target's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icdcli.editing import SamplerSettings
from icdcli.metrics import psnr
from icdcli.model_api import EditModel
from icdcli.recipe import P2POptions
from icdcli.training.scenes import EDIT_KINDS, change_mask, render_batch

from .scenes import ATTRIBUTE, GUIDED_W, batches, classify, edit_pairs, p2p_roundtrip, roundtrip, to_unit


@dataclass(frozen=True)
class EditMethod:
    name: str
    sampler: str
    guidance: float | None  # None: the model's own edit guidance
    tau: float | None  # None: the model's own tau
    editing: str = "swap"  # or "p2p" (Prompt-to-Prompt with the model's recipe)


EDIT_METHODS: tuple[EditMethod, ...] = (
    EditMethod("icd4-swap", "icd", None, None),
    EditMethod("ddim50-swap", "ddim", GUIDED_W, 1.0),
    EditMethod("icd4-p2p", "icd", None, None, "p2p"),
    EditMethod("ddim50-p2p", "ddim", GUIDED_W, 1.0, "p2p"),
)


def bench_shapes_edit(
    model: EditModel,
    *,
    count: int = 200,
    batch: int = 50,
    seed: int = 0,
    methods: tuple[EditMethod, ...] = EDIT_METHODS,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """PSNR to the target, PSNR of the unchanged region to the source, and attribute accuracy, per kind.

    Args:
        model: The model to edit with (the DDIM methods need its teacher).
        count: Edits per method.
        batch: Edits per network call.
        seed: Seed of the scenes and of the edits.
        methods: Which edit methods to run.
        progress: Called with a line per method.
    """
    say = progress or (lambda message: None)
    size = model.info.native_size
    pairs = edit_pairs(count, seed)
    rows, skipped = [], []
    for method in methods:
        if method.sampler == "ddim" and model.teacher_unet is None:
            skipped.append(method.name)
            continue
        say(f"shapes-edit: {method.name}")
        guidance = model.info.edit_guidance if method.guidance is None else method.guidance
        tau = model.info.tau if method.tau is None else method.tau
        settings = SamplerSettings(method.sampler, 50, seed)
        p2p = P2POptions().resolve(model.info.edit)  # the model's recipe, as icd edit uses it
        per_kind: dict[str, dict[str, list[float]]] = {}
        for chunk in batches(pairs, batch):
            pixels, captions = render_batch([source for source, _, _ in chunk], size)
            targets = [target.caption() for _, target, _ in chunk]
            if method.editing == "p2p":
                edited = p2p_roundtrip(
                    model,
                    pixels,
                    captions,
                    settings=settings,
                    guidance=guidance,
                    tau=tau,
                    target_captions=targets,
                    p2p=p2p,
                )
            else:
                edited = roundtrip(
                    model, pixels, captions, settings=settings, guidance=guidance, tau=tau, target_captions=targets
                )
            edited = to_unit(edited)
            for index, (source, target, kind) in enumerate(chunk):
                image = edited[index : index + 1]
                target_pixels = torch.from_numpy(target.render(size)).permute(2, 0, 1)[None].double() / 255
                source_pixels = torch.from_numpy(source.render(size)).permute(2, 0, 1)[None].double() / 255
                keep = torch.from_numpy(~change_mask(source, target, size=size))[None, None]
                as_uint8 = (image[0].permute(1, 2, 0).numpy() * 255).round()
                scores = per_kind.setdefault(kind, {"psnr_target": [], "psnr_background": [], "accuracy": []})
                scores["psnr_target"].append(float(psnr(image, target_pixels)))
                scores["psnr_background"].append(float(psnr(image, source_pixels, keep)))
                scores["accuracy"].append(float(classify(as_uint8, target, kind) == getattr(target, ATTRIBUTE[kind])))
        everything: dict[str, list[float]] = {"psnr_target": [], "psnr_background": [], "accuracy": []}
        for kind in EDIT_KINDS:
            if not per_kind.get(kind):
                continue
            scores = per_kind[kind]
            rows.append({"method": method.name, "kind": kind, **{k: float(np.mean(v)) for k, v in scores.items()}})
            for key, values in scores.items():
                everything[key].extend(values)
        rows.append({"method": method.name, "kind": "all", **{k: float(np.mean(v)) for k, v in everything.items()}})
    return {"n_images": count, "rows": rows, "skipped": skipped}
