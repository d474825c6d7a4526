"""What every backend shares: graph runners behind the denoiser interface, text encoding and the VAE.

A *runner* is any callable `runner(feeds: dict[str, Tensor]) -> dict[str, Tensor]` over one exported graph
(an onnxruntime session, a TensorRT engine). The classes here turn runners into the pieces `AcceleratedModel`
swaps into an `ICDModel`: denoisers, a prompt encoder, VAE encode/decode.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from icdcli.core.errors import ICDError
from icdcli.diffusion.denoiser import (
    Conditioning,
    ControlledDenoiser,
    ControlledEps,
    Guidance,
    PromptEmbedding,
    expand_batch,
    guided_eps,
    is_unguided,
)
from icdcli.export.manifest import (
    GUIDANCE_CFG,
    GUIDANCE_EMBEDDING,
    GUIDANCE_FOLDED,
    P2P_CONTROL_INPUTS,
    GraphSpec,
)

if TYPE_CHECKING:
    from icdcli.diffusion.p2p.control import StepControl

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class BackendUnavailable(ICDError):
    """A graph cannot run on this backend (an engine that failed to build or load): the caller falls back."""


class ShapeNotCovered(BackendUnavailable):
    """A backend cannot run these shapes (for TensorRT: outside every optimisation profile of the engine)."""


class EngineFailed(BackendUnavailable):
    """A loaded engine failed at run time (a refused profile, shape or address, a failed enqueue, an allocation, or
    non-finite outputs): it is dropped, and this call and every later one of its graph run on the next backend."""


def unet_feeds(
    spec: GraphSpec, x: torch.Tensor, t: int, prompt: PromptEmbedding, time_ids: torch.Tensor | None,
    timestep_cond: torch.Tensor | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The named inputs of a UNet graph for latents `x` at timestep `t`."""
    batch = x.shape[0]
    feeds = {
        "sample": x,
        "timestep": torch.full((batch,), float(t), dtype=torch.float32, device=x.device),
        "encoder_hidden_states": expand_batch(prompt.hidden_states, batch),
    }
    if spec.input("timestep_cond") is not None:
        if timestep_cond is None:
            raise ValueError(f"{spec.name} takes timestep_cond")
        feeds["timestep_cond"] = timestep_cond
    if spec.input("text_embeds") is not None:
        if prompt.pooled is None or time_ids is None:
            raise ValueError("SDXL conditioning needs a pooled embedding and time_ids")
        feeds["text_embeds"] = expand_batch(prompt.pooled, batch)
        feeds["time_ids"] = expand_batch(time_ids, batch)
    return feeds


def stacked_control(control: StepControl) -> dict[str, torch.Tensor]:
    """The P2P graph's control inputs, each with its leading pair axis (one pair's control gets an axis of 1)."""
    one_pair = control.mapper.ndim == 2
    return {
        name: getattr(control, name).unsqueeze(0) if one_pair else getattr(control, name) for name in P2P_CONTROL_INPUTS
    }


