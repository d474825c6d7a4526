"""ONNX Runtime (or OpenVINO) started from a current export alone: no diffusers, no transformers, no weights read.

When a model folder's export is current (its fingerprint, precision and opset match, see `export.manifest`), every
network of an edit runs from the graphs; the PyTorch model would only supply metadata and tokenizers, and building
it costs seconds of importing diffusers and transformers. `load_exported` takes the metadata from the model's own
`icd.json` (the fused-model cache's, for a `lora` folder), the tokenizers from their `tokenizer.json` through the
`tokenizers` library, and wraps them in a `DeferredTorchModel` that loads the PyTorch model only when something
really needs it: a graph that cannot run (`BackendUnavailable`), attention control the P2P graph cannot take, the
teacher without a teacher graph. Anything it cannot answer from files returns None, and the caller loads as before.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from icdcli.core.errors import ICDError, ModelSourceError
from icdcli.core.paths import MODEL_JSON, mark_used
from icdcli.diffusion.recipe import SDXL

if TYPE_CHECKING:
    from icdcli.backends.accelerated import AcceleratedModel
    from icdcli.diffusion.denoiser import Conditioning, ControlledDenoiser, ControlledEps, Guidance
    from icdcli.diffusion.p2p.control import StepControl
    from icdcli.models.info import ModelInfo
    from icdcli.models.runtime import ICDModel
    from icdcli.models.sources import ModelRequest

logger = logging.getLogger("icd")

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
"""The named special tokens of a transformers tokenizer, in the order its `all_special_ids` lists them."""
TOKENIZER_CLASSES = {"TokenizersBackend": False, "PreTrainedTokenizerFast": False, "CLIPTokenizer": True}
"""Tokenizer classes that run their tokenizer.json as saved, and whether the class cuts its word-end marks on decode
(CLIP's does); another class may change the backend in code, and is left to transformers."""
DESCRIBED = ("family", "scaling_factor", "native_size", "size_multiple", "guidance_distilled")
"""Metadata a full load reads off the networks' configs when `icd.json` lacks it (icd writes it always)."""


# --- tokenizers -----------------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    """A special token as a tokenizer config writes it: a string, or an AddedToken object with its content."""
    return value.get("content") if isinstance(value, dict) else value


class TokenizerJson:
    """A `tokenizer.json` run by the `tokenizers` library, called as icd calls transformers' fast tokenizers.

    The same backend does the work in both: transformers sets its padding and truncation for each call
    (`set_truncation_and_padding`), and so does this class, so the ids, offsets and special-token masks are the
    ones transformers returns.
    """

    is_fast = True

    def __init__(self, backend: Any, config: dict[str, Any]):
        self.backend = backend
        self.model_max_length = int(config["model_max_length"])
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.pad_token_type_id = int(config.get("pad_token_type_id", 0))
        self.special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKENS}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        self.extra_special = [_token_text(token) for token in extra] if isinstance(extra, list) else []
        cuts_word_ends = TOKENIZER_CLASSES.get(config.get("tokenizer_class", ""), False)
        self.word_end = getattr(backend.model, "end_of_word_suffix", None) if cuts_word_ends else None

    @classmethod
    def from_folder(cls, folder: Path) -> TokenizerJson | None:
        """The tokenizer saved in `folder`; None where only transformers can tell what it does (no tokenizer.json,
        no `model_max_length`, a config that makes transformers rewrite the post-processor)."""
        from tokenizers import Tokenizer

        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception:  # OSError, bad JSON, or the tokenizers library's own exception for a file it cannot read
            return None
        rewrites = {"add_bos_token", "add_eos_token", "split_special_tokens"} & config.keys()
        if config.get("tokenizer_class") not in TOKENIZER_CLASSES or rewrites or backend.post_processor is None:
            return None
        if not isinstance(config.get("model_max_length"), int):
            return None
        tokenizer = cls(backend, config)
        tokens = [token for token in (*tokenizer.special.values(), *tokenizer.extra_special) if token is not None]
        return tokenizer if all(backend.token_to_id(token) is not None for token in tokens) else None

    def _id(self, name: str) -> int | None:
        token = self.special[name]
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def all_special_ids(self) -> list[int]:
        tokens = dict.fromkeys(token for token in (*self.special.values(), *self.extra_special) if token is not None)
        return [self.backend.token_to_id(token) for token in tokens]

    def _configure(self, padding: bool | str, truncation: bool, max_length: int | None) -> None:
        length = max_length if max_length is not None else self.model_max_length
        if truncation:
            self.backend.enable_truncation(length, stride=0, strategy="longest_first", direction=self.truncation_side)
        else:
            self.backend.no_truncation()
        if not padding:
            self.backend.no_padding()
            return
        self.backend.enable_padding(
            length=length if padding == "max_length" else None, direction=self.padding_side, pad_id=self.pad_token_id,
            pad_token=self.special["pad_token"], pad_type_id=self.pad_token_type_id,
        )  # fmt: skip

    def __call__(
        self,
        text: str | list[str],
        *,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        return_tensors: str | None = None,
        return_offsets_mapping: bool = False,
        return_special_tokens_mask: bool = False,
    ) -> Encoded:
        """Token ids of one text or a batch (padding False, True or "max_length"; return_tensors None or "pt")."""
        self._configure(padding, truncation, max_length)
        batch = [text] if isinstance(text, str) else list(text)
        encodings = self.backend.encode_batch(batch, add_special_tokens=add_special_tokens)
        fields: dict[str, list[Any]] = {"input_ids": [encoding.ids for encoding in encodings]}
        fields["attention_mask"] = [encoding.attention_mask for encoding in encodings]
        if return_offsets_mapping:
            fields["offset_mapping"] = [encoding.offsets for encoding in encodings]
        if return_special_tokens_mask:
            fields["special_tokens_mask"] = [encoding.special_tokens_mask for encoding in encodings]
        if return_tensors == "pt":
            return Encoded({key: torch.tensor(value) for key, value in fields.items()})
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        return Encoded(fields if not isinstance(text, str) else {key: value[0] for key, value in fields.items()})

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace(self.word_end, " ").strip() if self.word_end else text


