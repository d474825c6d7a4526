"""ONNX export of iCD models: UNets (per-guidance graphs), VAE encoder/decoder, text encoders, a manifest."""

from icdcli.export.manifest import (
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


def __getattr__(name: str):
    if name == "export_model":  # torch comes with it: reading manifests (`icd info`) stays light without it
        from icdcli.export.onnx import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
