"""The metric networks of PIE-Bench, from local weights: LPIPS (SqueezeNet), DINO's structure distance, CLIP score.

Each loads from a local file or folder named by its flag (--lpips, --dino, --clip) and refuses anything else
in one line. torch and transformers are imported inside the functions.

- LPIPS: SqueezeNet 1.1 features with LPIPS v0.1's linear heads, under torchvision's and lpips' names;
- structure distance: the MSE between the self-similarity matrices of the last-layer attention keys of
  DINO ViT (dino_vitb8) on the two whole images, resized to a short side of 224 (long side at most 480)
  and ImageNet-normalised from their 0..255 values (the benchmark's own quirk, kept);
- CLIP score: 100 * max(cos(image, text), 0), as torchmetrics computes it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from icdcli.core.errors import ICDError
from icdcli.run.batch import display

# --- LPIPS (SqueezeNet 1.1 features, LPIPS v0.1 linear heads) -----------------------------------------

# torchvision's squeezenet1_1 `features`: a conv, then max-pools and Fire(in, squeeze, expand1x1, expand3x3)
_SQUEEZE_LAYERS: tuple[tuple[Any, ...], ...] = (
    ("conv",), ("relu",), ("pool",), ("fire", 64, 16, 64, 64), ("fire", 128, 16, 64, 64), ("pool",),
    ("fire", 128, 32, 128, 128), ("fire", 256, 32, 128, 128), ("pool",), ("fire", 256, 48, 192, 192),
    ("fire", 384, 48, 192, 192), ("fire", 384, 64, 256, 256), ("fire", 512, 64, 256, 256),
)  # fmt: skip
# LPIPS taps the features after these layer indices (its slices 1..7) with these widths
_LPIPS_TAPS = (1, 4, 7, 9, 10, 11, 12)
_LPIPS_CHANNELS = (64, 128, 256, 384, 384, 512, 512)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def lpips_network():
    """LPIPS-squeeze as a torch module with torchvision's and lpips' parameter names (features.N, linK)."""
    import torch
    from torch import nn

    class Fire(nn.Module):
        def __init__(self, inplanes: int, squeeze: int, expand1: int, expand3: int):
            super().__init__()
            self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
            self.expand1x1 = nn.Conv2d(squeeze, expand1, 1)
            self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1)

        def forward(self, x):
            x = torch.relu(self.squeeze(x))
            return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)

    def layer(spec: tuple[Any, ...]) -> nn.Module:
        if spec[0] == "conv":
            return nn.Conv2d(3, 64, 3, stride=2)
        if spec[0] == "relu":
            return nn.ReLU()
        if spec[0] == "pool":
            return nn.MaxPool2d(3, 2, ceil_mode=True)
        return Fire(*spec[1:])

    class LPIPS(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*(layer(spec) for spec in _SQUEEZE_LAYERS))
            for k, channels in enumerate(_LPIPS_CHANNELS):
                self.add_module(f"lin{k}", nn.Conv2d(channels, 1, 1, bias=False))
            self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

        def taps(self, x):
            found = []
            x = (x - self.shift) / self.scale
            for index, module in enumerate(self.features):
                x = module(x)
                if index in _LPIPS_TAPS:
                    found.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            return found

        def forward(self, a, b):
            """LPIPS distance per image of two (B, 3, H, W) batches in [-1, 1]."""
            total = 0
            for k, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b), strict=True)):
                total = total + getattr(self, f"lin{k}")((fa - fb) ** 2).mean((2, 3))
            return total[:, 0]

    return LPIPS()


def _lpips_key(key: str) -> str:
    """lpips / torchmetrics / torchvision parameter names -> this module's."""
    key = key.removeprefix("module.").removeprefix("net.")
    key = re.sub(r"^slice\d+\.(\d+)\.", r"features.\1.", key)
    key = re.sub(r"^lins\.(\d+)\.model\.1\.", r"lin\1.", key)
    return re.sub(r"^lin(\d+)\.model\.1\.", r"lin\1.", key)


def load_lpips(path: Path):
    """LPIPS-squeeze from one local file: the state dict of `lpips.LPIPS(net="squeeze")` (.pth or .safetensors)."""
    from icdcli.models.unets import load_state_dict

    network = lpips_network()
    if not Path(path).is_file():
        raise ICDError(f"--lpips {display(path)}: no such file; give the LPIPS-squeeze weights file")
    try:
        raw = load_state_dict(path)
    except ICDError as error:
        raise ICDError(f"--lpips {display(path)}: not a state dict of tensors ({error})") from None
    state = {_lpips_key(key): value for key, value in raw.items()}
    wanted = network.state_dict()
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ICDError(
            f"--lpips {display(path)}: no {missing[0]} (and {len(missing) - 1} more); give the state dict of "
            'lpips.LPIPS(net="squeeze") (see docs/pie-bench.md)'
        )
    network.load_state_dict({key: state[key] for key in wanted})
    return network.eval().requires_grad_(False)