class GraphDenoiser:
    """An exported UNet graph behind the denoiser interface `denoiser(x, t, cond, guidance)`.

    Guidance follows the graph (see `icdcli.export.signatures`): "embedding" graphs take w as `timestep_cond`
    (one batch-1 evaluation per step), "folded" graphs are the unguided forward model (w must be 1),
    "cfg" graphs run real classifier-free guidance with a batch of two on guided steps only.
    Attention control (Prompt-to-Prompt, `controlled`) runs in `p2p` (the runner of the reverse P2P graph,
    with its spec) when there is one for these shapes; otherwise it goes to `fallback` (the torch UNet).
    """

    backend = "graph"

    def __init__(
        self,
        runner: Runner,
        spec: GraphSpec,
        *,
        fallback: ControlledDenoiser | None = None,
        p2p: tuple[Runner, GraphSpec] | None = None,
    ):
        self.runner = runner
        self.spec = spec
        self.fallback = fallback
        self.p2p = p2p
        self.exclusive = False  # low memory: the plain and the P2P graph are never open at once
        self._told: set[str] = set()
        cond = spec.input("timestep_cond")
        self.guidance_dim = None if cond is None else int(cond.shape[-1])

    def _evaluate(self, x, t, prompt, time_ids, timestep_cond) -> torch.Tensor:
        return self.runner(unet_feeds(self.spec, x, t, prompt, time_ids, timestep_cond))["eps"].to(x.dtype)

    def _fall_back(self, why: str, *, dropped: bool = False) -> ControlledDenoiser:
        """The torch denoiser that runs what the graph cannot (`why`), said once per reason; `dropped`: the graph's
        engine failed and is gone, so every later step runs there too (said as a warning)."""
        if self.fallback is None:
            raise ICDError(f"{why} cannot run on the {self.backend} backend: use --backend torch")
        if why not in self._told:
            self._told.add(why)
            log = logging.getLogger("icd")
            if dropped:
                log.warning("%s: the engine is dropped and %s runs on PyTorch from here on", why, self.spec.name)
            else:
                log.info("%s: these steps of %s run on PyTorch", why, self.spec.name)
        return self.fallback

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance = 1.0) -> torch.Tensor:
        try:
            eps = self._guided(x, t, cond, guidance)
        except BackendUnavailable as error:
            return self._fall_back(str(error), dropped=isinstance(error, EngineFailed))(x, t, cond, guidance)
        release = getattr(self.fallback, "release", None)
        if release is not None:  # the graph runs: a fallback that can free its GPU memory does so now
            release()
        return eps

    def release(self) -> None:
        """Free what this denoiser's graphs hold (sessions reopen on their next use; runners without a release,
        such as TensorRT engines sized at build time, keep theirs)."""
        for runner in (self.runner, self.p2p[0] if self.p2p else None):
            release_runner(runner)

    def install_control(self) -> None:
        """The P2P graph has the control inside; the torch fallback gets its processors for the steps it may take."""
        if self.fallback is not None:
            self.fallback.install_control()

    def controlled(
        self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance, control: StepControl
    ) -> ControlledEps:
        reason = self._p2p_mismatch(x)
        if reason is None:
            try:
                return self._p2p_guided(x, t, cond, guidance, control)
            except BackendUnavailable as error:
                return self._fall_back(str(error), dropped=isinstance(error, EngineFailed)).controlled(
                    x, t, cond, guidance, control
                )
        return self._fall_back(reason).controlled(x, t, cond, guidance, control)

    def _p2p_mismatch(self, x: torch.Tensor) -> str | None:
        """Why these latents cannot run in the P2P graph, or None when they can."""
        if self.p2p is None:
            return "attention control (Prompt-to-Prompt) without an exported P2P graph"
        mapper, sample = self.p2p[1].input("mapper"), self.p2p[1].input("sample")
        if mapper is None or sample is None or len(mapper.shape) != 3:  # export format 2: no pair axis
            return "a P2P graph of an older export (no pair axis): run icd export again"
        if list(x.shape[2:]) != list(sample.shape[2:]):
            return f"Prompt-to-Prompt at latents {tuple(x.shape[2:])}: the P2P graph was exported at the native size"
        return None

    def _p2p_guided(
        self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance, control: StepControl
    ) -> ControlledEps:
        """Every (source, target) pair of the batch in one call of the P2P graph (its control has a pair axis)."""
        assert self.p2p is not None, "called only when _p2p_mismatch found the P2P graph fit"
        runner, spec = self.p2p
        if self.exclusive:
            release_runner(self.runner)
        feeds_control = stacked_control(control)
        collected: list[torch.Tensor] = []

        def evaluate(
            xx: torch.Tensor, prompt: PromptEmbedding, time_ids: torch.Tensor | None, timestep_cond: torch.Tensor | None
        ) -> torch.Tensor:
            feeds = unet_feeds(spec, xx, t, prompt, time_ids, timestep_cond)
            outputs = runner({**feeds, **{k: v.to(xx.device) for k, v in feeds_control.items()}})
            maps = outputs["blend_maps"]  # (P, 2, Q, L): back to the rows (source 1, target 1, source 2, ...)
            collected.append(maps.reshape(-1, *maps.shape[2:]))
            return outputs["eps"].to(xx.dtype)

        eps = guided_eps(evaluate, x, cond, guidance, self.guidance_dim)
        return ControlledEps(eps, tuple(collected) if control.blend_queries is not None else ())

    def _guided(self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance) -> torch.Tensor:
        mode = self.spec.guidance
        if mode not in (GUIDANCE_EMBEDDING, GUIDANCE_FOLDED, GUIDANCE_CFG):
            raise ValueError(f"{self.spec.name}: unknown guidance mode {mode!r}")
        if mode == GUIDANCE_FOLDED and not is_unguided(guidance):
            raise ValueError(f"{self.spec.name} has w = 1 folded in; it cannot run at guidance {guidance}")
        if self.exclusive and self.p2p is not None:
            release_runner(self.p2p[0])
        return guided_eps(
            lambda xx, prompt, time_ids, timestep_cond: self._evaluate(xx, t, prompt, time_ids, timestep_cond),
            x,
            cond,
            guidance,
            self.guidance_dim if mode == GUIDANCE_EMBEDDING else None,
        )


