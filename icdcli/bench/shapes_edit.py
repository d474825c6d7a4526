"""Editing against rendered ground truth: each held-out scene is edited to a copy with one attribute changed
and compared with that copy rendered exactly (PSNR to the target, PSNR of the unchanged region to the
source, and whether the edited attribute reads as the target's). Beside the edits, whether each caption
word's cross-attention map localises: the region local blend would take for it against the rendered shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from icdcli.bench.metrics import psnr
from icdcli.bench.scenes import (
    ATTRIBUTE,
    GUIDED_W,
    batches,
    classify,
    edit_pairs,
    heldout_scenes,
    p2p_roundtrip,
    roundtrip,
    source_attention_maps,
    to_unit,
    word_region,
)
from icdcli.diffusion.recipe import P2POptions, P2PSettings, SamplerSettings
from icdcli.models.api import EditModel
from icdcli.training.scenes import EDIT_KINDS, Scene, change_mask, render_batch


@dataclass(frozen=True)
class EditMethod:
    name: str
    sampler: str
    guidance: float | None  # None: the model's own edit guidance
    tau: float | None  # None: the model's own tau
    editing: str = "swap"  # or "p2p" (Prompt-to-Prompt with the model's recipe), or a reference: REFERENCES
    blend: bool = False  # P2P with local blend on the edited word (its source and its target word)
    blend_keep: str = "source"  # what local blend keeps outside the word's region (P2PSettings.blend_keep)
    mask: bool = False  # held to a painted region (`icd edit --mask`): the changed pixels, grown by MASK_MARGIN


EDIT_METHODS: tuple[EditMethod, ...] = (
    EditMethod("icd4-swap", "icd", None, None),
    EditMethod("ddim50-swap", "ddim", GUIDED_W, 1.0),
    EditMethod("icd4-p2p", "icd", None, None, "p2p"),
    EditMethod("ddim50-p2p", "ddim", GUIDED_W, 1.0, "p2p"),
    EditMethod("icd4-p2p-blend", "icd", None, None, "p2p", blend=True),
    EditMethod("icd4-p2p-blend-inversion", "icd", None, None, "p2p", blend=True, blend_keep="inversion"),
    EditMethod("icd4-swap-mask", "icd", None, None, mask=True),
    EditMethod("icd4-p2p-mask", "icd", None, None, "p2p", mask=True),
    EditMethod("vae", "icd", None, None, "vae"),
    EditMethod("latent-blend-oracle", "icd", None, None, "latent-blend-oracle"),
)
REFERENCES = ("vae", "latent-blend-oracle")
"""Rows that edit nothing, to read the others against: the source through the VAE alone (`vae`: the ceiling of the
unchanged region), and the best any blend of latents can do (`latent-blend-oracle`: the source's own latents in
every latent cell the edit leaves unchanged, the target's own in every cell with a changed pixel)."""
MASK_MARGIN = 2
"""How far (pixels) the masked rows' region reaches past the pixels the edit changes: a region painted loosely."""
WORD_KINDS: tuple[str, ...] = ("colour", "shape", "background")
"""Caption words whose maps are measured: the shape's colour word, the shape word, the background's colour word."""
LOCALISED_IOU = 0.5


def bench_shapes_edit(
    model: EditModel,
    *,
    count: int = 200,
    batch: int = 50,
    seed: int = 0,
    methods: tuple[EditMethod, ...] = EDIT_METHODS,
    progress: Callable[[str], None] | None = None,
    localisation: bool = True,
) -> dict[str, Any]:
    """PSNR to the target, PSNR of the unchanged region to the source, and attribute accuracy, per kind;
    and the localisation of each kind of caption word (`bench_localisation`).

    Args:
        model: The model to edit with (the DDIM methods need its teacher).
        count: Edits per method.
        batch: Edits per network call.
        seed: Seed of the scenes and of the edits.
        methods: Which edit methods to run.
        progress: Called with a line per method.
        localisation: Measure the words' cross-attention maps too (`localisation` in the result).
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
        p2p = P2POptions(blend_keep=method.blend_keep).resolve(model.info.edit)  # the model's recipe, as icd edit
        per_kind: dict[str, dict[str, list[float]]] = {}
        for chunk in batches(pairs, batch):
            pixels, captions = render_batch([source for source, _, _ in chunk], size)
            targets = [target.caption() for _, target, _ in chunk]
            if method.editing in REFERENCES:
                edited = reference_edit(model, pixels, chunk, oracle=method.editing == "latent-blend-oracle")
            elif method.mask:
                edited = masked_edit(model, chunk, settings=settings, guidance=guidance, tau=tau,
                                     p2p=p2p if method.editing == "p2p" else None)  # fmt: skip
            elif method.editing == "p2p":
                edited = p2p_roundtrip(
                    model,
                    pixels,
                    captions,
                    settings=settings,
                    guidance=guidance,
                    tau=tau,
                    target_captions=targets,
                    p2p=[blend_on_edited_word(p2p, source, target, kind) for source, target, kind in chunk]
                    if method.blend
                    else p2p,
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
    result: dict[str, Any] = {"n_images": count, "rows": rows, "skipped": skipped}
    if localisation:
        say("shapes-edit: localisation")
        result["localisation"] = bench_localisation(model, heldout_scenes(count, seed), batch=batch, seed=seed)
    return result


def reference_edit(
    model: EditModel, pixels: torch.Tensor, chunk: list[tuple[Scene, Scene, str]], *, oracle: bool
) -> torch.Tensor:
    """The sources through the VAE alone, or (`oracle`) decoded from the source's latents outside the latent cells
    with a changed pixel and the exactly rendered target's inside them (`REFERENCES`)."""
    with torch.no_grad():
        latents = model.encode_image(pixels)
        if oracle:
            size = pixels.shape[-1]
            targets, _ = render_batch([target for _, target, _ in chunk], size)
            changed = torch.stack([torch.from_numpy(change_mask(s, t, size=size)) for s, t, _ in chunk])[:, None]
            factor = size // latents.shape[-1]
            cells = (F.max_pool2d(changed.float(), factor) > 0).to(latents.dtype)
            latents = latents + cells * (model.encode_image(targets.to(pixels.device)) - latents)
        return model.decode_latents(latents)


def masked_edit(
    model: EditModel,
    chunk: list[tuple[Scene, Scene, str]],
    *,
    settings: SamplerSettings,
    guidance: float,
    tau: float,
    p2p: P2PSettings | None,
) -> torch.Tensor:
    """The sources edited as `icd edit --mask` edits them (`icdcli.editing.edits.edit_batch`), each held to the pixels
    its edit changes grown by `MASK_MARGIN`: pixels (B, 3, H, W) in [-1, 1]."""
    from PIL import Image, ImageFilter

    from icdcli.editing.edits import EditJob, edit_batch

    size = model.info.native_size
    jobs = []
    for source, target, _ in chunk:
        changed = Image.fromarray(change_mask(source, target, size=size).astype(np.uint8) * 255)
        region = changed.filter(ImageFilter.MaxFilter(2 * MASK_MARGIN + 1))
        photo = Image.fromarray(source.render(size))
        jobs.append(EditJob(photo, source.caption(), target.caption(), guidance, tau, settings.seed, p2p, mask=region))
    with torch.no_grad():
        results = edit_batch(model, jobs, settings=settings)
    arrays = []
    for result in results:
        if isinstance(result, Exception):
            raise result
        arrays.append(torch.from_numpy(np.asarray(result, dtype=np.float32)).permute(2, 0, 1))
    return torch.stack(arrays) / 127.5 - 1.0


def blend_on_edited_word(p2p: P2PSettings, source: Scene, target: Scene, kind: str) -> P2PSettings:
    """`p2p` with local blend on the edited word: its source word in the source prompt, its target one in the target."""
    attribute = ATTRIBUTE[kind]
    return replace(p2p, blend_source=(getattr(source, attribute),), blend_target=(getattr(target, attribute),))


def bench_localisation(model: EditModel, items: list[Scene], *, batch: int = 50, seed: int = 0) -> list[dict[str, Any]]:
    """How well each kind of caption word's cross-attention map marks its region, over `items`.

    The maps are the ones P2P's local blend aggregates (the source branch of an iCD P2P decode of each scene to
    its own caption, the model's recipe), thresholded at the recipe's blend threshold and upsampled to the
    image; a row per word kind: mean IoU with the rendered shape (colour and shape words) or the background
    (the background's colour word), the fraction of scenes at IoU >= 0.5, and the mean fraction of the image
    the region covers (1.0: a flat map).

    Args:
        model: The model whose reverse steps decode.
        items: The scenes.
        batch: Scenes per network call.
        seed: Seed of the inversion noise.
    """
    size = model.info.native_size
    p2p = P2POptions().resolve(model.info.edit)
    tokenizer = model.tokenizers[0]
    scores: dict[str, list[tuple[float, float]]] = {kind: [] for kind in WORD_KINDS}
    for chunk in batches(items, batch):
        pixels, captions = render_batch(chunk, size)
        maps, side = source_attention_maps(
            model,
            pixels,
            captions,
            settings=SamplerSettings("icd", 50, seed),
            guidance=model.info.edit_guidance,
            tau=model.info.tau,
            p2p=p2p,
        )
        for scene, caption, source_map in zip(chunk, captions, maps, strict=True):
            shape = scene.coverage(size) >= 0.5
            for kind in WORD_KINDS:
                word = getattr(scene, ATTRIBUTE[kind])
                truth = ~shape if kind == "background" else shape
                region = word_region(
                    tokenizer, caption, word, source_map, side=side, image_hw=truth.shape, threshold=p2p.blend_threshold
                )
                scores[kind].append((mask_iou(region, truth), float(region.mean())))
    return [
        {
            "word_kind": kind,
            "iou": float(np.mean([iou for iou, _ in values])),
            "localised": float(np.mean([iou >= LOCALISED_IOU for iou, _ in values])),
            "region": float(np.mean([area for _, area in values])),
        }
        for kind, values in scores.items()
    ]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
