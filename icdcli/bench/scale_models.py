"""Models of the real SD1.5 and SDXL architectures with seeded random weights, written in the release's formats.

The cost of a network (time, memory, file sizes, graph sizes) does not depend on its weights' values, so these
files exercise every path a user's released checkpoints take - at their real size - where real weights cannot be
downloaded:

- a diffusers base pipeline folder (`unet`, `vae`, `text_encoder`(`_2`), `tokenizer`(`_2`), `scheduler`,
  `model_index.json`) with the architectures' real configs;
- the guidance-distilled teacher as a pickled state dict (`sd15_cfg_distill.pt`, `time_cond_proj_dim=512`);
- forward and reverse PEFT LoRA files with the release's keys (`unet.base_model.model.<module>.lora_A.weight`),
  rank 64, alpha 8 (PEFT's default, not written into the file) and the released file names.

`width` < 1 shrinks every channel count (same blocks, layers and key names) so tests run the same structure in
seconds. Tokenizers are local CLIP-sized word vocabularies (CLIP's own cannot be downloaded here).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from icdcli.diffusion.recipe import SD15, SDXL
from icdcli.models.sources import release_lora_name

ARCHS = (SD15, SDXL)
LORA_RANK = 64
LORA_ALPHA = 8.0
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip
"""The modules the released adapters train (PEFT `target_modules`)."""
LORA_PREFIX = "unet.base_model.model."
GUIDANCE_DIM = 512
CLIP_VOCAB = 49408
TEXT_LENGTH = 77
RELEASE: dict[str, dict[str, Any]] = {
    SD15: {
        "teacher": "sd15_cfg_distill.pt",
        "forward": (19, 259, 519, 779),
        "reverse": (259, 519, 779, 999),
        "size": 512,
        "scaling_factor": 0.18215,
    },
    SDXL: {
        "teacher": "sdxl_cfg_distill.pt",
        "forward": (19, 249, 499, 699),
        "reverse": (249, 499, 699, 999),
        "size": 1024,
        "scaling_factor": 0.13025,
    },
}
FORMAT = 1
"""Bump when what is written changes: a cached folder of an older format is written anew."""


# --- architectures ------------------------------------------------------------------------------------------


def shrink(channels: int, width: float, multiple: int = 32) -> int:
    """`channels * width` rounded to a multiple of `multiple` (GroupNorm's 32 groups), at least `multiple`."""
    if width >= 1:
        return channels
    return max(multiple, round(channels * width / multiple) * multiple)


def unet_config(arch: str, width: float = 1.0, guidance_dim: int | None = None) -> dict[str, Any]:
    """The UNet2DConditionModel config of SD1.5 (860M parameters) or SDXL (2.6B), shrunk in width if asked."""
    if arch == SD15:
        blocks = [shrink(c, width) for c in (320, 640, 1280, 1280)]
        config: dict[str, Any] = {
            "sample_size": 64,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "attention_head_dim": 8 if width >= 1 else 2,
            "cross_attention_dim": text_configs(arch, width)[0]["hidden_size"],
        }
    elif arch == SDXL:
        blocks = [shrink(c, width) for c in (320, 640, 1280)]
        texts = text_configs(arch, width)
        config = {
            "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20] if width >= 1 else [1, 2, 4],
            "cross_attention_dim": texts[0]["hidden_size"] + texts[1]["hidden_size"],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256 if width >= 1 else 8,
            "projection_class_embeddings_input_dim": texts[1]["projection_dim"] + 6 * (256 if width >= 1 else 8),
        }
    else:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    return {
        **config,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": blocks,
        "norm_num_groups": 32,
        "time_cond_proj_dim": guidance_dim,
    }


def vae_config(arch: str, width: float = 1.0) -> dict[str, Any]:
    """AutoencoderKL of SD1.5 and SDXL (the same architecture, 84M parameters; different scaling factors)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [shrink(c, width) for c in (128, 256, 512, 512)],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": RELEASE[arch]["size"],
        "scaling_factor": RELEASE[arch]["scaling_factor"],
        "force_upcast": arch == SDXL,
    }


def text_configs(arch: str, width: float = 1.0) -> list[dict[str, Any]]:
    """CLIPTextConfig arguments: CLIP ViT-L/14's text tower (SD1.5, and SDXL's first), OpenCLIP bigG's (SDXL's
    second, with a projection)."""
    clip_l: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
    big_g: dict[str, Any] = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                             "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
    configs = [clip_l] if arch == SD15 else [clip_l, big_g]
    if width < 1:
        widths = ("hidden_size", "intermediate_size", "projection_dim")
        configs = [{**c, **{k: shrink(c[k], width) for k in widths}, "num_attention_heads": 4} for c in configs]
    return [{**c, "vocab_size": CLIP_VOCAB, "max_position_embeddings": TEXT_LENGTH} for c in configs]


# --- seeded random weights ----------------------------------------------------------------------------------


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator per tensor, so each tensor's values depend only on the seed and its name."""
    import zlib

    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _fill(tensor: torch.Tensor, seed: int, name: str, kind: str, fan_in: int = 1) -> None:
    generator = _generator(seed, name)
    chunk = torch.empty(tensor.shape, dtype=torch.float32)
    if kind == "ones":
        chunk.fill_(1.0)
    elif kind == "zeros":
        chunk.zero_()
    elif kind == "uniform":  # PyTorch's default for Linear and Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(max(1, fan_in))
        chunk.uniform_(-bound, bound, generator=generator)
    else:
        chunk.normal_(0.0, 0.02, generator=generator)
    tensor.copy_(chunk)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter of `module` in place with seeded values of PyTorch's default scales: Linear and Conv
    weights and biases U(+-1/sqrt(fan_in)), norms 1 and 0, anything else N(0, 0.02)."""
    done: set[str] = set()
    with torch.no_grad():
        for prefix, layer in module.named_modules():
            params = dict(layer.named_parameters(recurse=False))
            if not params:
                continue
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                fan_in = layer.weight[0].numel()
                kinds = {"weight": "uniform", "bias": "uniform"}
            elif isinstance(layer, torch.nn.GroupNorm | torch.nn.LayerNorm):
                fan_in, kinds = 1, {"weight": "ones", "bias": "zeros"}
            else:
                fan_in, kinds = 1, {}
            for local, param in params.items():
                name = f"{prefix}.{local}" if prefix else local
                _fill(param, seed, name, kinds.get(local, "normal"), fan_in)
                done.add(name)
    return module


def random_unet(config: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A UNet2DConditionModel of `config` with seeded weights, allocated once in `dtype` (never in fp32 first)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    unet = unet.to(dtype).to_empty(device="cpu")
    if any(True for _ in unet.buffers()):  # to_empty leaves buffers uninitialised: none in diffusers' UNet today
        raise RuntimeError("the UNet has buffers that random_unet does not initialise")
    return randomize_(unet, seed).eval()


def lora_modules(unet: torch.nn.Module, targets: tuple[str, ...] = LORA_TARGETS) -> Iterator[tuple[str, Any]]:
    """(name, module) of every Linear or Conv2d that PEFT's `target_modules=targets` adapts (name or its tail)."""
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and any(
            name == target or name.endswith("." + target) for target in targets
        ):
            yield name, module


