"""Precision of the exported graphs: the dtype of an export's UNets and text encoders, that of its VAE graphs, and
normalisation and softmax kept in fp32 while an fp16 graph is traced.

Normalisation in fp16 exports: TensorRT >= 10.12 builds strongly typed, so a GroupNorm or LayerNorm of an fp16
graph runs in fp16, where older weakly typed builds kept it in fp32. `fp32_norm=True` (the default of fp16 exports,
`DEFAULT_FP32_NORM`) exports those layers with fp32 inputs and weights (casts around them), keeping their old
precision, and computes the P2P graph's attention softmax in fp32; `fp32_norm=False` (`--no-fp32-norm`) leaves
them in fp16, for when a measurement shows fp16 safe.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch

from icdcli.core.dtypes import TORCH_DTYPES, vae_precision
from icdcli.export.manifest import PRECISIONS


def precision_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.float16 if precision == "fp16" else torch.float32


def vae_graph_dtype(family: str, precision: str) -> torch.dtype:
    """The dtype a VAE graph computes in: `vae_precision` on CUDA for fp16 exports (which only CUDA runs: TensorRT,
    ONNX Runtime's CUDA provider), without bfloat16 (graphs have none: SDXL's stays float32); float32 for fp32."""
    if precision != "fp16":
        return torch.float32
    return TORCH_DTYPES[vae_precision(family, "cuda", bf16=False)]


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
    processors, through `icdcli.diffusion.p2p.attention.attention_probabilities`) takes the softmax in fp32
    (`upcast_softmax`); fused attention ignores the flag. Restored afterwards. Yields how many layers it set."""
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
