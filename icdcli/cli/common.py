"""What the `icd` command modules share beyond their flags (`icdcli.cli.options`): error reporting, loading the
requested model, and the checks and records of edit, invert and generate.

Command modules import from here and from `options` and `console`, never from each other, so any of them can be
imported first.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from icdcli import __version__
from icdcli.cli.console import console, say
from icdcli.core.errors import NO_SPACE_ERRNOS
from icdcli.run.model import Loaded

if TYPE_CHECKING:
    import torch

    from icdcli.models.api import EditModel
    from icdcli.models.sources import ModelRequest


class _Failed(click.ClickException):
    """An `ICDError` as click reports it; `reported` when --json has printed its line already."""

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


def reports_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn icd's own errors into one-line click errors, the one place they become click's: an `ICDUsageError` a
    usage error (exit 2), any other `ICDError` a one-line error (exit 1), with the same message."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from icdcli.core.errors import ICDError, ICDUsageError, memory_failure, space_errno

        try:
            return command(*args, **kwargs)
        except ICDUsageError as error:
            raise click.UsageError(str(error)) from None
        except ICDError as error:
            raise _Failed(str(error), error.reported) from None
        except OSError as error:  # the file system said no: one line with the path and the reason
            raise click.ClickException(_os_error_line(error)) from None
        except click.ClickException:
            raise
        except Exception as error:  # a library's own words for a full disk or for no memory left: one line too
            code = space_errno(error)
            if code is not None:
                raise click.ClickException(_os_error_line(OSError(code, os.strerror(code)))) from None
            memory = memory_failure(error)
            if memory is None:
                raise
            raise click.ClickException(memory) from None

    return wrapper


def _os_error_line(error: OSError) -> str:
    """An OSError as one line: the path it concerns, the reason, and what to check (for a full disk: what to free)."""
    path = os.fsencode(error.filename).decode("utf-8", "backslashreplace") if error.filename else None
    if error.errno in NO_SPACE_ERRNOS:
        from icdcli.core.errors import space_reason

        reason = space_reason(error)
        return f"{path + ': ' if path else ''}{reason}; free space, or write to another disk, and run again"
    reason = error.strerror or str(error) or type(error).__name__
    if ";" in reason:  # the reason says what to do already
        return f"{path}: {reason}" if path else reason
    return f"{path}: {reason}; check the path and its permissions" if path else f"{reason}; check paths and permissions"


def _cache_problem() -> str | None:
    """Why icd's cache folder cannot be written (None when it can): a file is created in it and removed."""
    import tempfile

    from icdcli.core.paths import cache_root

    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".icd-write-check-"):
            pass
    except OSError as error:
        return f"the cache folder {root} cannot be written ({error.strerror or type(error).__name__})"
    return None


def load_model(ctx_options: dict[str, Any], *, need_teacher: bool, backend: str | None = None) -> Loaded:
    """Load the requested model onto its device, then onto `backend` (None: stay on torch).

    On ONNX Runtime, a model folder whose export is current starts from the export alone and loads its PyTorch model
    only if something needs it (`icdcli.backends.graph_model`); otherwise the model loads, exports on first use and
    runs there.

    Args:
        ctx_options: The values of `model_options` (model, base, teacher, LoRAs, device, precision ...).
        need_teacher: Also load the teacher UNet (the DDIM sampler needs it).
        backend: `auto`, `torch`, `onnxruntime`, `openvino` or `tensorrt` (see `select_run`: auto with precision
            auto runs an SD-size model on PyTorch bf16 on a CPU with bf16 matrix instructions); None: stay on torch.
    """
    from icdcli.models.sources import ModelRequest, check_preset_files, load_requested_model

    start = time.perf_counter()
    request = ModelRequest(
        ctx_options["model"],
        ctx_options["base"],
        ctx_options["teacher"],
        ctx_options["forward_lora"],
        ctx_options["reverse_lora"],
        forward_boundaries=ctx_options.get("forward_boundaries"),
        reverse_boundaries=ctx_options.get("reverse_boundaries"),
    )
    check_preset_files(request)  # a preset's missing files are named before torch loads (seconds)

    import torch

    from icdcli.models.runtime import ICDModel, default_dtype, reads_half_cache, resolve_device, set_memory_policy
    from icdcli.models.torch_speed import TorchExecution

    device = resolve_device(ctx_options["device"])
    cache_problem = _cache_problem()
    if cache_problem and backend not in (None, "auto", "torch"):
        from icdcli.core.errors import ICDError

        raise ICDError(f"--backend {backend} keeps its graphs in the cache, but {cache_problem}: "
                       "set ICD_CACHE_DIR to a writable folder, or use --backend torch")  # fmt: skip
    if cache_problem:
        say(f"note: {cache_problem}; set ICD_CACHE_DIR to a writable folder (models are fused anew on each run)")
    request.base_config = ctx_options.get("base_config")
    chosen, precision = _choose(request, backend, ctx_options["precision"], device, cache_problem)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    request.half = reads_half_cache(dtype, device)

    def load_torch() -> ICDModel:
        console().tune_libraries()
        loaded = load_requested_model(request, need_teacher=need_teacher, progress=say)
        if ctx_options.get("native_size"):  # another working size than the model's (icd bench throughput --size)
            loaded.info.native_size = int(ctx_options["native_size"])
        set_memory_policy(loaded, ctx_options.get("low_memory"), dtype or default_dtype(device), device)
        loaded.to(device, dtype)
        execution = TorchExecution(cuda_graphs=bool(ctx_options.get("cuda_graphs")),
                                   compile=bool(ctx_options.get("compile_unets")))  # fmt: skip
        if execution != TorchExecution():
            loaded.set_execution(execution)  # its notes (eager off CUDA, compile times, failed captures) are logged
        return loaded

    if chosen in ("onnxruntime", "openvino"):
        from icdcli.backends.graph_model import load_exported

        lean = load_exported(
            request, load_torch, need_teacher=need_teacher, device=device, dtype=dtype or default_dtype(device),
            low_memory=ctx_options.get("low_memory"), native_size=ctx_options.get("native_size"), backend=chosen,
        )  # fmt: skip
        if lean is not None:
            return _loaded(lean, request.label, start, chosen)
    loaded = load_torch()
    model: EditModel = loaded
    if chosen != "torch":
        from icdcli.backends.accelerated import accelerate

        try:
            model = accelerate(loaded, chosen, progress=say, offload_torch=True)  # nothing else runs it on PyTorch
        except OSError as error:  # auto's choice cannot export for want of disk: the edit runs on PyTorch
            if backend != "auto" or error.errno not in NO_SPACE_ERRNOS:
                raise
            from icdcli.core.errors import space_reason

            where = f" to {error.filename}" if error.filename else ""
            say(f"note: backend torch instead of {chosen}: exporting{where}: {space_reason(error)}; free space "
                f"(icd cache prune --max-size SIZE), or set ICD_CACHE_DIR to a folder on another disk, to run "
                f"{chosen}")  # fmt: skip
            chosen = "torch"
    return _loaded(model, request.label, start, chosen)


