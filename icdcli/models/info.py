"""A model's metadata (`ModelInfo`) and the `icd.json` of a model folder it is read from.

Imports nothing heavy: naming a model and reading its metadata need no torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from icdcli.core.errors import ModelSourceError
from icdcli.core.paths import MODEL_JSON
from icdcli.diffusion.recipe import SD15, EditRecipe, release_recipe
from icdcli.diffusion.schedule import validate_boundaries

FORMAT_VERSION = 1
"""The merged folder format: a new one makes every cached fused folder stale."""


@dataclass
class ModelInfo:
    """What a checkpoint is: its boundaries, guidance mode, latent scaling and defaults."""

    name: str
    family: str
    forward_boundaries: tuple[int, ...]
    reverse_boundaries: tuple[int, ...]
    guidance_distilled: bool
    scaling_factor: float
    native_size: int
    size_multiple: int
    edit: EditRecipe
    generate_guidance: float = 8.0
    made_from: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.forward_boundaries = tuple(int(b) for b in self.forward_boundaries)
        self.reverse_boundaries = tuple(int(b) for b in self.reverse_boundaries)
        validate_boundaries(self.forward_boundaries, self.reverse_boundaries)

    @property
    def num_steps(self) -> int:
        return len(self.reverse_boundaries)

    @property
    def edit_guidance(self) -> float:
        return self.edit.guidance

    @property
    def tau(self) -> float:
        return self.edit.tau

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["forward_boundaries"] = list(self.forward_boundaries)
        data["reverse_boundaries"] = list(self.reverse_boundaries)
        data["edit"] = self.edit.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelInfo:
        """Metadata from `icd.json`. The edit recipe is its `edit` object over the family's release
        recipe; folders written before recipes existed give `edit_guidance` and `tau` at the top."""
        known = {f for f in cls.__dataclass_fields__}
        values = {key: value for key, value in data.items() if key in known}
        fallback = release_recipe(data.get("family", SD15), tuple(data.get("reverse_boundaries", ())))
        try:
            values["edit"] = EditRecipe.from_json(folder_recipe(data), fallback)
        except (TypeError, ValueError) as error:
            raise ModelSourceError(f"the model's edit recipe is malformed: {error}") from error
        return cls(**values)


def folder_recipe(data: dict[str, Any]) -> dict[str, Any] | None:
    """A folder's `edit` recipe; folders written before recipes existed give `edit_guidance` and `tau`."""
    if isinstance(data.get("edit"), dict):
        return data["edit"]
    legacy = {"guidance": data.get("edit_guidance"), "tau": data.get("tau")}
    return {key: value for key, value in legacy.items() if value is not None} or None


def read_model_json(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ModelSourceError(f"{folder} is not an icd model folder (no {MODEL_JSON})") from error
    except json.JSONDecodeError as error:
        raise ModelSourceError(f"{path} is not valid JSON ({error}): re-create the model folder") from error


def info_from_networks(info_json: dict[str, Any], unet: Any, vae: Any, family: str) -> dict[str, Any]:
    """`info_json` with what the networks' configs say where it is silent: family, latent scaling, native size,
    size multiple, guidance distillation."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    sample_size = unet.config.sample_size
    sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
    info_json.setdefault("family", family)
    info_json.setdefault("scaling_factor", float(vae.config.scaling_factor))
    info_json.setdefault("native_size", int(sample_size * vae_scale))
    info_json.setdefault("size_multiple", int(vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)))
    info_json.setdefault("guidance_distilled", unet.config.time_cond_proj_dim is not None)
    return info_json
