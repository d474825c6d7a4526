"""Models fused from released files: a base pipeline, a teacher state dict and two LoRA files (`LoraSources`), fused on
load and cached as a merged folder; and every model folder, merged or `lora`, by its `icd.json`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import MODEL_JSON, cache_root, mark_used
from icdcli.diffusion.recipe import EditRecipe, release_recipe
from icdcli.diffusion.schedule import validate_boundaries
from icdcli.io.atomic import atomic_folder
from icdcli.models.api import DiffusersModule
from icdcli.models.components import check_weights, family_of, load_text_stack, load_unet, load_vae
from icdcli.models.identity import made_from, sources_key
from icdcli.models.info import FORMAT_VERSION, ModelInfo, folder_recipe, info_from_networks, read_model_json
from icdcli.models.lora import boundaries_from_filename, read_lora
from icdcli.models.runtime import ICDModel, load_merged
from icdcli.models.unets import build_teacher_unet
from icdcli.models.weights_io import save_unet

logger = logging.getLogger("icd")


@dataclass
class LoraSources:
    """A base pipeline folder, an optional teacher state dict and the two LoRA files."""

    base: Path
    teacher: Path | None
    forward_lora: Path
    reverse_lora: Path
    name: str = ""
    edit: dict[str, Any] | None = None
    generate_guidance: float | None = None
    cache_half: bool = False  # keep the fused UNets and text encoders in float16 (what a GPU runs)
    forward_boundaries: tuple[int, ...] | None = None  # given (flags, a preset, icd.json): for files not named by them
    reverse_boundaries: tuple[int, ...] | None = None

    def recipe(self, family: str, reverse: tuple[int, ...]) -> EditRecipe:
        """The edit recipe: what the preset or folder gives (`edit`), else the family's release recipe."""
        try:
            return EditRecipe.from_json(self.edit, release_recipe(family, reverse))
        except (TypeError, ValueError) as error:
            where = self.name or self.forward_lora.parent
            raise ModelSourceError(f"the edit recipe of {where} is malformed: {error}") from None

    def boundaries(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The forward and reverse boundaries: from each file's name (the release's `..._19_259_519_779`) or as
        given (`--forward-boundaries`, a preset, icd.json) for a file named otherwise; a name and a given set that
        disagree, or neither, are a ModelSourceError that says which."""
        found = {
            role: self._role_boundaries(role, path, given)
            for role, path, given in (
                ("forward", self.forward_lora, self.forward_boundaries),
                ("reverse", self.reverse_lora, self.reverse_boundaries),
            )
        }
        try:
            validate_boundaries(found["forward"], found["reverse"])
        except ValueError as error:
            raise ModelSourceError(f"the forward and reverse models do not belong together: {error}") from error
        return found["forward"], found["reverse"]

    @staticmethod
    def _role_boundaries(role: str, path: Path, given: tuple[int, ...] | None) -> tuple[int, ...]:
        flag = f"--{role}-boundaries"
        try:
            named_role, named = boundaries_from_filename(path)
        except ValueError:
            if given is None:
                example = "0,259,519,779" if role == "forward" else "259,519,779,999"
                raise ModelSourceError(
                    f"the {role} model {path.name} does not name its boundaries (like {role}_19_259_519_779): give "
                    f"them with {flag} (a comma list such as {example})"
                ) from None
            return tuple(given)
        if named_role != role:
            raise ModelSourceError(f"--{role}-lora {path.name} is named as a {named_role} model: are they swapped?")
        if given is not None and tuple(given) != named:
            raise ModelSourceError(
                f"{path.name} names the boundaries {','.join(map(str, named))} but {flag} says "
                f"{','.join(map(str, given))}: give the ones the model was trained with (or rename the file)"
            )
        return named

    def cache_key(self) -> str:
        """Name of the fused-model cache folder: the files' stamps, cheap to recompute on every load."""
        return sources_key(self, version=FORMAT_VERSION)

    def cache_folder(self) -> Path:
        """The fused model's merged folder in the cache (it may not exist yet)."""
        return cache_root() / "merged" / self.cache_key()


