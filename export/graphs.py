"""The modules each ONNX graph is traced from: a UNet with named inputs (w = 1 folded in for the forward model of a
guidance-distilled pair), the reverse UNet under Prompt-to-Prompt control given as inputs, the VAE encoder and
decoder (float32 in and out, the VAE computing in its own dtype) and the text encoders (see `export.signatures`)."""

from __future__ import annotations

from typing import Any

import torch

from icdcli.export.manifest import GUIDANCE_FOLDED, P2P_CONTROL_INPUTS
from icdcli.models.api import DiffusersModule


class UNetGraph(torch.nn.Module):
    """A UNet with named positional inputs, and w = 1 folded in when `guidance` is "folded"."""

    def __init__(self, unet: DiffusersModule, input_names: list[str], guidance: str):
        super().__init__()
        from icdcli.diffusion.denoiser import guidance_scale_embedding

        self.unet = unet
        self.input_names = input_names
        self.folded = guidance == GUIDANCE_FOLDED
        if self.folded:
            dim = unet.config.time_cond_proj_dim
            folded = guidance_scale_embedding(torch.ones(1), dim).to(unet.dtype)
            self.register_buffer("folded_cond", folded, persistent=False)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.run_unet(dict(zip(self.input_names, inputs, strict=True)))

    def run_unet(self, feeds: dict[str, torch.Tensor], cross_attention_kwargs: dict | None = None) -> torch.Tensor:
        sample = feeds["sample"]
        cond = self.get_buffer("folded_cond").expand(sample.shape[0], -1) if self.folded else feeds.get("timestep_cond")
        added = None
        if "text_embeds" in feeds:
            added = {"text_embeds": feeds["text_embeds"], "time_ids": feeds["time_ids"]}
        return self.unet(
            sample,
            feeds["timestep"],
            encoder_hidden_states=feeds["encoder_hidden_states"],
            timestep_cond=cond,
            added_cond_kwargs=added,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=False,
        )[0]


class P2PUNetGraph(UNetGraph):
    """The reverse UNet under Prompt-to-Prompt control given as inputs; outputs eps and the blend maps."""

    def __init__(self, unet: torch.nn.Module, input_names: list[str], guidance: str, blend_size: int, text_length: int):
        super().__init__(unet, input_names, guidance)
        from icdcli.diffusion.p2p.attention import install_p2p_processors

        install_p2p_processors(unet)
        self.blend_size, self.text_length = blend_size, text_length

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        from icdcli.diffusion.p2p.control import StepControl

        feeds = dict(zip(self.input_names, inputs, strict=True))
        controls = {name: feeds[name] for name in P2P_CONTROL_INPUTS}
        control = StepControl(
            cross_alpha=controls["cross_alpha"], refine=controls["refine"], mapper=controls["mapper"],
            reweight=controls["reweight"], self_replace=controls["self_replace"], blend_queries=self.blend_size**2,
        )  # fmt: skip
        collected: list[torch.Tensor] = []  # the processors add the blend-resolution maps of this call
        eps = self.run_unet(feeds, {"control": control, "blend_maps": collected})
        queries = self.blend_size**2
        if collected:  # (2P, Q, L) per layer -> (P, 2, Q, L): the pair axis leads, as on the control inputs
            maps = torch.stack(collected).sum(0).reshape(-1, 2, queries, self.text_length)
        else:  # no cross-attention at the blend resolution: local blend sees no maps (zeros, P of them)
            maps = (feeds["cross_alpha"][:, None, None, :] * 0).expand(-1, 2, queries, self.text_length)
        return eps, maps


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class VaeEncoderGraph(torch.nn.Module):
    """float32 images -> float32 latents, the VAE computing in its own dtype (as `ICDModel.encode_image`)."""

    def __init__(self, vae: DiffusersModule, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = _module_dtype(self.vae)
        posterior = self.vae.encode(images if images.dtype == dtype else images.to(dtype)).latent_dist
        mean = posterior.mean
        return (mean if mean.dtype == torch.float32 else mean.float()) * self.scaling_factor


class VaeDecoderGraph(torch.nn.Module):
    """float32 latents -> float32 images, the VAE computing in its own dtype (as `ICDModel.decode_latents`)."""

    def __init__(self, vae: DiffusersModule, scaling_factor: float):
        super().__init__()
        self.vae, self.scaling_factor = vae, scaling_factor

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = _module_dtype(self.vae)
        scaled = latents / self.scaling_factor
        sample = self.vae.decode(scaled if scaled.dtype == dtype else scaled.to(dtype)).sample
        return (sample if sample.dtype == torch.float32 else sample.float()).clamp(-1, 1)


class TextEncoderGraph(torch.nn.Module):
    """What `ICDModel.encode_prompt` takes from one encoder: last (SD1.5) or penultimate (SDXL) hidden states."""

    def __init__(self, encoder: torch.nn.Module, penultimate: bool, pooled: bool):
        super().__init__()
        self.encoder, self.penultimate, self.pooled = encoder, penultimate, pooled

    def forward(self, input_ids: torch.Tensor) -> Any:
        output = self.encoder(input_ids, output_hidden_states=self.penultimate)
        hidden = output.hidden_states[-2] if self.penultimate else output[0]
        return (hidden, output[0]) if self.pooled else hidden
