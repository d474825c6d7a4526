"""ONNX export of an `ICDModel`: forward/reverse (and teacher) UNets, VAE encoder and decoder, text encoders.

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
  (P, 1), see `icdcli.diffusion.p2p.StepControl` - and edit the last 2P rows of the batch (source, target interleaved;
  real CFG's unconditional rows come first and are left alone). A second output, `blend_maps` (P, 2, R*R, L),
  is the sum over layers of the head-averaged cross-attention maps at local blend's resolution R. Its
  spatial size is static (the model's native latents: which layers P2P touches depends on it); the batch is
  2P, or 2P and 4P for real CFG.
- `vae_encoder`: `images` (B, 3, H, W) in [-1, 1] -> `latents`: posterior mean *times the scaling factor*
  (the clean latents the samplers use, exactly `ICDModel.encode_image`).
- `vae_decoder`: `latents` (scaled, as the samplers produce them) -> `images` in [-1, 1], clamped
  (exactly `ICDModel.decode_latents`). The VAE graphs take and give float32; inside they compute in
  `vae_graph_dtype`: fp16 for an SD1.5-family VAE in an fp16 export (as `ICDModel` runs it on CUDA,
  `icdcli.core.dtypes.vae_precision`), else float32 (SDXL's VAE overflows in fp16; graphs have no bfloat16).
- `text_encoder` (and `text_encoder_2` for SDXL): `input_ids` (B, L) int32 -> `hidden_states` (the last
  layer for SD1.5, the penultimate for SDXL) and, for SDXL's second encoder, `pooled` (the projected text
  embedding).

fp16 export (`precision="fp16"`) is meant for TensorRT strongly typed networks and ONNX Runtime's CUDA
execution provider; onnxruntime's CPU provider lacks fp16 kernels for most of these ops, so it need not run
there. Graph clean-up: the TorchScript exporter's constant folding, then (fp32) onnxruntime's offline
basic-level optimisation (constant folding, redundant-node removal; provider independent), then the sanitising
TensorRT builds want - polygraphy's constant folding (or onnx-graphsurgeon's where polygraphy is missing) - and
onnx shape inference. Graphs over 2 GB keep their weights in one external `<graph>.onnx.data` file.

Normalisation in fp16 exports: TensorRT >= 10.12 builds strongly typed, so a GroupNorm or LayerNorm of an fp16
graph runs in fp16, where older weakly typed builds kept it in fp32. `fp32_norm=True` (the default of fp16 exports,
`DEFAULT_FP32_NORM`) exports those layers with fp32 inputs and weights (casts around them), keeping their old
precision, and computes the P2P graph's attention softmax in fp32; `fp32_norm=False` (`--no-fp32-norm`) leaves
them in fp16, for when a measurement shows fp16 safe.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from icdcli.core.digests import files_sha256
from icdcli.core.dtypes import TORCH_DTYPES, dtype_name, vae_precision
from icdcli.export.files import atomic_folder, folder_size
from icdcli.export.manifest import (
    DEFAULT_FP32_NORM,
    DEFAULT_OPSET,
    FORWARD,
    GUIDANCE_CFG,
    GUIDANCE_EMBEDDING,
    GUIDANCE_FOLDED,
    MANIFEST,
    P2P_BATCH,
    P2P_CONTROL_INPUTS,
    P2P_PAIRS,
    PRECISIONS,
    REVERSE,
    REVERSE_P2P,
    TEACHER,
    VAE_DECODER,
    VAE_ENCODER,
    GraphSpec,
    Manifest,
    TensorSpec,
    model_fingerprint,
    model_key,
    versions,
    write_manifest,
)
from icdcli.models.api import DiffusersModule

if TYPE_CHECKING:
    from icdcli.models.runtime import ICDModel

logger = logging.getLogger("icd")

PROTOBUF_LIMIT = 2_000_000_000
"""Above this many bytes of weights a graph keeps them in an external data file (protobuf's 2 GB cap)."""
EXAMPLE_LATENT = 8
BATCH, LATENT_H, LATENT_W, HEIGHT, WIDTH = "batch", "latent_height", "latent_width", "height", "width"


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.float16 if precision == "fp16" else torch.float32


# --- graph wrappers -------------------------------------------------------------------------------------


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
        from icdcli.diffusion.p2p import install_p2p_processors

        install_p2p_processors(unet)
        self.blend_size, self.text_length = blend_size, text_length

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        from icdcli.diffusion.p2p import StepControl

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


# --- what each graph looks like ---------------------------------------------------------------------------


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
    from icdcli.diffusion.p2p import blend_resolution

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


def vae_graph_dtype(family: str, precision: str) -> torch.dtype:
    """The dtype a VAE graph computes in: `vae_precision` on CUDA for fp16 exports (which only CUDA runs: TensorRT,
    ONNX Runtime's CUDA provider), without bfloat16 (graphs have none: SDXL's stays float32); float32 for fp32."""
    if precision != "fp16":
        return torch.float32
    return TORCH_DTYPES[vae_precision(family, "cuda", bf16=False)]


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


# --- export steps ---------------------------------------------------------------------------------------


def _group_norm_fp32(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return torch.nn.functional.group_norm(x.float(), norm.num_groups, weight, bias, norm.eps).to(x.dtype)


def _layer_norm_fp32(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return torch.nn.functional.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


@contextlib.contextmanager
def softmax_in_fp32(module: torch.nn.Module) -> Iterator[int]:
    """While open, every attention layer of `module` that computes its probabilities explicitly (the P2P graph's
    processors, through `icdcli.diffusion.p2p.attention_probabilities`) takes the softmax in fp32 (`upcast_softmax`);
    fused attention ignores the flag. Restored afterwards. Yields how many layers it set."""
    changed = []
    for layer in module.modules():
        if getattr(layer, "upcast_softmax", None) is False:
            setattr(layer, "upcast_softmax", True)  # noqa: B010 (a plain attribute of diffusers' Attention)
            changed.append(layer)
    try:
        yield len(changed)
    finally:
        for layer in changed:
            setattr(layer, "upcast_softmax", False)  # noqa: B010


@contextlib.contextmanager
def norms_in_fp32(module: torch.nn.Module) -> Iterator[int]:
    """While open, every GroupNorm and LayerNorm of `module` computes in fp32 (inputs and weights cast up, the
    result cast back). Nothing of the module is changed afterwards. Yields how many layers it covers."""
    patched = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.GroupNorm):
            setattr(layer, "forward", partial(_group_norm_fp32, layer))  # noqa: B010 (an instance attribute)
        elif isinstance(layer, torch.nn.LayerNorm):
            setattr(layer, "forward", partial(_layer_norm_fp32, layer))  # noqa: B010 (an instance attribute)
        else:
            continue
        patched.append(layer)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            del layer.forward


def route_polygraphy_logs() -> None:
    """polygraphy prints its messages (and TensorRT's, through its logger) to stdout, where icd writes results:
    send them to Python logging instead ("Polygraphy": warnings reach stderr), without its colour-module probe."""
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:
        return
    G_LOGGER.colors = False
    if hasattr(type(G_LOGGER), "use_python_logging_system"):  # polygraphy >= 0.50
        G_LOGGER.use_python_logging_system = True


@contextlib.contextmanager
def polygraphy_quiet() -> Iterator[None]:
    """While polygraphy runs: its logs routed (see `route_polygraphy_logs`), anything else it prints to stderr."""
    route_polygraphy_logs()
    with contextlib.redirect_stdout(sys.stderr):
        yield


def fold_constants(proto: Any, large: bool) -> tuple[Any, str | None]:
    """The graph with constants folded for TensorRT: polygraphy's folding, else onnx-graphsurgeon's, else as it is.

    Returns the graph and the tool that folded it (None: neither is installed)."""
    try:
        from polygraphy.backend.onnx import fold_constants as polygraphy_fold
    except ImportError:
        polygraphy_fold = None
    if polygraphy_fold is not None:
        # shape inference on an in-memory graph over 2 GB fails (protobuf's limit): fold without it then
        with polygraphy_quiet():
            return polygraphy_fold(proto, do_shape_inference=not large, error_ok=True), "polygraphy"
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        return proto, None
    graph = gs.import_onnx(proto)
    graph.fold_constants(error_ok=True).cleanup()
    return gs.export_onnx(graph), "onnx-graphsurgeon"


def torch_export(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], *, inputs: list[TensorSpec], outputs: list[TensorSpec],
    path: Path, opset: int,
) -> None:  # fmt: skip
    """torch.onnx.export through the TorchScript tracer (dynamo=False): dependable for diffusers UNets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=[spec.name for spec in inputs],
            output_names=[spec.name for spec in outputs],
            dynamic_axes=dynamic_axes(inputs + outputs),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def ort_optimize(source: Path, target: Path, *, large: bool) -> None:
    """onnxruntime's offline basic-level optimisation (constant folding, redundant nodes): portable to any EP."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    if large:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def external_files(proto: Any) -> set[str]:
    """Names of the external data files a graph's tensors point into (read from the graph, not from the data)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return {
        entry.value
        for tensor in _get_all_tensors(proto)
        if uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }


EXTERNAL_ALIGNMENT = 4096
"""Each external tensor starts at a multiple of this (a page): ONNX Runtime can then map weights rather than copy."""


def _external_entries(tensor: Any) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _set_external(tensor: Any, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def move_graph(source: Path, target: Path, *, chunk: int = 64 << 20) -> str | None:
    """Write the graph `source` as `target` with every external weight in one file `<target>.data`, without ever
    holding the weights in memory: only the small graph proto is read; the weights are copied file to file, a chunk
    at a time (or the one file moved, when onnxruntime's optimiser already wrote them so). Returns the external
    data file name; None, writing nothing, when the graph keeps its weights inline."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    proto = onnx.load(str(source), load_external_data=False)
    tensors = [tensor for tensor in _get_all_tensors(proto) if uses_external_data(tensor)]
    if not tensors:  # weights inline (under 2 GB, so loading them is harmless): nothing to move
        return None
    external = target.name + ".data"
    files = {_external_entries(tensor)["location"] for tensor in tensors}

    def span(entries: dict[str, str]) -> tuple[int, int]:
        offset = int(entries.get("offset", 0))
        if "length" in entries:
            return offset, int(entries["length"])
        return offset, (source.parent / entries["location"]).stat().st_size - offset  # the whole file is the tensor

    if len(files) == 1:
        for tensor in tensors:
            _set_external(tensor, external, *span(_external_entries(tensor)))
        shutil.move(str(source.parent / files.pop()), str(target.parent / external))
    else:  # the TorchScript exporter writes one file per weight: gather them into one
        with open(target.parent / external, "wb") as out:
            for tensor in tensors:
                entries = _external_entries(tensor)
                out.write(b"\0" * (-out.tell() % EXTERNAL_ALIGNMENT))
                start_in, length = span(entries)
                offset = out.tell()
                with open(source.parent / entries["location"], "rb") as handle:
                    handle.seek(start_in)
                    for start in range(0, length, chunk):
                        out.write(handle.read(min(chunk, length - start)))
                _set_external(tensor, external, offset, length)
    onnx.save_model(proto, str(target))
    return external


def save_graph(source: Path, target: Path, *, large: bool, sanitize: bool = False) -> str | None:
    """Write `source` (with any external data beside it) as `target`, weights in one external file if large,
    constants folded if `sanitize`, then run onnx shape inference and the checker on the file (on the path: a graph
    over 2 GB cannot be checked in memory). Returns the external data file name, if any.

    A large graph that needs no folding is written by `move_graph`, its weights never read into memory: at SD1.5
    size each copy would be 3.4 GB (SDXL's 10 GB) beside the model being exported.
    """
    import onnx

    external = move_graph(source, target) if large and not sanitize else None
    if external is None:
        proto = onnx.load(str(source), load_external_data=True)
        if sanitize:
            proto, _ = fold_constants(proto, large)
        external = target.name + ".data" if large else None
        onnx.save_model(
            proto, str(target), save_as_external_data=large, all_tensors_to_one_file=True, location=external,
            size_threshold=1024,
        )  # fmt: skip
        del proto
    onnx.shape_inference.infer_shapes_path(str(target), str(target))
    onnx.checker.check_model(str(target))
    return external


def export_graph(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], spec: GraphSpec, *, folder: Path, opset: int,
    optimize: bool, sanitize: bool = False, fp32_norm: bool = False,
) -> GraphSpec:  # fmt: skip
    """Trace, clean up and save one graph into `folder`; fill in its file hash."""
    work = folder / f".work-{spec.name}"
    try:
        raw = work / "raw" / "model.onnx"
        with contextlib.ExitStack() as precise:
            if fp32_norm:
                precise.enter_context(norms_in_fp32(module))
                precise.enter_context(softmax_in_fp32(module))
            torch_export(module, args, inputs=spec.inputs, outputs=spec.outputs, path=raw, opset=opset)
        large = folder_size(raw.parent) > PROTOBUF_LIMIT
        source = raw
        if optimize:
            source = work / "optimized" / "model.onnx"
            source.parent.mkdir()
            ort_optimize(raw, source, large=large)
        target = folder / spec.file
        spec.external_data = save_graph(source, target, large=large, sanitize=sanitize)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = [folder / spec.file] + ([folder / spec.external_data] if spec.external_data else [])
    spec.sha256 = files_sha256(files)
    return spec


def sanitizer_available() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in ("polygraphy", "onnx_graphsurgeon"))


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The module in `dtype`, copied only when the model holds it in another dtype (never modify the caller's)."""
    current = next(module.parameters()).dtype
    return module if current == dtype else copy.deepcopy(module).to(dtype)


def _graph(
    cls: Callable[..., torch.nn.Module], module: torch.nn.Module, dtype: torch.dtype, *args: Any
) -> torch.nn.Module:
    """`cls` around `module` in `dtype`, built when the export reaches it (a cast may copy the module)."""
    return cls(_cast(module, dtype), *args)


def plan_graphs(
    model: ICDModel, precision: str, *, include_teacher: bool, p2p: bool | None = None
) -> list[tuple[GraphSpec, Callable[[], Any]]]:
    """(spec, module factory) for every graph of the model; modules are built lazily, one at a time.

    `p2p` (default: for SD1.5-family models, whose edits default to Prompt-to-Prompt) adds the
    reverse P2P graph at the model's native size.
    """
    dtype = precision_dtype(precision)
    text_length = int(model.tokenizers[0].model_max_length)
    channels = model.latent_channels
    planned: list[tuple[GraphSpec, Callable[[], Any]]] = []
    unets = [(FORWARD, model.forward_unet), (REVERSE, model.reverse_unet)]
    if include_teacher and model.teacher_unet is not None:
        unets.append((TEACHER, model.teacher_unet))
    for role, unet in unets:
        inputs, outputs, guidance = unet_specs(
            unet, role, latent_channels=channels, text_length=text_length, dtype=dtype
        )
        names = [spec.name for spec in inputs]
        spec = GraphSpec(role, f"{role}.onnx", inputs, outputs, guidance)
        planned.append((spec, partial(_graph, UNetGraph, unet, dtype, names, guidance)))
    from icdcli.models.runtime import SDXL

    if p2p if p2p is not None else model.info.family != SDXL:
        latent_side = model.info.native_size // model.vae_scale_factor
        inputs, outputs, guidance, blend = p2p_unet_specs(
            model.reverse_unet, latent_channels=channels, text_length=text_length, dtype=dtype, latent_side=latent_side
        )
        names = [spec.name for spec in inputs]
        spec = GraphSpec(REVERSE_P2P, f"{REVERSE_P2P}.onnx", inputs, outputs, guidance)
        graph = partial(_graph, P2PUNetGraph, model.reverse_unet, dtype, names, guidance, blend, text_length)
        planned.append((spec, graph))
    scaling = float(model.info.scaling_factor)
    vae_dtype = vae_graph_dtype(model.info.family, precision)
    for name, (inputs, outputs) in vae_specs(channels).items():
        cls = VaeEncoderGraph if name == VAE_ENCODER else VaeDecoderGraph
        vae_graph = GraphSpec(name, f"{name}.onnx", inputs, outputs)
        planned.append((vae_graph, partial(_graph, cls, model.vae, vae_dtype, scaling)))
    xl = len(model.text_encoders) > 1
    for index, encoder in enumerate(model.text_encoders):
        name = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        pooled = xl and index == len(model.text_encoders) - 1
        inputs, outputs = text_specs(encoder, text_length, pooled=pooled, dtype=dtype)
        planned.append(
            (
                GraphSpec(name, f"{name}.onnx", inputs, outputs),
                partial(_graph, TextEncoderGraph, encoder, dtype, xl, pooled),
            )
        )
    return planned


def _example_sizes(vae_scale_factor: int) -> dict[str, int]:
    """Sizes of the dynamic axes in the example inputs a graph is traced with."""
    sizes = {BATCH: 2, P2P_BATCH: 4, P2P_PAIRS: 2, LATENT_H: EXAMPLE_LATENT, LATENT_W: EXAMPLE_LATENT}
    return sizes | {HEIGHT: EXAMPLE_LATENT * vae_scale_factor, WIDTH: EXAMPLE_LATENT * vae_scale_factor}


def export_model(
    model: ICDModel,
    out_dir: str | Path | None = None,
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    include_teacher: bool = True,
    optimize: bool | None = None,
    progress: Callable[[str], None] | None = None,
    p2p: bool | None = None,
    sanitize: bool | None = None,
    fp32_norm: bool | None = None,
) -> Path:
    """Export every graph of `model` into `out_dir` (default: the cache) with a manifest; atomic.

    Args:
        model: The PyTorch model to export.
        out_dir: Where the folder goes; `default_export_dir` when None.
        precision: `fp32` or `fp16`.
        opset: The ONNX opset.
        include_teacher: Also export the teacher UNet (the DDIM baseline on a graph backend).
        optimize: Run onnxruntime's offline basic optimisation (default: fp32 only; it needs CPU kernels for
            every op and so cannot load most fp16 graphs).
        progress: Called with a line per graph.
        p2p: Also export the reverse UNet with Prompt-to-Prompt control (default: where the model can take it).
        sanitize: Fold constants for TensorRT (default: where polygraphy or onnx-graphsurgeon is installed).
        fp32_norm: Keep GroupNorm/LayerNorm (and the P2P softmax) of fp16 graphs in fp32; None: DEFAULT_FP32_NORM.
    """
    say = progress or (lambda message: None)
    precision_dtype(precision)
    fingerprint = model_fingerprint(model)
    key = model_key(model.info.name, fingerprint, precision)
    if out_dir is None:
        from icdcli.export.manifest import export_root

        out_dir = export_root() / key
    optimize = precision == "fp32" if optimize is None else optimize
    sanitize = sanitizer_available() if sanitize is None else sanitize
    fp32_norm = (DEFAULT_FP32_NORM if fp32_norm is None else fp32_norm) and precision == "fp16"
    device = model.device
    text_length = int(model.tokenizers[0].model_max_length)
    factor = model.vae_scale_factor
    sizes = _example_sizes(factor)
    graphs: dict[str, GraphSpec] = {}
    with atomic_folder(out_dir, markers=(MANIFEST,)) as staging:  # never over a model folder or the user's own
        for spec, build in plan_graphs(model, precision, include_teacher=include_teacher, p2p=p2p):
            say(f"exporting {spec.name} ({precision}, opset {opset})")
            module = build().eval()
            graphs[spec.name] = export_graph(
                module,
                example_inputs(spec.inputs, sizes, device),
                spec,
                folder=staging,
                opset=opset,
                optimize=optimize,
                sanitize=sanitize,
                fp32_norm=fp32_norm,
            )
            del module
        manifest = Manifest(
            model_key=key,
            fingerprint=fingerprint,
            precision=precision,
            opset=opset,
            info=model.info.to_json(),
            vae_scale_factor=factor,
            latent_channels=model.latent_channels,
            text_length=text_length,
            graphs=graphs,
            versions=versions(),
            sanitized=sanitize,
            fp32_norm=fp32_norm,
            vae_precision=dtype_name(vae_graph_dtype(model.info.family, precision)),
        )
        write_manifest(staging, manifest)
    say(f"exported {len(graphs)} graphs to {out_dir}")
    return Path(out_dir)


def add_graphs(
    model: ICDModel,
    folder: str | Path,
    manifest: Manifest,
    *,
    names: list[str],
    progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Export only the graphs `names` of `model` into its existing export `folder` (the teacher, when a later
    `--sampler ddim` needs it) and record them in the manifest, written last and atomically: the graphs
    already there are neither traced again nor touched."""
    from icdcli.io.atomic import atomic_path

    say = progress or (lambda message: None)
    folder = Path(folder)
    planned = {
        spec.name: (spec, build)
        for spec, build in plan_graphs(model, manifest.precision, include_teacher=True, p2p=False)
    }
    missing = [name for name in names if name not in planned]
    if missing:
        raise ValueError(f"the model has no graph {missing[0]!r} to export")
    graphs = dict(manifest.graphs)
    for name in names:
        spec, build = planned[name]
        say(f"exporting {name} ({manifest.precision}, opset {manifest.opset}) beside the graphs already exported")
        module = build().eval()
        inputs = example_inputs(spec.inputs, _example_sizes(model.vae_scale_factor), model.device)
        optimize = manifest.precision == "fp32"
        graphs[name] = export_graph(
            module, inputs, spec, folder=folder, opset=manifest.opset, optimize=optimize,
            sanitize=manifest.sanitized, fp32_norm=manifest.fp32_norm,
        )  # fmt: skip
        del module
    updated = replace(manifest, graphs=graphs)
    with atomic_path(folder / MANIFEST) as temporary:
        write_manifest(temporary.parent, updated, name=temporary.name)
    return updated
