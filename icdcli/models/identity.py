"""What makes two models the same: one identity, and the three keys icd derives from it.

- Before fusing, a model is its source files. `sources_key` stamps them (path, size, modification time:
  cheap on every load) and names the fused-model cache folder.
- Fusing records what it read (`made_from`): the teacher and LoRA files by content (sha256), the base
  pipeline folder by path.
- After loading, a model is a `ModelIdentity`: what its networks are (its metadata, edit defaults aside),
  what it was made from, and the folder it was loaded from. Two keys come from it:
  - `fingerprint()`: what a cached export must match. Local to this machine, so it may read paths and
    file times: the base folder's path, the model folder's file stamps, else the weights themselves.
  - `record_hash()`: the `model_hash` an output records, to know the same model when an edit is resumed
    or repeated. Portable: the same model copied elsewhere hashes the same, so it reads content digests,
    else weight file sizes, never paths or times.

Every key keeps the value it had before this module gathered them, so existing caches and records stay
valid. Imports nothing heavy (torch only to digest weights of a model built in memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from icdcli.core.digests import file_sha256, file_stamp, json_sha256
from icdcli.core.paths import MODEL_JSON
from icdcli.diffusion.recipe import network_identity

if TYPE_CHECKING:
    from icdcli.models.api import EditModel
    from icdcli.models.runtime import ICDModel

SHA256 = "sha256:"


class SourceFiles(Protocol):
    """The files a model is fused from, as the keys read them (`icdcli.models.fusion.LoraSources` is one)."""

    @property
    def base(self) -> Path: ...

    @property
    def teacher(self) -> Path | None: ...

    @property
    def forward_lora(self) -> Path: ...

    @property
    def reverse_lora(self) -> Path: ...

    @property
    def forward_boundaries(self) -> tuple[int, ...] | None: ...

    @property
    def reverse_boundaries(self) -> tuple[int, ...] | None: ...

    @property
    def cache_half(self) -> bool: ...


# --- before fusing: the source files --------------------------------------------------------------


def sources_key(sources: SourceFiles, *, version: int) -> str:
    """Name of the fused-model cache folder of `sources`: their files' stamps and the merged format's version.

    Args:
        sources: The base pipeline, teacher and LoRA files.
        version: The merged folder format: a new one makes every cached folder stale.
    """
    files = (sources.base / "model_index.json", sources.teacher, sources.forward_lora, sources.reverse_lora)
    stamps: list = [None if path is None else file_stamp(path) for path in files]
    given = (sources.forward_boundaries, sources.reverse_boundaries)
    if given != (None, None):  # boundaries given for files that do not name them: the fused folder records them
        stamps.append([None if bounds is None else list(bounds) for bounds in given])
    return json_sha256([version, stamps])[:20] + ("-fp16" if sources.cache_half else "")


def made_from(sources: SourceFiles) -> dict[str, str]:
    """What a fused model records it was made from: the base folder by path, every file read by content, and each
    file's name (`<role>_name`: what image browsers call a checkpoint or LoRA, `icdcli.models.checkpoints`; names are no
    digests, so the record hash stays the content's)."""
    recorded = {"base": str(sources.base)}
    for label, path in (("teacher", sources.teacher), ("forward_lora", sources.forward_lora)):
        if path is not None:
            recorded[label] = file_sha256(path)
    recorded["reverse_lora"] = file_sha256(sources.reverse_lora)
    for label, path in (("teacher", sources.teacher), ("forward_lora", sources.forward_lora),
                        ("reverse_lora", sources.reverse_lora)):  # fmt: skip
        if path is not None:
            recorded[f"{label}_name"] = Path(path).name
    return recorded


# --- after loading: the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    """What identifies a loaded model.

    Args:
        network: Its metadata without edit defaults and `made_from`: what its networks compute.
        made_from: What fusing recorded (`sha256:` digests of files, the base folder's path); {} if not fused.
        folder: The folder it was loaded from, if any.
        weights: The hex digest of its weights, computed only when nothing cheaper identifies it.
    """

    network: dict[str, Any]
    made_from: dict[str, str] = field(default_factory=dict)
    folder: Path | None = None
    weights: Callable[[], str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, model: EditModel) -> ModelIdentity:
        return cls.from_info(model.info.to_json(), model.source)

    @classmethod
    def from_info(cls, info: dict[str, Any], source: str) -> ModelIdentity:
        """The identity of a model with this metadata (`ModelInfo.to_json`) loaded from `source` ("" for none)."""
        network = network_identity(info)
        recorded = dict(network.pop("made_from", None) or {})
        return cls(network, recorded, Path(source) if source else None)

    @property
    def digests(self) -> dict[str, str]:
        """The content digests among `made_from`: what a model fused from files is, wherever they lie."""
        return {key: value for key, value in self.made_from.items() if str(value).startswith(SHA256)}

    def record_hash(self) -> str:
        """`sha256:<hex>` that outputs record: content digests it was made from, else its weight file sizes."""
        blob: dict[str, Any] = {"info": self.network, "made_from": self.digests}
        if not self.digests:
            blob["weights"] = self.weight_sizes()
        return SHA256 + json_sha256(blob)

    def fingerprint(self) -> str:
        """Hex digest a cached export must match: made_from when fused, else the model folder's file stamps,
        else the weights (slow for SD-size models; only models built in memory come to it)."""
        info = {**self.network, "made_from": self.made_from}
        if self.digests:
            return json_sha256({"info": info})
        if self.folder is not None and (self.folder / MODEL_JSON).is_file():
            return json_sha256({"info": info, "files": folder_stamps(self.folder)})
        if self.weights is None:
            raise ValueError("a model with no folder and no made_from needs its weights to be identified")
        return json_sha256({"info": info, "weights": self.weights()})

    def weight_sizes(self) -> dict[str, int]:
        """Sizes of the weight files in the folder it was loaded from, by relative path; {} without one."""
        if self.folder is None or not self.folder.is_dir():
            return {}
        paths = sorted(self.folder.glob("*/*.safetensors"))
        return {str(path.relative_to(self.folder)): path.stat().st_size for path in paths}


def folder_stamps(folder: Path) -> str:
    """Hex digest of every file's stamp in a model folder, named relative to it (icd.json included)."""
    paths = sorted(path for path in folder.rglob("*") if path.is_file())
    return json_sha256([file_stamp(path, name=str(path.relative_to(folder))) for path in paths])


def weights_sha256(modules: list[Any]) -> str:
    """Hex sha256 over every tensor's module index, name, dtype, shape and bytes."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for index, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{index}:{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model: ICDModel) -> str:
    """What a cached export of `model` must match to be reused (see `ModelIdentity.fingerprint`)."""
    modules = [model.vae, *model.text_encoders, model.forward_unet, model.reverse_unet]
    return replace(ModelIdentity.of(model), weights=partial(weights_sha256, modules)).fingerprint()


def model_hash(model: EditModel) -> str:
    """The `model_hash` an output of `model` records (see `ModelIdentity.record_hash`)."""
    return ModelIdentity.of(model).record_hash()