class Encoded(dict):
    """What a tokenizer call returns: a dict whose fields also read as attributes (`.input_ids`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# --- the model's files ----------------------------------------------------------------------------------


def _model_json(folder: Path) -> dict[str, Any] | None:
    """A folder's icd.json, None when missing or unreadable (the full load then says what is wrong)."""
    try:
        data = json.loads((folder / MODEL_JSON).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class MergedFolder:
    """Where a full load reads a model's networks from, and what it knows of them.

    Args:
        folder: The merged folder (a `lora` folder's fused-model cache).
        info: The metadata a full load gives the model.
        fused: Fused from LoRA files: a full load asked for the teacher builds one.
    """

    folder: Path
    info: ModelInfo
    fused: bool


def merged_folder_info(request: ModelRequest) -> MergedFolder | None:
    """The merged folder a full load of `request` reads, from files alone; None for what only a full load can tell
    (a preset, a release folder, a `lora` folder not fused yet, an `icd.json` without the described metadata).

    A `lora` folder's networks are its fused-model cache's, with the folder's own edit recipe (as `load_lora_cached`).
    """
    from icdcli.models.fusion import lora_folder_sources
    from icdcli.models.info import ModelInfo
    from icdcli.models.sources import named_model_folder

    folder = named_model_folder(request)
    data = None if folder is None else _model_json(folder)
    if folder is None or data is None:
        return None
    sources = None
    if data.get("format") == "lora":
        try:
            sources = lora_folder_sources(folder, data, half=request.half)
            folder = sources.cache_folder()
        except (ModelSourceError, OSError):
            return None
        data = _model_json(folder)
    if data is None or data.get("format") != "merged" or not all(key in data for key in DESCRIBED):
        return None
    try:
        info = ModelInfo.from_json(data)
        if sources is not None:
            info.edit = sources.recipe(info.family, info.reverse_boundaries)
    except (ICDError, TypeError, ValueError):
        return None
    if sources is not None:
        mark_used(folder)
    return MergedFolder(folder, info, fused=sources is not None)


def unet_weight_bytes(folder: Path, dtype: torch.dtype) -> int | None:
    """Bytes of the forward and reverse UNets' weights in `dtype`, from their files' headers (None: unreadable)."""
    from icdcli.models.single_file import read_header
    from icdcli.models.weights_io import WEIGHTS_NAME

    width = torch.empty((), dtype=dtype).element_size()
    total = 0
    for role in ("forward_unet", "reverse_unet"):
        try:
            header = read_header(folder / role / WEIGHTS_NAME)
        except (ModelSourceError, OSError, ValueError):
            return None
        total += sum(math.prod(entry["shape"]) * width for entry in header.values())
    return total


# --- the PyTorch model, loaded when needed --------------------------------------------------------------


class DeferredTorchModel:
    """Stands in for the `ICDModel` under an `AcceleratedModel`: metadata and tokenizers from files, everything else
    from the PyTorch model, loaded (by `load`) the first time anything else is asked for."""

    def __init__(
        self,
        info: ModelInfo,
        tokenizers: list[TokenizerJson],
        *,
        source: str,
        device: torch.device,
        dtype: torch.dtype,
        vae_scale_factor: int,
        latent_channels: int,
        load: Callable[[], ICDModel],
    ):
        self.info, self.tokenizers, self.source = info, tokenizers, source
        self.device, self.dtype = device, dtype
        self.vae_scale_factor, self.latent_channels = vae_scale_factor, latent_channels
        self._load = load
        self._model: ICDModel | None = None
        self._low_memory = False
        self._fallbacks: dict[str, ControlledDenoiser] | None = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def torch_model(self, why: str) -> ICDModel:
        """The PyTorch model, loaded now if it was not (`why` says what needs it)."""
        if self._model is None:
            logger.info("loading the PyTorch model: %s", why)
            model = self._load()
            model.info = self.info  # one metadata object: the same values, with the run's overrides
            model.low_memory = self._low_memory
            self._model = model
        return self._model

    def fallbacks(self) -> dict[str, ControlledDenoiser]:
        """The PyTorch denoisers the graphs hand steps to (`accelerated.torch_fallbacks`, each UNet off the GPU while
        its graph runs), made once: the model loads for them."""
        from icdcli.backends.accelerated import torch_fallbacks

        if self._fallbacks is None:
            self._fallbacks = torch_fallbacks(self.torch_model("a graph hands steps to PyTorch"), offload=True)
        return self._fallbacks

    @property
    def low_memory(self) -> bool:
        return self._low_memory

    @low_memory.setter
    def low_memory(self, value: bool) -> None:
        self._low_memory = value
        if self._model is not None:
            self._model.low_memory = value

    def prompt_token_count(self, text: str) -> tuple[int, int]:
        tokenizer = self.tokenizers[0]
        return len(tokenizer(text, truncation=False).input_ids), tokenizer.model_max_length

    def needs_negative(self, guidance: float) -> bool:
        return not self.info.guidance_distilled and guidance != 1.0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy, pickle and friends probe these: never a reason to load
            raise AttributeError(name)
        return getattr(self.torch_model(f"{name} runs on PyTorch"), name)


class DeferredFallback:
    """A graph's PyTorch fallback for one role, the model loaded on its first real use. Installing attention control
    before that is remembered and done once the UNet exists (the processors hold no weights)."""

    def __init__(self, model: DeferredTorchModel, role: str):
        self.model, self.role = model, role
        self.denoiser: ControlledDenoiser | None = None
        self.control = False

    def _needed(self) -> ControlledDenoiser:
        if self.denoiser is None:
            denoiser = self.model.fallbacks().get(self.role)
            if denoiser is None:
                raise ICDError(f"no PyTorch {self.role} for the steps its graph cannot run: use --backend torch")
            if self.control:
                denoiser.install_control()
            self.denoiser = denoiser
        return self.denoiser

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance = 1.0) -> torch.Tensor:
        return self._needed()(x, t, cond, guidance)

    def install_control(self) -> None:
        if self.denoiser is None:
            self.control = True
        else:
            self.denoiser.install_control()

    def controlled(
        self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance, control: StepControl
    ) -> ControlledEps:
        return self._needed().controlled(x, t, cond, guidance, control)

    def release(self) -> None:
        release = getattr(self.denoiser, "release", None)
        if release is not None:
            release()


