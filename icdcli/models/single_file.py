"""`--base` as one `.safetensors` file: a whole SD1.5 or SDXL pipeline in the original LDM/SGM key layout.

diffusers' `from_single_file` converts such a file, but it needs the pipeline's component configs and
tokenizer files (a few small files) besides the weights. They are taken from, in order: the folder given
with `--base-config`, a diffusers layout beside the file (a `model_index.json` there, as the SD1.5
repository keeps it), the family's base repository in the Hugging Face cache (or the hub, when it
answers). Without them, the error gives the one command that fetches just those files. The converted
pipeline is cached under `<cache>/bases/<key>`, so a file is converted once.

The file's kind is read from its header alone (key names and shapes), before any library is imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from icdcli.core.digests import file_stamp, json_sha256
from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import cache_root, mark_used
from icdcli.diffusion.recipe import SD15, SDXL
from icdcli.models.hub import fetch_command, hub_snapshot, unavailable_reason

TOKENIZER_FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
UNET_PREFIX = "model.diffusion_model."
CONVERSION_VERSION = 1
_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}


def config_files(family: str) -> list[str]:
    """The configs and tokenizer files of a base pipeline: everything but the weights."""
    files = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"]
    for suffix in ["", "_2"] if family == SDXL else [""]:
        files.append(f"text_encoder{suffix}/config.json")
        files += [f"tokenizer{suffix}/{name}" for name in TOKENIZER_FILES]
    return files


def read_header(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors file's header (name -> dtype, shape, offsets)."""
    from icdcli.models.components import safetensors_problem

    problem = safetensors_problem(path)
    if problem is not None:
        raise ModelSourceError(f"--base {path} is not a usable safetensors file: {problem}")
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def checkpoint_family(path: Path, header: dict[str, Any] | None = None) -> str:
    """SD15 or SDXL for a single-file pipeline checkpoint; ModelSourceError naming what else it is."""
    header = read_header(path) if header is None else header
    if not any(key.startswith(UNET_PREFIX) for key in header):
        raise ModelSourceError(
            f"--base {path} is not a whole pipeline in one file (no {UNET_PREFIX}* weights): give a diffusers "
            "pipeline folder, or an SD1.5/SDXL single-file checkpoint"
        )
    conv_in = header.get(f"{UNET_PREFIX}input_blocks.0.0.weight", {}).get("shape", [0, 4])
    if conv_in[1] != 4:
        raise ModelSourceError(
            f"--base {path}: its UNet takes {conv_in[1]} input channels (an inpainting or other variant); "
            "icd needs the text-to-image base"
        )
    if any(key.startswith("conditioner.embedders.1.") for key in header):
        return SDXL
    if any(key.startswith("cond_stage_model.transformer.") for key in header):
        return SD15
    if any(key.startswith("cond_stage_model.model.") for key in header):
        raise ModelSourceError(f"--base {path} is a Stable Diffusion 2 checkpoint: icd's models are SD1.5 and SDXL")
    raise ModelSourceError(
        f"--base {path}: neither an SD1.5 nor an SDXL base checkpoint (an SDXL refiner, or no text encoder in it)"
    )


def config_problem(folder: Path, family: str) -> str | None:
    """What a config folder lacks for `family` (None when it has every file `from_single_file` reads). A
    tokenizer is its vocab.json and merges.txt (CLIP's files), or one tokenizer.json."""
    missing = []
    for name in config_files(family):
        fast = folder / Path(name).parent / "tokenizer.json"
        if name.endswith(("vocab.json", "merges.txt", "special_tokens_map.json")) and fast.is_file():
            continue
        if not (folder / name).is_file():
            missing.append(name)
    if not missing:
        return None
    return f"it lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")


def find_config(path: Path, family: str, repo: str, *, given: str | Path | None = None) -> Path:
    """The folder of configs for converting `path`: `given`, a diffusers layout beside the file, or `repo`'s
    configs from the hub cache (or the hub); a ModelSourceError with the fetch command when none is here."""
    if given is not None:
        folder = Path(given).expanduser()
        problem = config_problem(folder, family) if folder.is_dir() else "it is not a folder"
        if problem:
            raise ModelSourceError(
                f"--base-config {given}: {problem} (a {family} diffusers layout: "
                f"{', '.join(config_files(family)[:4])}, ...)"
            )
        return folder
    if (path.parent / "model_index.json").is_file() and config_problem(path.parent, family) is None:
        return path.parent
    snapshot = hub_snapshot(repo, config_files(family))
    if snapshot is not None and config_problem(snapshot, family) is None:
        return snapshot
    config_folder = f"{repo.split('/')[-1]}-config"
    raise ModelSourceError(
        f"--base {path} is a single-file {family} checkpoint; converting it needs the pipeline's config and "
        f"tokenizer files, which are not here ({unavailable_reason() or 'not in the hub cache'}): fetch them "
        f"where a network exists (a few small files): {fetch_command(repo, config_files(family), config_folder)}, then "
        f"pass --base-config {config_folder}"
    )


def conversion_key(path: Path, config: Path) -> str:
    """Identity of a conversion by the file's and the configs' path, size and modification time."""
    stamps = [file_stamp(item) for item in (path, config / "model_index.json", config / "unet" / "config.json")]
    return json_sha256([CONVERSION_VERSION, *stamps])[:20]


def converted_base(
    path: Path,
    config: Path,
    family: str,
    *,
    progress: Callable[[str], None] | None = None,
    header: dict[str, Any] | None = None,
) -> Path:
    """A diffusers pipeline folder converted from the single file `path` with the configs in `config`,
    made once and cached; later calls return the cached folder."""
    target = cache_root() / "bases" / conversion_key(path, config)
    if (target / "model_index.json").is_file() and (target / "vae").is_dir():
        mark_used(target)
        return target
    header = read_header(path) if header is None else header
    say = progress or (lambda message: None)
    say(f"converting the single-file checkpoint {path.name} to a diffusers pipeline (once; cached in {target})")
    pipeline = _from_single_file(path, config, family, header)
    from icdcli.io.atomic import atomic_folder

    try:
        with atomic_folder(target, markers=("model_index.json",)) as staging:
            pipeline.save_pretrained(staging, safe_serialization=True)
            (staging / "source.json").write_text(json.dumps({"name": path.name, "source": str(path.resolve())}))
    except OSError as error:
        raise ModelSourceError(f"cannot write the converted base to {target}: {error}") from error
    return target


def _from_single_file(path: Path, config: Path, family: str, header: dict[str, Any]) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    stored = header.get(f"{UNET_PREFIX}input_blocks.0.0.weight", {}).get("dtype", "F32")
    dtype = getattr(torch, _DTYPES.get(stored, "float32"))  # kept as stored: no bigger cache than the file
    cls: type[StableDiffusionPipeline] | type[StableDiffusionXLPipeline]
    optional: dict[str, Any]
    if family == SDXL:
        cls, optional = StableDiffusionXLPipeline, {"image_encoder": None, "feature_extractor": None}
    else:
        cls = StableDiffusionPipeline
        optional = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:  # `config` is a local folder, so nothing is downloaded (diffusers would for a missing one)
        return cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=dtype, **optional)
    except Exception as error:  # diffusers raises its own types too (SingleFileComponentError)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelSourceError(f"cannot convert --base {path} with the configs in {config}: {first}") from error
