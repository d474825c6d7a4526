"""Reading iCD's released PEFT LoRA files and fusing them into plain UNet weights."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

PEFT_DEFAULT_ALPHA = 8.0
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")
_PREFIXES = ("unet.", "base_model.model.")
_BOUNDARIES = re.compile(r"(forward|reverse)((?:[-_]\d+)+)", re.IGNORECASE)


@dataclass
class LoraAdapter:
    """Low-rank updates W += scale * B @ A, keyed by the UNet module they apply to."""

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alpha: float
    rank: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _module_name(key: str) -> tuple[str, str]:
    match = _KEY.match(key)
    if match is None:
        raise ValueError(f"not a PEFT LoRA key: {key!r}")
    module = match["module"]
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix) :]
    return module, match["part"]


def read_lora(path: str | Path, alpha: float | None = None) -> LoraAdapter:
    """Load a PEFT LoRA safetensors file (`unet.base_model.model.<module>.lora_A.weight` keys).

    The scale is alpha / rank. Alpha comes from the argument, else from the file's metadata
    (`lora_alpha`), else PEFT's default of 8 that the released iCD adapters were trained with.
    """
    from safetensors import safe_open

    down: dict[str, torch.Tensor] = {}
    up: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            module, part = _module_name(key)
            (down if part == "A" else up)[module] = handle.get_tensor(key)
    if not down or down.keys() != up.keys():
        raise ValueError(f"{path}: expected matching lora_A/lora_B weights, found {len(down)} A and {len(up)} B")
    ranks = {tensor.shape[0] for tensor in down.values()}
    if len(ranks) != 1:
        raise ValueError(f"{path}: mixed LoRA ranks {sorted(ranks)}")
    if alpha is None:
        alpha = float(metadata.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    return LoraAdapter(down, up, alpha, ranks.pop())


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update of one LoRA pair, shaped like the base weight (Linear or Conv2d)."""
    update = up.flatten(1).double() @ down.flatten(1).double()
    if down.ndim == 4:
        return (update * scale).reshape(up.shape[0], *down.shape[1:])
    return update * scale


@torch.no_grad()
def fuse_lora(unet: torch.nn.Module, adapter: LoraAdapter) -> torch.nn.Module:
    """Add the adapter's updates into `unet`'s weights in place and return it."""
    modules = dict(unet.named_modules())
    missing = sorted(set(adapter.down) - modules.keys())
    if missing:
        raise ValueError(f"LoRA targets modules the UNet does not have: {', '.join(missing[:5])}")
    for name, down in adapter.down.items():
        weight = modules[name].weight
        delta = lora_delta(down, adapter.up[name], adapter.scale)
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA update for {name} has shape {tuple(delta.shape)}, weight {tuple(weight.shape)}")
        weight.copy_((weight.double() + delta).to(weight.dtype))
    return unet


def boundaries_from_filename(path: str | Path) -> tuple[str, tuple[int, ...]]:
    """('forward', (19, 259, 519, 779)) from a LoRA file's name.

    The release names its files `iCD-SD15-forward_19_259_519_779.safetensors` (underscores, a family
    prefix); icd's own spelling is `forward-19-259-519-779.safetensors`. Both, and any mix of `-`
    and `_` with or without a prefix, are read.
    """
    match = _BOUNDARIES.search(Path(path).name)
    if match is None:
        raise ValueError(
            f"cannot read boundaries from {Path(path).name!r}: iCD LoRA files are named like "
            "iCD-SD15-forward_19_259_519_779.safetensors / iCD-SD15-reverse_259_519_779_999.safetensors "
            "(or forward-19-259-519-779.safetensors)"
        )
    return match[1].lower(), tuple(int(part) for part in re.split(r"[-_]", match[2].strip("-_")))


def family_from_filename(path: str | Path) -> str | None:
    """'sd15' or 'sdxl' from a released file's family prefix (`iCD-SD15-...`, `sdxl_cfg_distill.pt`), else None."""
    name = Path(path).name.lower()
    if re.search(r"(?:^|[-_])(?:icd-)?sdxl(?:$|[-_.])|^sdxl", name):
        return "sdxl"
    if re.search(r"(?:^|[-_])(?:icd-)?sd-?1\.?5(?:$|[-_.])|^sd-?1\.?5", name):
        return "sd15"
    return None
