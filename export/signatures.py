"""What each exported graph looks like: its inputs and outputs (`TensorSpec`s with symbolic axes) and example inputs.

Graph signatures (batch and spatial axes dynamic; the text length is the tokenizer's, static):

- UNets: `sample` (B, C, h, w), `timestep` (B,) float32, `encoder_hidden_states` (B, L, D); for SDXL also
  `text_embeds` (B, P) and `time_ids` (B, 6); output `eps`. Guidance, per graph ("per-guidance graphs"):
  - the forward UNet is always unguided: for a guidance-distilled model its graph computes the constant
    `guidance_scale_embedding(w=1)` inside and has no `timestep_cond` input ("folded");
  - a guidance-distilled reverse (or teacher) UNet takes `timestep_cond` (B, 512): the sinusoidal embedding
    of the classical scale w, computed by the caller with `icdcli.diffusion.denoiser.guidance_scale_embedding`
    ("embedding");
  - a UNet without guidance distillation takes no guidance input; real CFG runs it at batch 2 and unguided
    steps at batch 1 through the dynamic batch axis ("cfg").
- `reverse_unet_p2p` (SD1.5-family models): the reverse UNet with Prompt-to-Prompt inside, for P (source,
  target) pairs per call. Its attention layers take the control of one step as inputs, each with a leading
  pair axis - `cross_alpha` (P, L), `refine` (P, L), `mapper` (P, L, L), `reweight` (P, L), `self_replace`
  (P, 1), see `icdcli.diffusion.p2p.control.StepControl` - and edit the last 2P rows of the batch (source, target
  interleaved; real CFG's unconditional rows come first and are left alone). A second output, `blend_maps`
  (P, 2, R*R, L), is the sum over layers of the head-averaged cross-attention maps at local blend's resolution R. Its
  spatial size is static (the model's native latents: which layers P2P touches depends on it); the batch is
  2P, or 2P and 4P for real CFG.
- `vae_encoder`: `images` (B, 3, H, W) in [-1, 1] -> `latents`: posterior mean *times the scaling factor*
  (the clean latents the samplers use, exactly `ICDModel.encode_image`).
- `vae_decoder`: `latents` (scaled, as the samplers produce them) -> `images` in [-1, 1], clamped
  (exactly `ICDModel.decode_latents`). The VAE graphs take and give float32; inside they compute in
  `export.precision.vae_graph_dtype`.
- `text_encoder` (and `text_encoder_2` for SDXL): `input_ids` (B, L) int32 -> `hidden_states` (the last
  layer for SD1.5, the penultimate for SDXL) and, for SDXL's second encoder, `pooled` (the projected text
  embedding).
"""

from __future__ import annotations

import torch

from icdcli.core.dtypes import TORCH_DTYPES, dtype_name
from icdcli.export.manifest import (
    FORWARD,
    GUIDANCE_CFG,
    GUIDANCE_EMBEDDING,
    GUIDANCE_FOLDED,
    P2P_BATCH,
    P2P_CONTROL_INPUTS,
    P2P_PAIRS,
    REVERSE,
    VAE_DECODER,
    VAE_ENCODER,
    TensorSpec,
)
from icdcli.models.api import DiffusersModule

EXAMPLE_LATENT = 8
BATCH, LATENT_H, LATENT_W, HEIGHT, WIDTH = "batch", "latent_height", "latent_width", "height", "width"


def unet_guidance_mode(role: str, guidance_distilled: bool) -> str:
    """How a UNet graph takes guidance: see the module docstring."""
    if not guidance_distilled:
        return GUIDANCE_CFG
    return GUIDANCE_FOLDED if role == FORWARD else GUIDANCE_EMBEDDING


def unet_specs(
    unet: DiffusersModule, role: str, *, latent_channels: int, text_length: int, dtype: torch.dtype
) -> tuple[list[TensorSpec], list[TensorSpec], str]:
    config = unet.config
    distilled = config.time_cond_proj_dim is not None
    guidance = unet_guidance_mode(role, distilled)
    fp = dtype_name(dtype)
    latent: list[int | str] = [BATCH, latent_channels, LATENT_H, LATENT_W]
    inputs = [
        TensorSpec("sample", fp, latent),
        TensorSpec("timestep", "float32", [BATCH]),
        TensorSpec("encoder_hidden_states", fp, [BATCH, text_length, int(config.cross_attention_dim)]),
    ]
    if guidance == GUIDANCE_EMBEDDING:
        inputs.append(TensorSpec("timestep_cond", fp, [BATCH, int(config.time_cond_proj_dim)]))
    if config.addition_embed_type == "text_time":
        pooled = int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)
        inputs += [TensorSpec("text_embeds", fp, [BATCH, pooled]), TensorSpec("time_ids", fp, [BATCH, 6])]
    return inputs, [TensorSpec("eps", fp, list(latent))], guidance


