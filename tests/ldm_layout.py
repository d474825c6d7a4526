"""A diffusers SD1.5 pipeline folder written as one file in the original LDM key layout (the layout of
single-file checkpoints such as `v1-5-pruned-emaonly.safetensors`), for tests of `--base FILE`.

Key names follow the LDM code: the UNet under `model.diffusion_model.` (input/middle/output blocks, each a
list of layers), the VAE under `first_stage_model.` (encoder.down.N.block.M, decoder.up numbered from
the bottom, 1x1 convolutions in the mid attention), the CLIP text model under
`cond_stage_model.transformer.text_model.` with transformers' names.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {
    "norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.", "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection.",
}  # fmt: skip
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def _rename(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def unet_key(key: str, config: dict) -> str:
    """A diffusers UNet2DConditionModel key -> its LDM name (without the `model.diffusion_model.` prefix)."""
    per_block = config["layers_per_block"] + 1  # LDM counts the down/up-sampler as one more layer of a block
    for old, new in _UNET_TOP.items():
        if key.startswith(old):
            return new + key[len(old) :]
    for blocks, ldm_blocks, first in (("down_blocks", "input_blocks", 1), ("up_blocks", "output_blocks", 0)):
        if match := re.match(rf"{blocks}\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            index = per_block * int(match[1]) + int(match[3]) + first  # input block 0 is conv_in
            if match[2] == "resnets":
                return f"{ldm_blocks}.{index}.0.{_rename(match[4], _UNET_RESNET)}"
            return f"{ldm_blocks}.{index}.1.{match[4]}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per_block * (int(match[1]) + 1)}.0.op.{match[2]}"
    if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename(match[2], _UNET_RESNET)}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(match[1])
        has_attention = config["up_block_types"][block].startswith("CrossAttn")
        return f"output_blocks.{per_block * block + per_block - 1}.{2 if has_attention else 1}.conv.{match[2]}"
    raise KeyError(f"no LDM name for UNet key {key}")


def vae_key(key: str, config: dict) -> str:
    """A diffusers AutoencoderKL key -> its LDM name (without the `first_stage_model.` prefix)."""
    blocks = len(config["block_out_channels"])
    key = key.replace("conv_norm_out.", "norm_out.")
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        level = blocks - 1 - int(match[1])  # LDM numbers the decoder's levels from the bottom
        return f"decoder.up.{level}.block.{match[2]}.{match[3].replace('conv_shortcut', 'nin_shortcut')}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        return f"decoder.up.{blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{match[1]}.mid.attn_1.{_rename(match[2], _VAE_ATTENTION)}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def _component(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    weights = next((folder / name).glob("*.safetensors"))
    return load_file(str(weights)), json.loads((folder / name / "config.json").read_text())


def write_single_file(pipeline: Path, path: Path) -> Path:
    """The SD1.5 pipeline folder `pipeline` as one LDM-layout `.safetensors` file at `path`."""
    state = {}
    unet, unet_config = _component(pipeline, "unet")
    for key, value in unet.items():
        state["model.diffusion_model." + unet_key(key, unet_config)] = value
    vae, vae_config = _component(pipeline, "vae")
    for key, value in vae.items():
        name = vae_key(key, vae_config)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        state["first_stage_model." + name] = value
    text, _ = _component(pipeline, "text_encoder")
    for key, value in text.items():  # newer transformers save CLIPTextModel without its `text_model.` level
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def copy_configs(pipeline: Path, folder: Path) -> Path:
    """The pipeline folder without its weights: what `--base-config` takes."""
    shutil.copytree(pipeline, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder
