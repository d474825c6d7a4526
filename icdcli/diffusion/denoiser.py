"""The seam between the sampler and the backends: a denoiser returns the noise prediction.

A denoiser is any callable `denoiser(x, t, cond, guidance) -> eps`, with `x` a batch of latents, `t` an
integer timestep, `cond` the text conditioning and `guidance` the classical classifier-free guidance scale
(1 = no guidance), one for the batch or a (B,) tensor, one per row (Prompt-to-Prompt decodes an unguided
source row beside a guided target row). PyTorch UNets, ONNX Runtime sessions and TensorRT engines each
implement it; the sampler never knows which one it drives.

A `ControlledDenoiser` also runs a step under attention control (`icdcli.diffusion.p2p.control.StepControl`) and
returns the cross-attention maps local blend reads with the noise prediction (`ControlledEps`). The sampler does not
see it either: Prompt-to-Prompt wraps one into a plain denoiser (`icdcli.diffusion.p2p.decode.P2PDenoiser`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import torch

if TYPE_CHECKING:
    from icdcli.diffusion.p2p.control import StepControl

GUIDANCE_EMBEDDING_DIM = 512


@dataclass
class PromptEmbedding:
    """Encoded text: per-token hidden states and, for SDXL, the pooled embedding."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbedding:
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return PromptEmbedding(self.hidden_states.to(device, dtype), pooled)


@dataclass
class Conditioning:
    """What a UNet is conditioned on besides latents and timestep.

    `negative` is only needed by real (two-pass) classifier-free guidance; `time_ids` only by SDXL.
    """

    prompt: PromptEmbedding
    negative: PromptEmbedding | None = None
    time_ids: torch.Tensor | None = None

    def with_prompt(self, prompt: PromptEmbedding) -> Conditioning:
        return replace(self, prompt=prompt)


Guidance = float | torch.Tensor


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance = 1.0) -> torch.Tensor: ...


@dataclass(frozen=True)
class ControlledEps:
    """What a step under attention control returns: the noise prediction, and the cross-attention maps at the
    control's `blend_queries` (one (rows, Q, L) tensor per layer or graph call, rows the batch's source and target
    rows; none when the control asks for none)."""

    eps: torch.Tensor
    maps: tuple[torch.Tensor, ...] = ()


@runtime_checkable
class ControlledDenoiser(Denoiser, Protocol):
    """A denoiser that can also run a step under Prompt-to-Prompt attention control."""

    def install_control(self) -> None:
        """Make the network ready for attention control (P2P's attention processors in a PyTorch UNet). Whoever
        runs attention control calls it once, before the first controlled step; `controlled` installs nothing."""
        ...

    def controlled(
        self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance, control: StepControl
    ) -> ControlledEps:
        """The noise prediction of the last 2P rows of `x`, P (source, target) pairs, under `control`."""
        ...


def row_guidance(guidance: Guidance, batch: int) -> torch.Tensor:
    """Guidance as a (batch,) float tensor."""
    if isinstance(guidance, torch.Tensor):
        return expand_batch(guidance.float().reshape(-1).cpu(), batch)
    return torch.full((batch,), float(guidance))


def is_unguided(guidance: Guidance) -> bool:
    if isinstance(guidance, torch.Tensor):
        return bool((guidance == 1.0).all())
    return guidance == 1.0