def _choose(
    request: ModelRequest, backend: str | None, precision: str, device: torch.device, cache_problem: str | None
) -> tuple[str, str]:
    """The backend (`torch` when `backend` is None) and precision to load `request` on, said once when auto chose:
    `select_run`, told whether the model is SD-size (`icdcli.models.size_class`) only where that can matter."""
    if backend is None:
        return "torch", precision
    from icdcli.backends.accelerated import select_run

    sd_size = None
    if backend == "auto" and precision == "auto" and device.type == "cpu":
        from icdcli.models.size_class import request_is_sd_size

        sd_size = request_is_sd_size(request)
    choice = select_run(backend, precision, device=device, sd_size=sd_size)
    if choice.backend != "torch" and cache_problem:
        say(f"note: backend torch instead of {choice.backend}, which needs a writable cache")
        return "torch", choice.precision
    if backend == "auto":
        say(choice.line())
    return choice.backend, choice.precision


def _loaded(model: EditModel, label: str, start: float, backend: str) -> Loaded:
    from icdcli.io.cache_entries import keep_within_max_size

    keep_within_max_size(say)  # after the load: what it used or made is marked in use, and kept
    seconds = time.perf_counter() - start
    logging.getLogger("icd").debug(
        "model %s: loaded in %.2f s, on %s (%s, %s)", label, seconds, backend, model.device, model.dtype
    )
    return Loaded(model, label, seconds, backend)


def model_loader(model_opts: dict[str, Any]) -> Callable[[bool], Loaded]:
    """The model of `model_opts`, loaded on its --backend when a run first needs it (`icdcli.run.model.ModelLoader`:
    given whether the teacher is needed). A shard's own GPU (`_cuda_if_present`) falls back to auto without CUDA."""

    def load(need_teacher: bool) -> Loaded:
        opts = dict(model_opts)
        if opts.pop("_cuda_if_present", False):
            import torch

            if not torch.cuda.is_available():
                opts["device"] = "auto"
        return load_model(opts, need_teacher=need_teacher, backend=opts["backend"])

    return load


def given_flags() -> frozenset[str]:
    """The parameters of the running command given on its command line or by the environment (not defaults)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in given)


def need_scikit_image() -> None:
    """Benchmarks that score SSIM need scikit-image: say how to get it before any work."""
    import importlib.util

    if importlib.util.find_spec("skimage") is None:
        raise click.ClickException("this benchmark scores SSIM with scikit-image: pip install 'icd[bench]'")


def check_prompt(value: str, flag: str) -> str:
    if not value or not value.strip():
        raise click.UsageError(f"{flag} is empty: give a prompt that describes the image")
    return value


def note_unknown_prompt(model: Any, prompt: str, flag: str) -> None:
    from icdcli.models.prompts import unknown_prompt_note

    note = unknown_prompt_note(model, prompt, flag)
    if note:
        say(f"note: {note}")


def model_record(loaded: Loaded) -> dict[str, Any]:
    """What an output records about the model that made it."""
    from icdcli.models.identity import model_hash

    model = loaded.model
    return {
        "model": loaded.label,
        "model_hash": model_hash(model),
        "backend": loaded.backend,
        "precision": str(model.dtype).removeprefix("torch."),
        "icd_version": __version__,
    }
