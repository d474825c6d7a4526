"""The files a model was made from, named as image browsers name them (AUTOMATIC1111, ComfyUI's readers, civitai).

Those read an output's `parameters` chunk and look files up by their AutoV2 hash: the first 10 hex digits of the
sha256 of the whole file. icd's own `model_hash` (`icdcli.models.identity`) names a model none of them knows, so the
chunk gives instead:

- `Model hash` and `Model`: the checkpoint, where the model's networks come from one file: the teacher (the UNet
  every edit runs, fused with the LoRAs), else a single-file `--base` (converted once; its file is hashed once and
  the digest cached, `icdcli.io.hash_cache.cached_file_sha256`). A model with neither (a merged folder icd wrote without
  a record of its files) gives no `Model hash`.
- `Lora hashes`: `"name: hash, name2: hash2"` as A1111 writes it, the forward and reverse LoRA files by name
  (without extension) and AutoV2 hash.

The digests come from what fusing recorded (`made_from`: the sha256 of the teacher and LoRA files), so nothing is
read again. icd's own identity stays in the `icd` record (`model_hash`). Imports nothing heavy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AUTOV2_DIGITS = 10
SHA256 = "sha256:"
LORA_ROLES = (("forward_lora", "forward"), ("reverse_lora", "reverse"))


def autov2(sha256_hex: str) -> str:
    """The AutoV2 hash of a file whose sha256 is `sha256_hex` (with or without the `sha256:` prefix)."""
    return sha256_hex.removeprefix(SHA256)[:AUTOV2_DIGITS]


@dataclass(frozen=True)
class ModelFiles:
    """A model's checkpoint (name, AutoV2 hash), if it has one, and its LoRA files (name, AutoV2 hash)."""

    checkpoint: tuple[str, str] | None = None
    loras: tuple[tuple[str, str], ...] = ()

    def parameters(self) -> dict[str, str]:
        """The `parameters` keys they give: `Model hash`, `Model`, `Lora hashes` (only those known)."""
        found: dict[str, str] = {}
        if self.checkpoint is not None:
            found["Model hash"], found["Model"] = self.checkpoint[1], self.checkpoint[0]
        if self.loras:
            found["Lora hashes"] = ", ".join(f"{name}: {digest}" for name, digest in self.loras)
        return found


def _stem(name: str) -> str:
    return Path(name).stem or name


def _single_file_base(base: str | None) -> tuple[str, str] | None:
    """(name, AutoV2 hash) of the single file a converted `--base` folder came from (its `source.json`), when the
    file is still there; None for a diffusers folder given as it is."""
    from icdcli.io.hash_cache import cached_file_sha256

    if not base:
        return None
    try:
        source = json.loads((Path(base) / "source.json").read_text(encoding="utf-8"))
        path = Path(str(source["source"]))
        if not path.is_file():
            return None
        return _stem(str(source.get("name") or path.name)), autov2(cached_file_sha256(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def files_of(made_from: dict[str, Any], name: str = "icd") -> ModelFiles:
    """The files a model records it was made from (`ModelInfo.made_from`), named as image browsers name them.

    Args:
        made_from: What fusing recorded: `sha256:` digests of the teacher and LoRA files, their names
            (`<role>_name`; folders fused before names were recorded fall back to `name` and the role) and the
            base folder.
        name: The model's name.
    """

    def digest(role: str) -> str | None:
        value = made_from.get(role)
        return value if isinstance(value, str) and value.startswith(SHA256) else None

    def named(role: str, fallback: str) -> str:
        given = made_from.get(f"{role}_name")
        return _stem(given) if isinstance(given, str) and given else fallback

    teacher = digest("teacher")
    checkpoint = (named("teacher", f"{name}-teacher"), autov2(teacher)) if teacher else None
    if checkpoint is None:
        checkpoint = _single_file_base(made_from.get("base"))
    loras = tuple(
        (named(role, f"{name}-{short}"), autov2(found))
        for role, short in LORA_ROLES
        if (found := digest(role)) is not None
    )
    return ModelFiles(checkpoint, loras)


def model_files(model: Any) -> ModelFiles:
    """`files_of` a loaded model (an `icdcli.models.api.EditModel`)."""
    info = model.info
    return files_of(dict(info.made_from or {}), info.name)
