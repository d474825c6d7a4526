"""`icd info`: versions, backends, caches, the hub and the presets, read without importing torch where it can."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from icdcli import __version__
from icdcli.cli.console import console, console_options
from icdcli.core.cpu import cpu_has_bf16


def _torch_build() -> dict[str, str | None] | None:
    """torch's version and the GPU toolkit it was built for, read from `torch/version.py` without importing torch
    (which takes seconds); None when torch is not installed, empty when the file cannot be read."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    facts: dict[str, str | None] = {}
    try:
        tree = ast.parse((Path(spec.origin).parent / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            facts[target.id] = value.value if isinstance(value.value, str) or value.value is None else None
    return facts


def _gpu_report(build: dict[str, str | None] | None) -> dict[str, Any]:
    """CUDA as torch sees it. A CPU-only torch build cannot use a GPU, so torch is imported (seconds) only for a
    CUDA or ROCm build, to ask the driver for its devices."""
    if build is None or (build and build.get("cuda") is None and build.get("hip") is None):
        return {"available": False, "version": None, "devices": []}
    import torch

    return {
        "available": torch.cuda.is_available(),
        "version": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }


def _exports_and_engines() -> dict[str, Any]:
    try:
        from icdcli.cli.export import describe_cache

        return describe_cache()
    except ImportError as error:  # a source tree run without installing: icdcli.export is not mapped
        return {"onnx": [], "engines": [], "unreadable": f"{error} (pip install -e . maps icdcli.export)"}


def _hub_report() -> dict[str, Any]:
    """Where the Hugging Face hub cache is and whether icd may use the network (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    from icdcli.models.hub import endpoint, offline

    return {"cache": str(constants.HF_HUB_CACHE), "offline": offline(),
            "offline_reason": "HF_HUB_OFFLINE is set" if offline() else None, "endpoint": endpoint()}  # fmt: skip


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@console_options
def info(as_json: bool) -> None:
    """Show the version, torch and CUDA, which backends can run, whether this CPU has bf16 matrix instructions and
    what auto runs SD-size models on here, where models are cached, where the Hugging Face hub cache is and whether
    it is offline, and the presets of the released checkpoints with their edit recipes and whether their files are
    present."""
    report = _report()
    if as_json:
        console().json(report, indent=2)
    else:
        console().report("\n".join(_text(report)))


def _version_of(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _backends(torch_version: str | None) -> dict[str, dict[str, Any]]:
    """Whether each backend's package is installed and importable, and its version."""
    import importlib.util

    backends = {"torch": {"importable": torch_version is not None, "version": torch_version}}
    for name, module, distribution in (
        ("onnxruntime", "onnxruntime", "onnxruntime"),
        ("onnxruntime-gpu", "onnxruntime", "onnxruntime-gpu"),
        ("tensorrt", "tensorrt", "tensorrt"),
        ("openvino", "openvino", "openvino"),
    ):
        version = _version_of(distribution)
        backends[name] = {
            "importable": version is not None and importlib.util.find_spec(module) is not None,
            "version": version,
        }
    backends["openvino"]["bf16"] = cpu_has_bf16() if backends["openvino"]["importable"] else None
    return backends


def _cpu_report(backends: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether this CPU has bf16 matrix instructions, and what `--backend auto` with `--precision auto` runs an SD-size
    model on here (`icdcli.backends.accelerated.choose_run`, told without importing torch): PyTorch bf16 on such a
    CPU, else auto's backend in fp32 (ONNX Runtime where it and onnx are importable, else PyTorch)."""
    import importlib.util

    bf16 = cpu_has_bf16()
    onnxruntime = backends["onnxruntime"]["importable"] and importlib.util.find_spec("onnx") is not None
    return {"bf16": bf16, "auto_large": "torch bf16" if bf16 else f"{'onnxruntime' if onnxruntime else 'torch'} fp32"}


def _report() -> dict[str, Any]:
    import platform

    from icdcli.core.paths import MODEL_JSON, cache_root, free_bytes
    from icdcli.models.sources import DEFAULT_MODEL_DIR, PRESETS, preset_files_report

    report: dict[str, Any] = {"icd": __version__, "python": platform.python_version()}
    build = _torch_build()
    report["torch"] = (build or {}).get("__version__") or _version_of("torch")
    report["cuda"] = _gpu_report(build)
    report["backends"] = _backends(report["torch"])
    report["cpu"] = _cpu_report(report["backends"])
    cache = cache_root()
    merged = sorted(p.name for p in (cache / "merged").iterdir()) if (cache / "merged").is_dir() else []
    report["cache"] = {"root": str(cache), "fused_models": merged, "free_bytes": free_bytes(cache),
                       **_exports_and_engines()}  # fmt: skip
    report["default_model"] = str(DEFAULT_MODEL_DIR) if (DEFAULT_MODEL_DIR / MODEL_JSON).is_file() else None
    report["hub"] = _hub_report()
    report["presets"] = [{**preset.to_json(), "files": preset_files_report(preset)} for preset in PRESETS.values()]
    return report


def _text(report: dict[str, Any]) -> list[str]:
    """The report's lines for a human."""
    cuda, cache, hub = report["cuda"], report["cache"], report["hub"]
    lines = [
        f"icd {report['icd']} (python {report['python']}, torch {report['torch']})",
        f"CUDA: {'yes, ' + ', '.join(cuda['devices']) if cuda['available'] else 'not available'}",
    ]
    for name, entry in report["backends"].items():
        bf16 = {True: " (bf16)", False: " (no bf16)"}.get(entry.get("bf16"), "")
        lines.append(f"backend {name}: {'yes ' + entry['version'] + bf16 if entry['importable'] else 'not installed'}")
    cpu = report["cpu"]
    has = {True: "yes", False: "no"}.get(cpu["bf16"], "unknown")
    where = " with --device cpu" if cuda["available"] else ""
    lines.append(f"cpu: bf16 {has}; auto runs SD-size models on {cpu['auto_large']}{where}")
    free = "" if cache["free_bytes"] is None else f", {cache['free_bytes'] / 2**30:.1f} GB free on its disk"
    lines.append(f"cache: {cache['root']} ({len(cache['fused_models'])} fused models{free}; sizes: icd cache list)")
    lines += [f"  onnx export: {e['path']} ({e['model']}, {e['precision']})" for e in cache.get("onnx", [])]
    lines += [f"  tensorrt engine: {e.get('path', e)}" for e in cache.get("engines", [])]
    lines.append(f"default model: {report['default_model'] or 'not embedded in this installation'}")
    state = f"offline: {hub['offline_reason']}" if hub["offline"] else f"online, {hub['endpoint']}"
    lines.append(f"hub cache: {hub['cache']} ({state})")
    return lines + [_preset_text(preset) for preset in report["presets"]]


def _preset_text(preset: dict[str, Any]) -> str:
    p2p = f", p2p cross {preset['cross_replace']} self {preset['self_replace']} amplify {preset['amplify']}"
    files = preset["files"]
    present = "all present" if files["present"] else f"missing {len(files['missing'])} of {files['total']}"
    teacher = " (+ the teacher, given with --teacher)" if files["needs_teacher_flag"] else ""
    return (
        f"preset {preset['name']}: {preset['description']}\n  edits with {preset['method']}, guidance "
        f"{preset['guidance']:g} (the release's {preset['guidance'] - 1:g}), tau {preset['tau']}"
        f"{p2p if preset['method'] == 'p2p' else ''}, seed {preset['seed']}\n  files: {present}{teacher}"
    )