def release_runner(runner: Runner | None) -> None:
    """Let a runner free its session's memory if it can (it opens again on its next call)."""
    release = getattr(runner, "release", None)
    if release is not None:
        release()


@dataclass
class BackendParts:
    """Everything a backend runs for an `AcceleratedModel`. `teacher` is None when it was not exported."""

    name: str
    forward: GraphDenoiser
    reverse: GraphDenoiser
    teacher: GraphDenoiser | None
    text_encoders: list[Runner]
    vae_encoder: Runner
    vae_decoder: Runner
    runners: dict[str, Runner] = field(default_factory=dict)
    """Every graph's runner by graph name (the same objects the pieces above hold)."""

    def fallback_notes(self) -> dict[str, str]:
        """Graph name -> why that graph no longer runs on this backend (an engine that failed to build or load, or
        was dropped after a failure at run time), for every graph a runner recorded such a failure for."""
        notes = {}
        for name, runner in self.runners.items():
            failure = getattr(runner, "failure", None)
            if failure is not None:
                notes[name] = str(failure)
        return notes


def encode_ids(text_runners: list[Runner], ids: list[torch.Tensor]) -> PromptEmbedding:
    """Run the text graphs on token ids: hidden states concatenated, the last encoder's pooled embedding."""
    hidden, pooled = [], None
    for runner, token_ids in zip(text_runners, ids, strict=True):
        outputs = runner({"input_ids": token_ids})
        hidden.append(outputs["hidden_states"])
        pooled = outputs.get("pooled", pooled)
    return PromptEmbedding(torch.cat(hidden, dim=-1), pooled)


def resolve_shape(spec_shape: list[int | str], axes: dict[str, int], vae_scale_factor: int) -> tuple[int, ...]:
    """A concrete shape for a symbolic one, given the axis sizes read off the inputs.

    Pixel axes follow from latent ones (and back) through the VAE's scale factor.
    """
    known = dict(axes)
    for pixel, latent in (("height", "latent_height"), ("width", "latent_width")):
        if latent in known and pixel not in known:
            known[pixel] = known[latent] * vae_scale_factor
        if pixel in known and latent not in known:
            known[latent] = known[pixel] // vae_scale_factor
    return tuple(known[dim] if isinstance(dim, str) else int(dim) for dim in spec_shape)


def axes_of(spec_inputs: list, feeds: dict[str, torch.Tensor]) -> dict[str, int]:
    """Axis sizes named by the graph's symbolic input shapes, read off the actual inputs."""
    axes: dict[str, int] = {}
    for spec in spec_inputs:
        tensor = feeds[spec.name]
        for dim, size in zip(spec.shape, tensor.shape, strict=True):
            if isinstance(dim, str):
                axes[dim] = int(size)
    return axes


def assemble_parts(
    name: str,
    manifest: Any,
    make_runner: Callable[[GraphSpec], Runner],
    *,
    denoiser_class: type[GraphDenoiser],
    fallbacks: dict[str, ControlledDenoiser],
) -> BackendParts:
    """Runners for every graph of an export, wrapped as the pieces of `BackendParts`."""
    from icdcli.export.manifest import FORWARD, REVERSE, REVERSE_P2P, TEACHER, VAE_DECODER, VAE_ENCODER

    graphs = manifest.graphs
    runners: dict[str, Runner] = {}

    def runner(spec: GraphSpec) -> Runner:
        if spec.name not in runners:
            runners[spec.name] = make_runner(spec)
        return runners[spec.name]

    def denoiser(role: str) -> GraphDenoiser | None:
        if role not in graphs:
            return None
        p2p = None
        if role == REVERSE and REVERSE_P2P in graphs:
            p2p = (runner(graphs[REVERSE_P2P]), graphs[REVERSE_P2P])
        return denoiser_class(runner(graphs[role]), graphs[role], fallback=fallbacks.get(role), p2p=p2p)

    text_names = sorted(graph for graph in graphs if graph.startswith("text_encoder"))
    forward, reverse = denoiser(FORWARD), denoiser(REVERSE)
    if forward is None or reverse is None:
        raise ICDError("the export has no forward or reverse UNet graph: delete it and run icd export again")
    return BackendParts(
        name=name,
        forward=forward,
        reverse=reverse,
        teacher=denoiser(TEACHER),
        text_encoders=[runner(graphs[graph]) for graph in text_names],
        vae_encoder=runner(graphs[VAE_ENCODER]),
        vae_decoder=runner(graphs[VAE_DECODER]),
        runners=runners,
    )