def fuse_lora_model(
    sources: LoraSources,
    *,
    keep_teacher: bool = True,
    progress: Callable[[str], None] | None = None,
    dtype: torch.dtype = torch.float32,
    spill: Callable[[str, DiffusersModule], DiffusersModule] | None = None,
) -> ICDModel:
    """Build forward and reverse UNets by fusing the LoRA files into the teacher's weights, in `dtype`.

    Each fused UNet reads the teacher's file anew and is fused in place, so memory holds at most the two fused
    UNets (and the teacher only with `keep_teacher`), never a teacher beside two copies of it. `spill(role, unet)`
    may take each fused UNet as it is made and return what stands in for it (the cache writes it to disk and maps
    it back, so private memory holds one UNet at a time).

    Args:
        sources: The base pipeline, teacher and LoRA files.
        keep_teacher: Also build the plain teacher UNet (for the DDIM baseline).
        progress: Called with a line for each stage.
        dtype: The dtype of the fused UNets.
        spill: Takes each fused UNet as it is made; returns what stands in for it.
    """
    for label, path in (("--base", sources.base), ("--forward-lora", sources.forward_lora)):
        if not Path(path).exists():
            raise ModelSourceError(f"{label} {path} does not exist")
    if not sources.reverse_lora.exists():
        raise ModelSourceError(f"--reverse-lora {sources.reverse_lora} does not exist")
    if sources.teacher is not None and not sources.teacher.exists():
        raise ModelSourceError(f"--teacher {sources.teacher} does not exist")
    if not (sources.base / "vae").is_dir():
        raise ModelSourceError(f"--base {sources.base} is not a diffusers pipeline folder (no vae/ inside)")
    forward_bounds, reverse_bounds = sources.boundaries()
    family = family_of(sources.base)
    say = progress or (lambda message: None)
    say("loading the base pipeline")
    vae = load_vae(sources.base)
    encoders, tokenizers = load_text_stack(sources.base, family)
    unets = {}
    for role, path in (("forward", sources.forward_lora), ("reverse", sources.reverse_lora)):
        say(f"fusing the {role} LoRA into the teacher")
        check_weights(path)
        try:
            adapter = read_lora(path)
        except (ValueError, OSError) as error:
            raise ModelSourceError(f"cannot fuse {path}: {error}") from error
        try:
            unet = build_teacher_unet(sources.base, sources.teacher, dtype=dtype, fuse=adapter)
        except ValueError as error:  # the adapter does not fit the teacher
            raise ModelSourceError(f"cannot fuse {path}: {error}") from error
        del adapter
        unets[role] = spill(role, unet) if spill is not None else unet
        del unet
    teacher = build_teacher_unet(sources.base, sources.teacher, dtype=dtype) if keep_teacher else None
    info_json = {
        "name": sources.name or sources.forward_lora.parent.name,
        "forward_boundaries": forward_bounds,
        "reverse_boundaries": reverse_bounds,
        "edit": sources.recipe(family, reverse_bounds).to_json(),
        "generate_guidance": sources.generate_guidance if sources.generate_guidance is not None else 8.0,
        "made_from": made_from(sources),
    }
    info = ModelInfo.from_json(info_from_networks(info_json, unets["reverse"], vae, family))
    return ICDModel(
        info, vae, encoders, tokenizers, unets["forward"], unets["reverse"], teacher_unet=teacher,
        source=str(sources.forward_lora.parent),
    )  # fmt: skip


def _add_teacher(cached: Path, sources: LoraSources, model: ICDModel, dtype: torch.dtype) -> None:
    """Give a model from a fused cache that was written without a teacher its teacher, and the cache too."""
    teacher: DiffusersModule = build_teacher_unet(sources.base, sources.teacher, dtype=dtype).requires_grad_(False)
    model.teacher_unet = teacher
    try:
        with atomic_folder(cached / "teacher_unet") as staging:
            teacher.save_pretrained(staging, safe_serialization=True)
    except OSError as error:
        logger.warning("could not add the teacher to the fused-model cache %s: %s", cached, error)


