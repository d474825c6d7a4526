"""What a model must offer to be edited: `EditModel`, the seam between the use cases (`editing`, the batch
runner, the benchmarks) and what runs the networks.

`ICDModel` (PyTorch modules) and `AcceleratedModel` (ONNX Runtime or TensorRT graphs in front of an
`ICDModel`) both satisfy it; the use cases are typed against it, not against either class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from icdcli.diffusion.recipe import SDXL

if TYPE_CHECKING:
    import torch

    from icdcli.diffusion.denoiser import Conditioning, Denoiser, PromptEmbedding
    from icdcli.models.info import ModelInfo

DiffusersModule = Any
"""A diffusers or transformers model (UNet, VAE, CLIP): a torch module whose `config`, `save_pretrained` and
call signatures torch's own type does not describe."""


class EditModel(Protocol):
    """A loaded iCD model: its metadata, tokenizers, denoisers, prompt encoding and VAE."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def source(self) -> str:
        """The folder it was loaded from ("" for a model built in memory)."""
        ...

    @property
    def tokenizers(self) -> list[Any]: ...

    @property
    def vae_scale_factor(self) -> int: ...

    @property
    def latent_channels(self) -> int: ...

    @property
    def forward_denoiser(self) -> Denoiser: ...

    @property
    def reverse_denoiser(self) -> Denoiser: ...

    @property
    def teacher_denoiser(self) -> Denoiser: ...

    @property
    def teacher_unet(self) -> torch.nn.Module | None:
        """The teacher's PyTorch UNet, None for a model loaded without it (no DDIM baseline)."""
        ...

    def prompt_token_count(self, text: str) -> tuple[int, int]: ...

    def encode_prompt(self, text: str | list[str]) -> PromptEmbedding: ...

    def conditioning(
        self, prompt: str | list[str], height: int, width: int, with_negative: bool = False
    ) -> Conditioning: ...

    def needs_negative(self, guidance: float) -> bool: ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor: ...

    low_memory: bool
    """Free each UNet's weights once its stage of an edit is over (`release`; see `icdcli.models.memory`)."""

    def release(self, role: str) -> None:
        """Free the weights of the `role` UNet ("forward", "reverse" or "teacher") until it is next used."""
        ...


def prompt_conditioning(
    model: EditModel, prompt: str | list[str], height: int, width: int, with_negative: bool = False
) -> Conditioning:
    """Conditioning for images of `height` x `width` pixels, prompts encoded by `model.encode_prompt`.

    Args:
        with_negative: also the negative prompt that real classifier-free guidance needs: SDXL's zero
            embeddings, the empty prompt's for the others. SDXL also gets its size conditioning (`time_ids`).
    """
    import torch

    from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding

    embedding = model.encode_prompt(prompt)
    sdxl = model.info.family == SDXL
    negative = None
    if with_negative and sdxl:
        assert embedding.pooled is not None, "SDXL prompt embeddings carry a pooled vector"
        zeros = torch.zeros_like(embedding.hidden_states[:1]), torch.zeros_like(embedding.pooled[:1])
        negative = PromptEmbedding(*zeros)
    elif with_negative:
        negative = model.encode_prompt("")
    time_ids = None
    if sdxl:
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=model.dtype, device=model.device)
    return Conditioning(embedding, negative, time_ids)