LPIPS_MIN_SIDE = 64


def lpips_distance(network, a, b):
    """LPIPS of image batches in [-1, 1], one value per image. Images with a side under 64 px are first
    upsampled (bilinear) to 64: SqueezeNet's pooling leaves nothing of smaller ones."""
    import torch
    import torch.nn.functional as F

    side = min(a.shape[-2:])
    if side < LPIPS_MIN_SIDE:
        size = [round(d * LPIPS_MIN_SIDE / side) for d in a.shape[-2:]]
        a, b = (F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in (a, b))
    with torch.no_grad():
        return network(a, b).reshape(-1)


# --- DINO structure distance ------------------------------------------------------------------------


def _key_projection(model: Any, layer: int):
    """The attention-key Linear of transformer block `layer` of a transformers ViTModel (4.x or 5.x names)."""
    blocks = getattr(model, "layers", None)
    if blocks is None and hasattr(model, "encoder"):
        blocks = model.encoder.layer
    if blocks is None:
        raise ICDError("--dino: not a ViT model (no transformer blocks found); give a transformers ViTModel folder")
    attention = blocks[layer].attention
    for path in ("k_proj", "attention.key", "key"):
        module = attention
        for name in path.split("."):
            module = getattr(module, name, None)
        if module is not None:
            return module
    raise ICDError("--dino: cannot find the attention keys of the ViT; give a transformers ViTModel folder")


def pie_resize(pixels, *, short: int = 224, max_long: int = 480):
    """torchvision Resize(short, max_size=max_long) on a (1, 3, H, W) tensor: bilinear, antialiased."""
    import torch.nn.functional as F

    height, width = pixels.shape[-2:]
    small, large = min(height, width), max(height, width)
    new_small, new_large = short, int(short * large / small)
    if new_large > max_long:
        new_small, new_large = int(max_long * small / large), max_long
    size = (new_small, new_large) if height <= width else (new_large, new_small)
    return F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)


class StructureDistance:
    """PIE-Bench's structure distance on a DINO ViT: MSE of last-layer key self-similarities."""

    def __init__(self, model: Any):
        import torch

        self.model = model.eval().requires_grad_(False)
        self.layer = int(model.config.num_hidden_layers) - 1  # 11 for DINO ViT-S/B, as the benchmark uses
        self.mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        self.std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def self_similarity(self, image: np.ndarray):
        """Cosine similarities (T x T) of the keys of every token (CLS first) of one uint8 HxWx3 image."""
        import torch

        # the benchmark normalises the 0..255 values with ImageNet's statistics for [0, 1]: kept as it is
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        pixels = (pie_resize(pixels) - self.mean) / self.std
        captured: list[torch.Tensor] = []
        hook = _key_projection(self.model, self.layer).register_forward_hook(lambda m, i, o: captured.append(o))
        try:
            with torch.no_grad():
                self.model(pixel_values=pixels, interpolate_pos_encoding=True)
        finally:
            hook.remove()
        keys = captured[0][0].float()
        unit = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return unit @ unit.T

    def __call__(self, source: np.ndarray, edited: np.ndarray) -> float:
        import torch.nn.functional as F

        return float(F.mse_loss(self.self_similarity(edited), self.self_similarity(source)))


def load_dino(path: Path) -> StructureDistance:
    """A local transformers ViTModel folder (facebook/dino-vitb8 for the benchmark's numbers)."""
    from transformers import ViTModel

    try:
        model = ViTModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
    except Exception as error:
        raise ICDError(
            f"--dino {display(path)}: not a transformers ViT folder ({str(error).splitlines()[0]})"
        ) from None
    return StructureDistance(model)


# --- CLIP score ------------------------------------------------------------------------------------------


class ClipScore:
    """torchmetrics' CLIPScore: 100 * max(cos(image embedding, text embedding), 0)."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_tokens = int(model.config.text_config.max_position_embeddings)

    def __call__(self, image: np.ndarray, text: str) -> float:
        import torch

        pixels = self.processor(images=[np.asarray(image, dtype=np.uint8)], return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer([text], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        with torch.no_grad():
            out = self.model(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels
            )
        image_embed = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        text_embed = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        return max(100.0 * float((image_embed * text_embed).sum()), 0.0)


def load_clip(path: Path) -> ClipScore:
    """A local transformers CLIP folder (openai/clip-vit-large-patch14 for the benchmark's numbers)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise ICDError(
            f"--clip {display(path)}: not a transformers CLIP folder ({str(error).splitlines()[0]})"
        ) from None
    return ClipScore(model, tokenizer, processor)