def lora_shapes(module: Any, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of PEFT's lora_A and lora_B weights for a Linear or Conv2d (A carries the kernel, B is 1x1)."""
    if isinstance(module, torch.nn.Conv2d):
        return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
    return (rank, module.in_features), (module.out_features, rank)


def random_lora_state(
    unet: torch.nn.Module, seed: int, rank: int = LORA_RANK, up_std: float = 0.02, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A trained-looking LoRA for `unet` under the release's key names: A as PEFT initialises it, B non-zero."""
    state = {}
    for name, module in lora_modules(unet):
        down_shape, up_shape = lora_shapes(module, rank)
        down, up = torch.empty(down_shape, dtype=dtype), torch.empty(up_shape, dtype=dtype)
        _fill(down, seed, name + ".A", "uniform", math.prod(down_shape[1:]))
        up.copy_(torch.randn(up_shape, generator=_generator(seed, name + ".B")) * up_std)
        state[f"{LORA_PREFIX}{name}.lora_A.weight"] = down
        state[f"{LORA_PREFIX}{name}.lora_B.weight"] = up
    return state


# --- writing the files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleFiles:
    """The files a user of the release passes as --base, --teacher, --forward-lora and --reverse-lora."""

    base: Path
    teacher: Path
    forward_lora: Path
    reverse_lora: Path

    def sizes(self) -> dict[str, int]:
        from icdcli.export.files import folder_size

        return {
            "base": folder_size(self.base),
            "teacher": self.teacher.stat().st_size,
            "loras": self.forward_lora.stat().st_size + self.reverse_lora.stat().st_size,
        }


def files_in(folder: Path, arch: str) -> ScaleFiles:
    release = RELEASE[arch]
    return ScaleFiles(
        folder / "base",
        folder / release["teacher"],
        folder / release_lora_name(arch, "forward", release["forward"]),
        folder / release_lora_name(arch, "reverse", release["reverse"]),
    )


def scale_tokenizer(max_length: int = TEXT_LENGTH) -> Any:
    """A CLIP-sized (49408 ids) word-level tokenizer: the bench's words, then filler words up to CLIP's size."""
    from icdcli.training.tokenizer import build_word_tokenizer

    words = "a an the of on in with photo cat dog red blue green square circle background sitting".split()
    filler = [f"w{index:05d}" for index in range(CLIP_VOCAB - 4 - len(words))]  # 4 special tokens come first
    return build_word_tokenizer(words + filler, max_length)


def _text_encoder(config: dict[str, Any], tokenizer: Any, projection: bool, seed: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_config = CLIPTextConfig(
        **config,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    encoder = (CLIPTextModelWithProjection if projection else CLIPTextModel)(clip_config).eval()
    return randomize_(encoder, seed)


def _write_module(module: Any, folder: Path) -> None:
    module.save_pretrained(folder, safe_serialization=True)


def write_base_pipeline(
    folder: Path, arch: str, width: float, seed: int, unet: Any, say: Callable[[str], None]
) -> None:
    """The diffusers pipeline folder; `unet` (the teacher without its guidance projection) goes in as fp16, the
    hub's fp16 variant (icd never reads the base UNet's weights when a teacher is given)."""
    from diffusers import AutoencoderKL, DDIMScheduler

    say("writing the VAE and text encoder(s)")
    torch.manual_seed(seed)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config(arch, width))
    vae = randomize_(vae.to_empty(device="cpu"), seed + 1)
    _write_module(vae, folder / "vae")
    del vae
    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline" if arch == SD15 else "StableDiffusionXLPipeline"}
    for position, config in enumerate(text_configs(arch, width)):
        suffix = "" if position == 0 else f"_{position + 1}"
        tokenizer = scale_tokenizer()
        tokenizer.save_pretrained(folder / f"tokenizer{suffix}")
        projection = position == 1
        encoder = _text_encoder(config, tokenizer, projection, seed + 2 + position)
        _write_module(encoder, folder / f"text_encoder{suffix}")
        del encoder
        cls = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
        index[f"text_encoder{suffix}"] = ["transformers", cls]
        index[f"tokenizer{suffix}"] = ["transformers", "PreTrainedTokenizerFast"]
    scheduler: Any = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )  # fmt: skip
    scheduler.save_pretrained(folder / "scheduler")
    say("writing the base UNet (fp16)")
    unet.save_config(folder / "unet")
    config_path = folder / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "time_cond_proj_dim": None}, indent=2))
    from safetensors.torch import save_file

    half = {k: v.half() for k, v in unet.state_dict().items() if not k.startswith("time_embedding.cond_proj")}
    save_file(half, str(folder / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    del half
    index |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    index |= {"scheduler": ["diffusers", "DDIMScheduler"]}
    if arch == SD15:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_scale_files(
    folder: Path, arch: str, width: float = 1.0, seed: int = 0, progress: Callable[[str], None] | None = None
) -> ScaleFiles:
    """Write base pipeline, teacher and both LoRA files of `arch` into `folder` (which must not exist yet).

    The teacher is written in fp32 for SD1.5 (as the released 3.4 GB file) and fp16 for SDXL (5.1 GB rather than
    10.3); memory peaks at one UNet in that precision."""
    from safetensors.torch import save_file

    say = progress or (lambda message: None)
    files = files_in(folder, arch)
    files.base.mkdir(parents=True)
    teacher_dtype = torch.float32 if arch == SD15 else torch.float16
    say(f"building the {arch} teacher UNet ({'fp32' if arch == SD15 else 'fp16'}, seeded random weights)")
    unet = random_unet(unet_config(arch, width, GUIDANCE_DIM), seed + 10, teacher_dtype)
    write_base_pipeline(files.base, arch, width, seed, unet, say)
    say(f"writing the teacher {files.teacher.name}")
    torch.save(unet.state_dict(), files.teacher)
    for role, role_seed in (("forward", 1), ("reverse", 2)):
        path = files.forward_lora if role == "forward" else files.reverse_lora
        say(f"writing the {role} LoRA {path.name} (rank {LORA_RANK})")
        save_file(random_lora_state(unet, seed + role_seed), str(path))
    return files


def scale_files(
    arch: str, width: float = 1.0, seed: int = 0, progress: Callable[[str], None] | None = None
) -> tuple[ScaleFiles, float | None]:
    """The files of `arch` from icd's cache, written there first when missing. Returns them and the seconds
    writing took (None when they were there)."""
    import time

    from icdcli.core.paths import cache_root
    from icdcli.io.atomic import atomic_folder

    tag = arch if width >= 1 else f"{arch}-w{width:g}"
    folder = cache_root() / "scale" / tag
    done = folder / "scale.json"
    stamp = {"format": FORMAT, "arch": arch, "width": width, "seed": seed}
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return files_in(folder, arch), None
    start = time.perf_counter()
    with atomic_folder(folder, markers=("scale.json",)) as staging:
        write_scale_files(staging / "parts", arch, width, seed, progress)
        for path in (staging / "parts").iterdir():
            path.rename(staging / path.name)
        (staging / "parts").rmdir()
        (staging / "scale.json").write_text(json.dumps(stamp))
    return files_in(folder, arch), time.perf_counter() - start