def guidance_scale_embedding(
    guidance: torch.Tensor, embedding_dim: int = GUIDANCE_EMBEDDING_DIM, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The `timestep_cond` of guidance-distilled UNets for classical guidance scales `guidance` (B,).

    A sinusoidal embedding (sin half, then cos half, max period 10000) of (w - 1) * 1000: the same
    function as diffusers' LCM pipelines apply to their guidance scale.
    """
    if guidance.ndim != 1:
        raise ValueError(f"guidance must be a 1-d tensor, got shape {tuple(guidance.shape)}")
    half = embedding_dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    angles = ((guidance.to(dtype) - 1.0) * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embedding_dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


def expand_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """`tensor` with batch `batch`: as it is, or its single row repeated."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] != 1:
        raise ValueError(f"conditioning batch {tensor.shape[0]} does not match latent batch {batch}")
    return tensor.expand(batch, *tensor.shape[1:])


def mix_rows(chosen: torch.Tensor, first: Conditioning, second: Conditioning) -> Conditioning:
    """Conditioning whose row i is `first`'s where `chosen[i]`, else `second`'s (prompts of one batch of edits)."""
    batch = chosen.shape[0]

    def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        if a is None or b is None:
            return a if b is None else b
        a, b = expand_batch(a, batch), expand_batch(b, batch)
        return torch.where(chosen.to(a.device).view(-1, *[1] * (a.ndim - 1)), a, b)

    hidden = pick(first.prompt.hidden_states, second.prompt.hidden_states)
    assert hidden is not None, "prompt embeddings always have hidden states"
    prompt = PromptEmbedding(hidden, pick(first.prompt.pooled, second.prompt.pooled))
    negative = first.negative if first.negative is not None else second.negative
    return Conditioning(prompt, negative, pick(first.time_ids, second.time_ids))


def take_rows(cond: Conditioning, rows: slice, batch: int) -> Conditioning:
    """The conditioning of `rows` of a batch of `batch` rows (a tensor of one row serves every row as it is)."""

    def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor if tensor is None or tensor.shape[0] != batch else tensor[rows]

    def prompt(embedding: PromptEmbedding) -> PromptEmbedding:
        hidden = pick(embedding.hidden_states)
        assert hidden is not None, "prompt embeddings always have hidden states"
        return PromptEmbedding(hidden, pick(embedding.pooled))

    negative = None if cond.negative is None else prompt(cond.negative)
    return Conditioning(prompt(cond.prompt), negative, pick(cond.time_ids))


def real_cfg(
    evaluate: Callable[[torch.Tensor, PromptEmbedding, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    cond: Conditioning,
    guidance: Guidance,
    copies: DeviceCopies | None = None,
) -> torch.Tensor:
    """Two-pass classifier-free guidance as one batch of two: eps_u + w (eps_c - eps_u).

    `evaluate(x, prompt, time_ids) -> eps` runs the network once on a batch; `copies` keeps the weights w on its
    device, made once per value.
    """
    if cond.negative is None:
        raise ValueError("classifier-free guidance on a UNet without guidance distillation needs a negative prompt")
    batch = x.shape[0]
    negative, positive = cond.negative, cond.prompt
    pair = PromptEmbedding(
        torch.cat([expand_batch(negative.hidden_states, batch), expand_batch(positive.hidden_states, batch)]),
        None
        if positive.pooled is None or negative.pooled is None
        else torch.cat([expand_batch(negative.pooled, batch), expand_batch(positive.pooled, batch)]),
    )
    time_ids = None if cond.time_ids is None else torch.cat([expand_batch(cond.time_ids, batch)] * 2)
    eps_uncond, eps_cond = evaluate(torch.cat([x, x]), pair, time_ids).chunk(2)
    rows = row_guidance(guidance, batch)
    if copies is None or copies.device != eps_cond.device:
        w = rows.to(eps_cond.device, eps_cond.dtype)
    else:
        w = copies.value(("cfg weights", tuple(rows.tolist())), lambda: rows, eps_cond.dtype)
    w = w.view(-1, *[1] * (x.ndim - 1))
    return eps_uncond + w * (eps_cond - eps_uncond)


Evaluate = Callable[[torch.Tensor, PromptEmbedding, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
"""`evaluate(x, prompt, time_ids, timestep_cond) -> eps`: one network evaluation on a batch."""


def guided_eps(
    evaluate: Evaluate,
    x: torch.Tensor,
    cond: Conditioning,
    guidance: Guidance,
    guidance_dim: int | None,
    copies: DeviceCopies | None = None,
) -> torch.Tensor:
    """The noise prediction under `guidance`, the way the network takes it.

    A guidance-distilled network (`guidance_dim` set) gets w through its guidance embedding in one
    evaluation; any other runs once on unguided steps and real CFG (a batch of two) on guided ones.
    `copies` keeps the guidance tensors on the network's device, made once per value.
    """
    if guidance_dim is not None:
        rows = row_guidance(guidance, x.shape[0])
        if copies is None:
            embedding = guidance_scale_embedding(rows, guidance_dim).to(x.device)
        else:
            key = ("guidance embedding", guidance_dim, tuple(rows.tolist()))
            embedding = copies.value(key, lambda: guidance_scale_embedding(rows, guidance_dim))
        return evaluate(x, cond.prompt, cond.time_ids, embedding)
    if is_unguided(guidance):
        return evaluate(x, cond.prompt, cond.time_ids, None)
    return real_cfg(lambda xx, prompt, time_ids: evaluate(xx, prompt, time_ids, None), x, cond, guidance, copies)


class DeviceCopies:
    """Copies of small CPU tensors (guidance embeddings, CFG weights, P2P step controls) on one device, made once
    per object or value and reused by every later step: a copy from CPU memory waits for the device, so per-step
    copies would stall a GPU at every step. Lives as long as the denoiser that made it (one stage of an edit)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._values: dict[Any, torch.Tensor] = {}

    def tensor(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`tensor` on the device (in `dtype`, default the network's), copied the first time this object is seen."""
        if tensor.device == self.device and tensor.dtype == (dtype or self.dtype):
            return tensor
        found = self._tensors.get(id(tensor))
        if found is None or found[0] is not tensor:
            found = (tensor, tensor.to(self.device, dtype or self.dtype))  # the source is held: its id stays its own
            self._tensors[id(tensor)] = found
        return found[1]

    def value(self, key: Any, make: Callable[[], torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """`make()` on the device (in `dtype`, default the network's), made once per `key` (a hashable description
        of its value)."""
        key = (key, dtype)
        if key not in self._values:
            self._values[key] = make().to(self.device, dtype or self.dtype)
        return self._values[key]

    def control(self, control: StepControl) -> StepControl:
        """A P2P step control with its tensors on the device (the plan's shared tensors copied once per edit)."""
        moved: dict[str, Any] = {name: self.tensor(getattr(control, name)) for name in CONTROL_TENSORS}
        return replace(control, **moved)


CONTROL_TENSORS = ("cross_alpha", "refine", "mapper", "reweight", "self_replace")
"""The tensor fields of `icdcli.diffusion.p2p.control.StepControl`: inputs of a controlled call."""


class UNetDenoiser:
    """A diffusers `UNet2DConditionModel` behind the denoiser interface.

    Guidance-distilled UNets (`time_cond_proj_dim` set) take w through `timestep_cond` and run one
    batch-1 evaluation per step. Other UNets run real classifier-free guidance with a batch of two
    on guided steps only. Attention control (`controlled`) runs in P2P's attention processors, which
    `install_control` puts into the UNet.

    Every call's inputs are put on the UNet's device first (small per-step tensors once per stage, see
    `DeviceCopies`); then the UNet runs eagerly, from a CUDA graph of the call (`graphs`, an
    `icdcli.models.torch_speed.GraphedCalls`) or compiled (`compiled`, a `CompiledCalls`; calls under attention
    control stay eager).
    """

    backend = "torch"

    def __init__(self, unet: torch.nn.Module, *, graphs: Any = None, compiled: Any = None):
        self.unet = unet
        self.guidance_dim: int | None = cast(Any, unet).config.time_cond_proj_dim
        self.graphs, self.compiled = graphs, compiled
        param = next(unet.parameters())
        self.copies = DeviceCopies(param.device, param.dtype)

    def _inputs(
        self,
        x: torch.Tensor,
        t: int,
        prompt: PromptEmbedding,
        time_ids: torch.Tensor | None,
        timestep_cond: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The named input tensors of one call, on the UNet's device and in its dtype."""
        copies, batch = self.copies, x.shape[0]
        inputs = {
            "sample": x.to(copies.device, copies.dtype),
            "timestep": torch.full((batch,), t, device=copies.device, dtype=torch.long),
            "encoder_hidden_states": expand_batch(prompt.hidden_states, batch).to(copies.device, copies.dtype),
        }
        if timestep_cond is not None:
            inputs["timestep_cond"] = copies.tensor(timestep_cond)
        if prompt.pooled is not None:
            if time_ids is None:
                raise ValueError("SDXL conditioning needs time_ids")
            inputs["text_embeds"] = expand_batch(prompt.pooled, batch).to(copies.device, copies.dtype)
            inputs["time_ids"] = expand_batch(copies.tensor(time_ids), batch)
        return inputs

    def _evaluate(
        self,
        x: torch.Tensor,
        t: int,
        prompt: PromptEmbedding,
        time_ids: torch.Tensor | None,
        timestep_cond: torch.Tensor | None,
        control: StepControl | None = None,
        maps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        inputs = self._inputs(x, t, prompt, time_ids, timestep_cond)
        if control is not None:
            inputs.update({f"control.{name}": getattr(control, name) for name in CONTROL_TENSORS})

        def run(module: Any, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
            found: list[torch.Tensor] = []
            attention = None
            if control is not None:
                moved: dict[str, Any] = {name: tensors[f"control.{name}"] for name in CONTROL_TENSORS}
                attention = {"control": replace(control, **moved), "blend_maps": found}
            added = None
            if "text_embeds" in tensors:
                added = {"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"]}
            with torch.no_grad():
                eps = module(
                    tensors["sample"],
                    tensors["timestep"],
                    encoder_hidden_states=tensors["encoder_hidden_states"],
                    timestep_cond=tensors.get("timestep_cond"),
                    added_cond_kwargs=added,
                    cross_attention_kwargs=attention,
                    return_dict=False,
                )[0]
            return (eps, *found)

        if self.graphs is not None:
            static = None if control is None else _control_signature(control)
            outputs = self.graphs(static, inputs, lambda tensors: run(self.unet, tensors))
        elif self.compiled is not None and control is None:
            outputs = self.compiled(inputs, run)
        else:
            outputs = run(self.unet, inputs)
        if maps is not None:
            maps.extend(outputs[1:])
        return outputs[0].to(x.dtype)

    def _guided(
        self,
        x: torch.Tensor,
        t: int,
        cond: Conditioning,
        guidance: Guidance,
        control: StepControl | None = None,
        maps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return guided_eps(
            lambda xx, prompt, time_ids, step_cond: self._evaluate(xx, t, prompt, time_ids, step_cond, control, maps),
            x,
            cond,
            guidance,
            self.guidance_dim,
            self.copies,
        )

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance = 1.0) -> torch.Tensor:
        return self._guided(x, t, cond, guidance)

    def install_control(self) -> None:
        from icdcli.diffusion.p2p.attention import install_p2p_processors

        install_p2p_processors(self.unet)

    def controlled(
        self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance, control: StepControl
    ) -> ControlledEps:
        from icdcli.diffusion.p2p.attention import has_p2p_processors

        if not has_p2p_processors(self.unet):
            raise RuntimeError("attention control needs P2P's processors in this UNet: call install_control() first")
        maps: list[torch.Tensor] = []  # the processors add the blend-resolution maps of this call
        eps = self._guided(x, t, cond, guidance, self.copies.control(control), maps)
        return ControlledEps(eps, tuple(maps))


def _control_signature(control: StepControl) -> tuple[Any, ...]:
    """What of a step control the UNet's kernels depend on besides its tensors' shapes: which layers it edits."""
    return (control.blend_queries, control.self_max_queries, control.cross_active, control.self_active)