# --- the lean load ----------------------------------------------------------------------------------------


def load_exported(
    request: ModelRequest,
    load: Callable[[], ICDModel],
    *,
    need_teacher: bool,
    device: torch.device,
    dtype: torch.dtype,
    low_memory: bool | None = None,
    native_size: int | None = None,
    backend: str = "onnxruntime",
) -> AcceleratedModel | None:
    """The model of `request` on ONNX Runtime (or OpenVINO) from its current export, PyTorch deferred; None when there
    is no current export, or the request needs what only a full load can tell (then load as before: `load`, export,
    accelerate).

    Args:
        request: The model flags.
        load: Loads the PyTorch model as a full load would (on `device`, in `dtype`); called only when needed.
        need_teacher: The teacher will run (the export must hold its graph).
        device: Where the model runs.
        dtype: The UNets' and text encoders' dtype.
        low_memory: `--low-memory`; None decides by the UNets' size, as a full load does.
        native_size: Another working size than the model's.
        backend: `onnxruntime`, or `openvino` (on the CPU; its graphs compute in bf16 for a bfloat16 `dtype`, as
            `icdcli.backends.accelerated.accelerate` runs them).
    """
    from icdcli.backends.accelerated import AcceleratedModel, lock_path
    from icdcli.core.paths import mark_cached_used
    from icdcli.export import DEFAULT_OPSET, read_manifest, stale_reason
    from icdcli.export.files import file_lock
    from icdcli.export.manifest import export_dir
    from icdcli.models.identity import ModelIdentity
    from icdcli.models.memory import release_between_stages

    found = merged_folder_info(request)
    if found is None:
        return None
    folder, info = found.folder, found.info
    if native_size:
        info.native_size = int(native_size)
    suffixes = ["", "_2"] if info.family == SDXL else [""]
    found_tokenizers = [TokenizerJson.from_folder(folder / f"tokenizer{suffix}") for suffix in suffixes]
    tokenizers = [tokenizer for tokenizer in found_tokenizers if tokenizer is not None]
    unet_bytes = unet_weight_bytes(folder, dtype)
    if len(tokenizers) != len(suffixes) or unet_bytes is None:
        return None
    precision = "fp16" if device.type == "cuda" and dtype == torch.float16 else "fp32"
    try:
        fingerprint = ModelIdentity.from_info(info.to_json(), str(folder)).fingerprint()
    except (ValueError, OSError):
        return None
    teacher = need_teacher and (found.fused or (folder / "teacher_unet").is_dir())  # what a full load would hold
    exported = export_dir(info.name, fingerprint, precision)
    with file_lock(lock_path(exported)):
        manifest = read_manifest(exported)
        if stale_reason(manifest, fingerprint, precision, DEFAULT_OPSET, need_teacher=teacher) is not None:
            return None
    assert manifest is not None, "a current export has a manifest"
    mark_cached_used(exported)  # `icd cache prune` goes by last use
    if any(tokenizer.model_max_length != manifest.text_length for tokenizer in tokenizers):
        return None
    model = DeferredTorchModel(
        info, tokenizers, source=str(folder), device=device, dtype=dtype, vae_scale_factor=manifest.vae_scale_factor,
        latent_channels=manifest.latent_channels, load=load,
    )  # fmt: skip
    model.low_memory = release_between_stages(unet_bytes, low_memory)
    if model.low_memory:
        logger.info("low memory: each UNet's weights are freed once its stage of an edit is over")
    roles = ["forward_unet", "reverse_unet"] + (["teacher_unet"] if teacher else [])
    fallbacks = {role: DeferredFallback(model, role) for role in roles}
    if backend == "openvino":
        from icdcli.engines import openvino as ov_engine

        ov_precision = ov_engine.precision_for(dtype)
        parts = ov_engine.load_parts(exported, manifest, device=device, precision=ov_precision, fallbacks=fallbacks)
    else:
        from icdcli.engines import onnxruntime as ort_engine

        parts = ort_engine.load_parts(exported, manifest, device=device, fallbacks=fallbacks)
    return AcceleratedModel(model, parts)
