"""ONNX export of iCD models: UNets (per-guidance graphs), VAE encoder/decoder, text encoders, a manifest."""

from .manifest import (
    DEFAULT_OPSET,
    MANIFEST,
    GraphSpec,
    Manifest,
    TensorSpec,
    default_export_dir,
    export_root,
    model_fingerprint,
    model_key,
    read_manifest,
    stale_reason,
)
from .onnx import export_model

__all__ = [
    "DEFAULT_OPSET",
    "MANIFEST",
    "GraphSpec",
    "Manifest",
    "TensorSpec",
    "default_export_dir",
    "export_model",
    "export_root",
    "model_fingerprint",
    "model_key",
    "read_manifest",
    "stale_reason",
]