def p2p_unet_specs(
    unet: DiffusersModule, *, latent_channels: int, text_length: int, dtype: torch.dtype, latent_side: int
) -> tuple[list[TensorSpec], list[TensorSpec], str, int]:
    """Inputs and outputs of the reverse P2P graph at `latent_side` (static), and its blend resolution.

    The control inputs and the blend maps lead with the pair axis (P pairs per call: 2P rows of `sample`, 4P with
    real CFG), so a batch of P2P edits runs in one call."""
    from icdcli.diffusion.p2p.plan import blend_resolution

    inputs, outputs, guidance = unet_specs(
        unet, REVERSE, latent_channels=latent_channels, text_length=text_length, dtype=dtype
    )
    fp = dtype_name(dtype)

    def fixed(spec: TensorSpec) -> TensorSpec:
        sizes: dict[int | str, int | str] = {BATCH: P2P_BATCH, LATENT_H: latent_side, LATENT_W: latent_side}
        return TensorSpec(spec.name, spec.dtype, [sizes.get(dim, dim) for dim in spec.shape])

    control_shapes: dict[str, list[int | str]] = {"mapper": [text_length, text_length], "self_replace": [1]}
    control = [
        TensorSpec(name, fp, [P2P_PAIRS, *control_shapes.get(name, [text_length])]) for name in P2P_CONTROL_INPUTS
    ]
    blend = blend_resolution(latent_side)
    maps = TensorSpec("blend_maps", fp, [P2P_PAIRS, 2, blend * blend, text_length])
    return [fixed(spec) for spec in inputs] + control, [fixed(outputs[0]), maps], guidance, blend


def vae_specs(latent_channels: int) -> dict[str, tuple[list[TensorSpec], list[TensorSpec]]]:
    images = TensorSpec("images", "float32", [BATCH, 3, HEIGHT, WIDTH])
    latents = TensorSpec("latents", "float32", [BATCH, latent_channels, LATENT_H, LATENT_W])
    return {VAE_ENCODER: ([images], [latents]), VAE_DECODER: ([latents], [images])}


def text_specs(encoder: DiffusersModule, text_length: int, *, pooled: bool, dtype: torch.dtype):
    fp = dtype_name(dtype)
    hidden = TensorSpec("hidden_states", fp, [BATCH, text_length, int(encoder.config.hidden_size)])
    outputs = [hidden]
    if pooled:
        outputs.append(TensorSpec("pooled", fp, [BATCH, int(encoder.config.projection_dim)]))
    return [TensorSpec("input_ids", "int32", [BATCH, text_length])], outputs


def example_inputs(inputs: list[TensorSpec], sizes: dict[str, int], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Tensors of the right dtype and shape to trace with (batch 2, so the batch axis cannot be specialised)."""
    generator = torch.Generator("cpu").manual_seed(0)
    tensors = []
    for spec in inputs:
        shape = [sizes[dim] if isinstance(dim, str) else dim for dim in spec.shape]
        if spec.name == "input_ids":
            tensor = torch.randint(0, 8, shape, generator=generator)
        elif spec.name == "timestep":
            tensor = torch.full(shape, 500.0)
        elif spec.name in P2P_CONTROL_INPUTS:
            tensor = torch.rand(shape, generator=generator)
        else:
            tensor = torch.randn(shape, generator=generator)
        tensors.append(tensor.to(device, TORCH_DTYPES[spec.dtype]))
    return tuple(tensors)


def dynamic_axes(specs: list[TensorSpec]) -> dict[str, dict[int, str]]:
    axes = {spec.name: {i: dim for i, dim in enumerate(spec.shape) if isinstance(dim, str)} for spec in specs}
    return {name: dims for name, dims in axes.items() if dims}