def load_lora_cached(
    sources: LoraSources, *, need_teacher: bool = False, progress: Callable[[str], None] | None = None
) -> ICDModel:
    """Fuse `sources` once and keep the result as a merged folder in the cache; later loads read it.

    The teacher is read (and cached) only when asked for: an iCD edit runs on the two fused UNets alone.

    Args:
        sources: What to fuse; `sources.cache_key()` names the cached folder.
        need_teacher: Load the teacher UNet too, adding it to a cache written without it.
        progress: Called with a line for each stage of fusing.
    """
    cached = sources.cache_folder()
    dtype = torch.float16 if sources.cache_half else torch.float32
    if (cached / MODEL_JSON).is_file():
        try:
            model = load_merged(cached, need_teacher=need_teacher)
            mark_used(cached)
            model.info.edit = sources.recipe(model.info.family, model.info.reverse_boundaries)  # the source's, as now
            if need_teacher and model.teacher_unet is None:
                _add_teacher(cached, sources, model, dtype)
            return model
        except ModelSourceError as error:
            logger.warning("ignoring a broken fused-model cache at %s (%s); fusing again", cached, error)
    try:
        with atomic_folder(cached) as staging:

            def spill(role: str, unet: DiffusersModule) -> DiffusersModule:
                # written now and mapped back: its weights become file pages the kernel can drop and re-read, so
                # private memory never holds both fused UNets (7 GB for SD1.5 in fp32), during fusing or after
                save_unet(unet, staging / f"{role}_unet")
                del unet
                return load_unet(staging / f"{role}_unet").requires_grad_(False)

            model = fuse_lora_model(sources, keep_teacher=need_teacher, progress=progress, dtype=dtype, spill=spill)
            for encoder in model.text_encoders:
                encoder.to(dtype)  # the VAE stays float32
            model.write_merged(staging)
        model.unet_folders = {role: cached / f"{role}_unet" for role in ("forward", "reverse")}
        return model
    except OSError as error:
        logger.warning("could not cache the fused model in %s: %s; fusing in memory", cached, error)
    model = fuse_lora_model(sources, keep_teacher=need_teacher, progress=progress, dtype=dtype)
    for encoder in model.text_encoders:
        encoder.to(dtype)
    return model


def load_lora_folder(
    folder: Path, *, need_teacher: bool = False, progress: Callable[[str], None] | None = None, half: bool = False
) -> ICDModel:
    """A folder whose icd.json has `"format": "lora"` and names its parts by relative path."""
    sources = lora_folder_sources(folder, read_model_json(folder), half=half)
    return load_lora_cached(sources, need_teacher=need_teacher, progress=progress)


def _given_boundaries(data: dict[str, Any], key: str) -> tuple[int, ...] | None:
    """Boundaries a `lora` folder's icd.json records for a LoRA file whose name does not carry them."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in value):
        raise ModelSourceError(f"{key} in {MODEL_JSON} must be a list of timesteps, like [0, 259, 519, 779]")
    return tuple(value)


def lora_folder_sources(folder: Path, data: dict[str, Any], *, half: bool = False) -> LoraSources:
    """The parts a `lora` folder's icd.json (`data`) names, by path relative to the folder."""
    try:
        return LoraSources(
            base=folder / data["base"],
            teacher=folder / data["teacher"] if data.get("teacher") else None,
            forward_lora=folder / data["forward_lora"],
            reverse_lora=folder / data["reverse_lora"],
            name=data.get("name", folder.name),
            edit=folder_recipe(data),
            generate_guidance=data.get("generate_guidance"),
            cache_half=half,
            forward_boundaries=_given_boundaries(data, "forward_boundaries"),
            reverse_boundaries=_given_boundaries(data, "reverse_boundaries"),
        )
    except KeyError as error:
        raise ModelSourceError(f"{folder / MODEL_JSON} lacks the key {error}") from error


def load_model_folder(
    folder: str | Path, *, need_teacher: bool = False, progress: Callable[[str], None] | None = None, half: bool = False
) -> ICDModel:
    """An icd model folder; a `lora` one is fused once and cached.

    Args:
        folder: A folder with `icd.json`, merged or lora.
        need_teacher: Load the teacher UNet too (the DDIM baseline needs it).
        progress: Called with a line for each stage of fusing.
        half: Keep a fused cache in float16.
    """
    folder = Path(folder)
    data = read_model_json(folder)
    if data.get("format") == "lora":
        return load_lora_folder(folder, need_teacher=need_teacher, progress=progress, half=half)
    return load_merged(folder, need_teacher)
