"""Do a configuration's cross-attention maps localise words? Train a teacher of it for a fixed wall time, then
measure its maps on held-out scenes as local blend aggregates them.

    python benchmarks/localisation_experiment.py OUT --arm v1 --minutes 12
    python benchmarks/localisation_experiment.py OUT --arm v2 --minutes 12 --vae-minutes 4

Arms: `v1` (the first embedded model's teacher: 8x8 latents on its own VAE, two-layer text encoder), `v1-text0`
(the same with a text encoder without layers), `v2` (the v2 preset without its grounding loss: 16x16
latents on a two-block VAE trained first, no text layers), `v2-grounded` (the v2 preset, grounding loss
included, on the v2 arm's VAE).
The teacher trains without EMA (a short run's EMA would still hold its initialisation).
The maps: each scene's clean latent noised to t = 999, 779, 519, 259 (the iCD decode's steps) with seeded
noise, the teacher run once at each with the caption, each cross-attention layer's head-averaged probabilities
summed per resolution; `word_region` thresholds them as local blend does.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from icdcli.bench.scenes import ATTRIBUTE, heldout_scenes, word_region
from icdcli.bench.shapes_edit import WORD_KINDS, mask_iou
from icdcli.diffusion.schedule import alphas_cumprod
from icdcli.models.sources import DEFAULT_MODEL_DIR
from icdcli.training.evaluate import teacher_sample_accuracy
from icdcli.training.pipeline import V2_GROUNDING_WEIGHT, PipelineConfig
from icdcli.training.scenes import render_batch
from icdcli.training.teacher import TeacherConfig, load_teacher, train_teacher, train_vae

TIMESTEPS = (999, 779, 519, 259)


class CaptureCrossAttention:
    """Plain attention that also keeps each cross-attention layer's head-averaged probabilities (B, Q, L)."""

    def __init__(self, store: list[torch.Tensor]):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch = hidden_states.shape[0]
        query, key, value = (attn.head_to_batch_dim(t) for t in (attn.to_q(hidden_states), attn.to_k(context),
                                                                 attn.to_v(context)))  # fmt: skip
        probs = attn.get_attention_scores(query, key, None)
        if encoder_hidden_states is not None:
            self.store.append(probs.reshape(batch, attn.heads, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def teacher_config(arm: str, minutes: float) -> TeacherConfig:
    base = PipelineConfig.v2().teacher if arm.startswith("v2") else TeacherConfig()
    if arm == "v1-text0":
        base = replace(base, text_layers=0)
    base = replace(base, grounding_weight=V2_GROUNDING_WEIGHT if arm == "v2-grounded" else 0.0)
    return replace(base, steps=10**6, time_budget_s=minutes * 60, ema_decay=None, show_progress=False)


def vae_folder(arm: str, out: Path, vae_minutes: float) -> Path:
    folder = out / "vae"
    if (folder / "config.json").is_file():
        return folder
    if arm == "v2-grounded" and (out.parent / "v2" / "vae" / "config.json").is_file():
        shutil.copytree(out.parent / "v2" / "vae", folder)  # the v2 arm's VAE: the arms differ in the loss alone
        return folder
    if arm.startswith("v2"):
        vae = PipelineConfig.v2().vae
        train_vae(replace(vae, steps=10**6, time_budget_s=vae_minutes * 60, show_progress=False), folder)
        return folder
    from diffusers import AutoencoderKL

    shutil.rmtree(folder, ignore_errors=True)  # v1's own VAE, in float32
    AutoencoderKL.from_pretrained(DEFAULT_MODEL_DIR / "pipeline" / "vae", torch_dtype=torch.float32).save_pretrained(
        folder
    )
    return folder


@torch.no_grad()
def measure_maps(teacher_dir: Path, limit: int) -> dict:
    pipeline = load_teacher(teacher_dir)
    unet, vae, tokenizer = pipeline.unet, pipeline.vae, pipeline.tokenizer
    store: list[torch.Tensor] = []
    unet.set_attn_processor(CaptureCrossAttention(store))
    size = vae.config.sample_size
    items = heldout_scenes(limit)
    pixels, captions = render_batch(items, size)
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    hidden = pipeline.text_encoder(ids.input_ids)[0]
    alpha_bar = alphas_cumprod()
    sums: dict[int, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        a = alpha_bar[t].float()
        store.clear()
        unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, encoder_hidden_states=hidden)
        for probs in store:
            side = int(probs.shape[1] ** 0.5)
            sums[side] = probs if side not in sums else sums[side] + probs
    report = {}
    for side, maps in sorted(sums.items(), reverse=True):
        rows = {kind: [] for kind in WORD_KINDS}
        for index, (scene, caption) in enumerate(zip(items, captions, strict=True)):
            shape = scene.coverage(size) >= 0.5
            for kind in WORD_KINDS:
                word = getattr(scene, ATTRIBUTE[kind])
                truth = ~shape if kind == "background" else shape
                region = word_region(tokenizer, caption, word, maps[index], side=side, image_hw=truth.shape,
                                     threshold=0.3)  # fmt: skip
                position = caption.split().index(word) + 1 if kind != "background" else len(caption.split()) - 1
                cell = maps[index][:, position].reshape(1, 1, side, side)
                raw = F.interpolate(cell, size=truth.shape)[0, 0]
                rows[kind].append(
                    (mask_iou(region, truth), mask_iou((raw / raw.max() > 0.3).numpy(), truth),
                     float(cell.min() / cell.max()))
                )  # fmt: skip
        report[side] = {
            kind: {
                "iou_blend": round(float(np.mean([r[0] for r in v])), 3),
                "at_least_half": round(float(np.mean([r[0] >= 0.5 for r in v])), 3),
                "iou_raw": round(float(np.mean([r[1] for r in v])), 3),
                "min_over_max": round(float(np.mean([r[2] for r in v])), 3),
            }
            for kind, v in rows.items()
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--arm", choices=["v1", "v1-text0", "v2", "v2-grounded"], required=True)
    parser.add_argument("--minutes", type=float, default=12.0, help="the teacher's wall time")
    parser.add_argument("--vae-minutes", type=float, default=4.0, help="the v2 arm's VAE wall time")
    parser.add_argument("--limit", type=int, default=100)
    args = parser.parse_args()
    out = args.out / args.arm
    teacher_dir = out / "teacher"
    if not (teacher_dir / "train_config.json").is_file():
        train_teacher(teacher_config(args.arm, args.minutes), vae_folder(args.arm, out, args.vae_minutes), teacher_dir)
    steps = json.loads((teacher_dir / "train_config.json").read_text())["metrics"]["steps"]
    result = {
        "arm": args.arm,
        "teacher_steps": steps,
        "maps": measure_maps(teacher_dir, args.limit),
        "ddim50_w4_accuracy": teacher_sample_accuracy(teacher_dir, count=64, guidance=4.0),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
