"""ONNX export of an `ICDModel`: forward/reverse (and teacher) UNets, VAE encoder and decoder, text encoders.

What each graph takes and gives is in `export.signatures`, the modules traced in `export.graphs`, precision (fp16,
fp32 normalisation) in `export.precision`, the clean-up in `export.cleanup`. This module plans the graphs of a
model, traces each (TorchScript, `torch.onnx.export(..., dynamo=False)`), cleans it up and writes the manifest.

fp16 export (`precision="fp16"`) is meant for TensorRT strongly typed networks and ONNX Runtime's CUDA
execution provider; onnxruntime's CPU provider lacks fp16 kernels for most of these ops, so it need not run
there. Graph clean-up: the TorchScript exporter's constant folding, then (fp32) onnxruntime's offline
basic-level optimisation (constant folding, redundant-node removal; provider independent), then the sanitising
TensorRT builds want - polygraphy's constant folding (or onnx-graphsurgeon's where polygraphy is missing) - and
onnx shape inference. Graphs over 2 GB keep their weights in one external `<graph>.onnx.data` file.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from icdcli.core.digests import files_sha256
from icdcli.core.dtypes import dtype_name
from icdcli.diffusion.recipe import SDXL
from icdcli.export.cleanup import ort_optimize, sanitizer_available, save_graph
from icdcli.export.files import atomic_folder, folder_size
from icdcli.export.graphs import P2PUNetGraph, TextEncoderGraph, UNetGraph, VaeDecoderGraph, VaeEncoderGraph
from icdcli.export.manifest import (
    DEFAULT_FP32_NORM,
    DEFAULT_OPSET,
    FORWARD,
    MANIFEST,
    P2P_BATCH,
    P2P_PAIRS,
    REVERSE,
    REVERSE_P2P,
    TEACHER,
    VAE_DECODER,
    VAE_ENCODER,
    GraphSpec,
    Manifest,
    TensorSpec,
    foreign_export_files,
    model_fingerprint,
    model_key,
    versions,
    write_manifest,
)
from icdcli.export.precision import norms_in_fp32, precision_dtype, softmax_in_fp32, vae_graph_dtype
from icdcli.export.signatures import (
    BATCH,
    EXAMPLE_LATENT,
    HEIGHT,
    LATENT_H,
    LATENT_W,
    WIDTH,
    dynamic_axes,
    example_inputs,
    p2p_unet_specs,
    text_specs,
    unet_specs,
    vae_specs,
)

if TYPE_CHECKING:
    from icdcli.models.runtime import ICDModel

PROTOBUF_LIMIT = 2_000_000_000
"""Above this many bytes of weights a graph keeps them in an external data file (protobuf's 2 GB cap)."""


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
    spec.sha256 = files_sha256(spec.files(folder))
    return spec


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


def estimated_bytes(model: ICDModel, precision: str, *, include_teacher: bool, p2p: bool | None = None) -> int:
    """About the disk an export of `model` takes at its peak: every planned graph's weights at its precision, plus the
    working copies of the largest while it is saved (traced, then optimized for fp32, then saved)."""
    vae = model.vae
    modules: dict[str, list[torch.nn.Module | None]] = {
        FORWARD: [model.forward_unet], REVERSE: [model.reverse_unet], REVERSE_P2P: [model.reverse_unet],
        VAE_ENCODER: [vae.encoder, getattr(vae, "quant_conv", None)],
        VAE_DECODER: [vae.decoder, getattr(vae, "post_quant_conv", None)],
    }  # fmt: skip
    if model.teacher_unet is not None:
        modules[TEACHER] = [model.teacher_unet]
    for index, encoder in enumerate(model.text_encoders):
        modules["text_encoder" if index == 0 else f"text_encoder_{index + 1}"] = [encoder]
    element = precision_dtype(precision).itemsize
    vae_element = vae_graph_dtype(model.info.family, precision).itemsize
    sizes = []
    for spec, _ in plan_graphs(model, precision, include_teacher=include_teacher, p2p=p2p):
        parts = [module for module in modules.get(spec.name, []) if module is not None]
        count = sum(tensor.numel() for part in parts for tensor in (*part.parameters(), *part.buffers()))
        sizes.append(count * (vae_element if spec.name in (VAE_ENCODER, VAE_DECODER) else element))
    copies = 2 if precision == "fp32" else 1  # fp32 graphs are optimized by ONNX Runtime on the way
    return sum(sizes) + copies * max(sizes, default=0)


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
    with atomic_folder(out_dir, owned=foreign_export_files) as staging:  # never over a model folder or the user's
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
