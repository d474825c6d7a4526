"""`icd bench gpu`: the PyTorch CUDA path at SD1.5 (and SDXL) size, measured on a GPU in a few minutes.

Models of the real architectures (`scale_models`' configs: the release's guidance-distilled UNets with
`time_cond_proj_dim=512`, its boundaries and edit recipe) are built in memory, directly on the device, with seeded
random weights - the cost of a network does not depend on its weights' values, and nothing is read from disk. Each
architecture then runs, in each execution mode (`eager`, `graphs`: CUDA graphs, `compile`: torch.compile; see
`icdcli.backends.torch_speed`), one UNet evaluation at batch 1 and 2 and a whole prompt-swap and Prompt-to-Prompt edit
(`icdcli.diffusion.editing.edit_batch`), timed between `torch.cuda.synchronize()` calls, with GPU peak memory reset
per row.
Parity compares fp16 on the GPU with an fp32 copy of the same weights on the CPU: one evaluation, one whole edit.

The report is written (atomically) after every step: a run that is killed or times out leaves every row it
finished, and the rest say why they did not run. `--time-limit` skips the steps that would not fit and interrupts
a step that runs past it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import importlib.metadata
import platform
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from icdcli.bench.scale import GB, SOURCE, TARGET
from icdcli.core.errors import ICDError
from icdcli.diffusion.editing import Timings
from icdcli.diffusion.recipe import SD15, SDXL

FORMAT = 1
ARCHS = (SD15, SDXL)
MODES = ("eager", "graphs", "compile")
METHODS = ("eval", "swap", "p2p")
EVAL_BATCHES = (1, 2)
EVAL_WARMUP = 3
NOT_REACHED = "not reached: the run stopped before this step (killed, timed out or crashed)"
STARTED = "started but did not finish: the run stopped during this step (killed, timed out or crashed)"
NO_MODES = "execution modes not available in this build (icdcli.backends.torch_speed / ICDModel.set_execution missing)"
CPU_ONLY = {
    "graphs": "CUDA graphs need a CUDA device (--device cuda)",
    "compile": "torch.compile rows are measured on CUDA only (--device cuda)",
    "parity": "parity compares fp16 on a CUDA GPU with fp32 on the CPU: needs --device cuda",
}
BUILD_GUESS = {SD15: 20.0, SDXL: 60.0}
"""Seconds a full-width build is assumed to take before one was measured (scaled by width squared)."""
COMPILE_GUESS = {SD15: 60.0, SDXL: 150.0}
"""Seconds torch.compile's first call of a row is assumed to take before one was measured."""


class TimeLimitReached(BaseException):  # noqa: N818 - not an error: the run's time is up
    """Raised inside a step when `--time-limit` runs out (a BaseException, so no library swallows it)."""


@dataclass
class GpuOptions:
    """What `icd bench gpu` was asked for."""

    archs: tuple[str, ...] = (SD15,)
    device: str = "cuda"
    width: float = 1.0
    size: int | None = None  # None: the architecture's (512 or 1024)
    modes: tuple[str, ...] = MODES
    repeats: int = 3
    eval_repeats: int = 10
    time_limit: float = 420.0
    seed: int = 0
    parity: bool = True
    out: Path | None = None


# --- the report and its file ---------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write `report` to `out` as strict JSON, atomically (a temporary file beside it, then renamed)."""
    from icdcli.core.values import strict_json
    from icdcli.io.atomic import atomic_path

    with atomic_path(out) as temporary:
        temporary.write_text(strict_json(report, indent=2) + "\n")


class Budget:
    """The run's time: what is left of `--time-limit`, whether a step of some estimated length fits, and an alarm
    that interrupts a step running past the limit (main thread, POSIX only; `interrupt=False` turns it off)."""

    def __init__(self, limit: float, clock: Callable[[], float] = time.perf_counter, interrupt: bool = True):
        self.limit, self.clock = limit, clock
        self.start = clock()
        self.interrupt = (
            interrupt and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        )

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return self.limit - self.elapsed()

    def refuses(self, estimate: float) -> str | None:
        """Why a step of about `estimate` seconds must be skipped, or None when it fits."""
        elapsed, left = self.elapsed(), self.left()
        if left <= 0 or estimate > left:
            return (
                f"time limit: {elapsed:.0f} s of --time-limit {self.limit:g} s used, "
                f"this step needs about {estimate:.0f} s"
            )
        return None

    @contextmanager
    def alarm(self) -> Iterator[None]:
        """Raise TimeLimitReached inside the block when the limit passes."""
        if not self.interrupt:
            yield
            return

        def ring(signum: int, frame: Any) -> None:
            raise TimeLimitReached()

        previous = signal.signal(signal.SIGALRM, ring)
        signal.setitimer(signal.ITIMER_REAL, max(0.001, self.left()))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _row_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return row["arch"], row["mode"], row["method"], row["batch"]


def planned_rows(options: GpuOptions) -> list[dict[str, Any]]:
    """Every row the run will try, in order, each `skipped` as not reached until its step runs."""
    rows = []
    for arch in options.archs:
        for mode in options.modes:
            for method in METHODS:
                for batch in EVAL_BATCHES if method == "eval" else (1,):
                    rows.append({"arch": arch, "mode": mode, "method": method, "batch": batch, "size": None,
                                 "status": "skipped", "reason": NOT_REACHED, "seconds": None,
                                 "first_call_seconds": None, "repeats": 0, "stages": {}, "peak_memory_gb": None,
                                 "notes": []})  # fmt: skip
    return rows


def planned_parity(options: GpuOptions) -> dict[str, list[dict[str, Any]]]:
    def entry(arch: str) -> dict[str, Any]:
        return {"arch": arch, "status": "skipped", "reason": NOT_REACHED}

    return {"eval": [entry(arch) for arch in options.archs], "edit_pixels": [entry(arch) for arch in options.archs]}


# --- the machine ---------------------------------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    """The NVIDIA driver's version from nvidia-smi, or None where there is none."""
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = found.stdout.strip().splitlines()
    return lines[0].strip() if found.returncode == 0 and lines else None


def machine_facts(device: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(device name, device details, versions). On a CPU device nothing asks CUDA anything."""
    import torch

    from icdcli import __version__

    versions: dict[str, Any] = {
        "icd": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "driver": None,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
    }
    if device.type != "cuda":
        from icdcli.bench.latency import device_description

        return "cpu", {"description": device_description(device), "threads": torch.get_num_threads()}, versions
    versions["cudnn"] = torch.backends.cudnn.version()
    versions["driver"] = _driver()
    props = torch.cuda.get_device_properties(device)
    details = {
        "name": props.name,
        "memory_gb": round(props.total_memory / GB, 2),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
    }
    return props.name, details, versions


def backend_presence(device: Any) -> dict[str, dict[str, Any]]:
    """TensorRT and ONNX Runtime's CUDA provider: present or absent here (and why). This bench times PyTorch only."""
    from icdcli.backends.accelerated import backend_problem, probe_backends

    facts = probe_backends(device)
    untimed = "present, not timed here (icd bench gpu times PyTorch): icd bench scale --device cuda --backends {} does"
    not_gpu = "the device is not a CUDA GPU (--device cuda)"
    if not facts.cuda:
        tensorrt: str | None = not_gpu
    elif not (facts.tensorrt and facts.onnx):
        tensorrt = backend_problem("tensorrt", facts)
    else:
        tensorrt = None
    if facts.onnxruntime_cuda:
        ort: str | None = None
    elif not facts.onnxruntime:
        ort = "onnxruntime is not installed: pip install onnxruntime-gpu"
    elif not facts.cuda:
        ort = not_gpu
    else:
        ort = "onnxruntime has no CUDAExecutionProvider here (the CPU build): pip install onnxruntime-gpu"
    found = {"tensorrt": tensorrt, "onnxruntime_cuda": ort}
    return {
        name: {"status": "absent", "reason": problem}
        if problem
        else {"status": "present", "reason": untimed.format(name.removesuffix("_cuda"))}
        for name, problem in found.items()
    }


class Clocked:
    """Synchronised timing on one device: `sync()` waits for its queued kernels; peak memory per row on CUDA."""

    def __init__(self, device: Any):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.max_memory_allocated(self.device) / GB, 3)

    def allocated_gb(self) -> float | None:
        """What the device holds allocated now (the weights, between rows)."""
        if not self.cuda:
            return None
        import torch

        return round(torch.cuda.memory_allocated(self.device) / GB, 3)

    def free(self) -> None:
        """Return freed memory to the device: best effort, never an error of its own (it runs in cleanups)."""
        gc.collect()
        if self.cuda:
            import torch

            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()

    def seconds(self, run: Callable[[], Any]) -> float:
        self.sync()
        start = time.perf_counter()
        run()
        self.sync()
        return time.perf_counter() - start


@dataclass
# --- the models ----------------------------------------------------------------------------------------------


@dataclass
class Built:
    """One architecture's model on the device, its fp32 CPU twin for parity (None when not asked), and facts."""

    model: Any
    reference: Any
    facts: dict[str, Any]


def build_model(
    arch: str, *, width: float, size: int, device: Any, dtype: Any, seed: int, reference: bool, tokenizer: Any
) -> Built:
    """The release's model of `arch` with seeded random weights, built in fp32 directly on `device` (PyTorch's
    default initialisation runs there: seconds on a GPU, no files), then converted as `icd edit` runs it (UNets and
    text encoders in `dtype`, the VAE in the model's default for the device). `reference`: keep an fp32 copy on the
    CPU first, for parity."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from icdcli.bench.scale_models import GUIDANCE_DIM, RELEASE, text_configs, unet_config, vae_config
    from icdcli.diffusion.recipe import release_recipe
    from icdcli.models.runtime import ICDModel, ModelInfo

    release = RELEASE[arch]
    config = unet_config(arch, width, GUIDANCE_DIM)
    with torch.device(device):
        torch.manual_seed(seed)
        unets = [UNet2DConditionModel.from_config(config) for _ in ("forward", "reverse")]
        vae = AutoencoderKL.from_config(vae_config(arch, width))
        encoders = []
        for position, text in enumerate(text_configs(arch, width)):
            ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
            kind = CLIPTextModelWithProjection if position == 1 else CLIPTextModel
            encoders.append(kind(CLIPTextConfig(**text, **ids)))
    _check_size(arch, size)
    info = ModelInfo(
        name=f"bench-gpu-{arch}" + (f"-w{width:g}" if width < 1 else ""),
        family=arch,
        forward_boundaries=release["forward"],
        reverse_boundaries=release["reverse"],
        guidance_distilled=True,
        scaling_factor=release["scaling_factor"],
        native_size=size,
        size_multiple=size_step(arch),
        edit=release_recipe(arch, release["reverse"]),
    )
    parts = [vae, encoders, *unets]
    twin = None
    if reference:  # one module at a time: the GPU holds at most one extra copy while it moves
        vae_copy, encoders_copy, forward_copy, reverse_copy = (
            [_cpu_copy(m) for m in part] if isinstance(part, list) else _cpu_copy(part) for part in parts
        )
        tokenizers = [tokenizer] * len(encoders)
        twin = ICDModel(info, vae_copy, encoders_copy, tokenizers, forward_copy, reverse_copy, source="bench-gpu")
        twin.to("cpu", torch.float32)
    model = ICDModel(info, vae, encoders, [tokenizer] * len(encoders), *unets, source="bench-gpu (random weights)")
    model.to(device, dtype)
    count = {"unet": sum(p.numel() for p in unets[0].parameters()), "vae": sum(p.numel() for p in vae.parameters()),
             "text": sum(p.numel() for e in encoders for p in e.parameters())}  # fmt: skip
    vae_dtype = getattr(model, "vae_dtype", torch.float32)
    facts = {"parameters_m": {k: round(v / 1e6, 1) for k, v in count.items()}, "dtype": str(dtype).split(".")[-1],
             "vae_dtype": str(vae_dtype).split(".")[-1],
             "guidance_dim": unets[0].config.time_cond_proj_dim, "forward": list(release["forward"]),
             "reverse": list(release["reverse"]), "recipe": info.edit.to_json()}  # fmt: skip
    return Built(model, twin, facts)


def _cpu_copy(module: Any) -> Any:
    return copy.deepcopy(module).to("cpu")


def _execution(mode: str) -> tuple[Any, str | None]:
    """`icdcli.backends.torch_speed.TorchExecution.from_mode(mode)`, or why the modes cannot be set in this build."""
    try:
        speed = importlib.import_module("icdcli.backends.torch_speed")
        return speed.TorchExecution.from_mode(mode), None
    except (ImportError, AttributeError):
        return None, NO_MODES


def set_mode(model: Any, mode: str) -> str | None:
    """Put `model`'s UNets into `mode`; returns why it cannot be (eager always can: it is what they are)."""
    setter = getattr(model, "set_execution", None)
    execution, problem = _execution(mode)
    if setter is None or execution is None:
        return None if mode == "eager" else problem or NO_MODES
    setter(execution)
    return None


def _notes(model: Any) -> list[str]:
    return [str(note) for note in getattr(model, "execution_notes", None) or []]


@contextmanager
def default_attention(unet: Any) -> Iterator[None]:
    """Give `unet` back the attention processors it had once the block is over (a P2P edit installs its own), so
    every mode's rows run the same attention."""
    saved = dict(unet.attn_processors) if hasattr(unet, "attn_processors") else None
    try:
        yield
    finally:
        if saved is not None:
            unet.set_attn_processor(saved)
            unet.__dict__.pop("_icd_p2p_installed", None)  # icdcli.diffusion.p2p's mark that its processors are in


# --- the steps -----------------------------------------------------------------------------------------------


def _eval_inputs(model: Any, batch: int, seed: int) -> tuple[Any, int, Any, float]:
    from icdcli.diffusion.editing import seeded_noise

    size = model.info.native_size
    factor = model.vae_scale_factor
    x = seeded_noise((batch, model.latent_channels, size // factor, size // factor), seed)
    cond = model.conditioning(TARGET, size, size)
    return x, model.info.reverse_boundaries[1], cond, model.info.edit_guidance


def measure_eval(model: Any, batch: int, clock: Clocked, repeats: int, seed: int) -> dict[str, Any]:
    """Seconds of one guided reverse-UNet evaluation at `batch` (the denoiser's path: timestep_cond embedding)."""
    x, t, cond, guidance = _eval_inputs(model, batch, seed)
    x = x.to(model.device, model.dtype)
    denoiser = model.reverse_denoiser

    def run() -> None:
        denoiser(x, t, cond, guidance)

    first = clock.seconds(run)
    for _ in range(EVAL_WARMUP - 1):
        run()
    times = [clock.seconds(run) for _ in range(repeats)]
    return {"seconds": round(statistics.median(times), 5), "first_call_seconds": round(first, 4),
            "min_seconds": round(min(times), 5), "repeats": len(times)}  # fmt: skip


def edit_job(model: Any, method: str) -> Any:
    """The edit of the bench's photo by the release's recipe: prompt swap or Prompt-to-Prompt."""
    from icdcli.bench.latency import sample_image
    from icdcli.diffusion.editing import EditJob
    from icdcli.diffusion.recipe import P2POptions

    info = model.info
    p2p = P2POptions().resolve(info.edit) if method == "p2p" else None
    return EditJob(sample_image(info.native_size), SOURCE, TARGET, info.edit_guidance, info.tau, info.edit.seed, p2p)


def run_edit(model: Any, job: Any, timings: Timings) -> Any:
    """One whole edit (VAE, text, forward and reverse steps); an error the edit met is raised."""
    from icdcli.diffusion.editing import edit_batch
    from icdcli.diffusion.recipe import SamplerSettings

    (result,) = edit_batch(model, [job], settings=SamplerSettings("icd", seed=job.seed), timings=timings)
    if isinstance(result, Exception):
        raise result
    return result


def measure_edit(model: Any, method: str, clock: Clocked, repeats: int, budget: Budget) -> dict[str, Any]:
    """Seconds of a whole edit (median of `repeats` after one first call) and its encode/decode stages."""
    job = edit_job(model, method)
    first = clock.seconds(lambda: run_edit(model, job, Timings(sync=clock.sync)))
    times: list[float] = []
    stages: list[dict[str, float]] = []
    for index in range(repeats):
        if index and budget.refuses(times[-1]):
            break  # at least one timed edit; the rest only while time is left
        timings = Timings(sync=clock.sync)
        times.append(clock.seconds(lambda: run_edit(model, job, timings)))  # noqa: B023 - called at once
        stages.append(timings.seconds)
    median_stages = {name: round(statistics.median(s[name] for s in stages), 4) for name in stages[0]}
    evaluations = len(model.info.forward_boundaries) + len(model.info.reverse_boundaries)
    return {"seconds": round(statistics.median(times), 4), "first_call_seconds": round(first, 4),
            "min_seconds": round(min(times), 4), "repeats": len(times), "stages": median_stages,
            "unet_evaluations": evaluations}  # fmt: skip


def _differences(actual: Any, expected: Any) -> dict[str, float]:
    import numpy as np

    delta = np.abs(np.asarray(actual, dtype=np.float64) - np.asarray(expected, dtype=np.float64))
    return {"mean_abs": float(delta.mean()), "max_abs": float(delta.max())}


def parity_eval(built: Built, seed: int) -> dict[str, Any]:
    """One guided reverse evaluation on the device (its dtype) against the fp32 CPU twin: eps differences."""
    import torch

    model, twin = built.model, built.reference
    x, t, cond, guidance = _eval_inputs(model, 1, seed)
    _, _, twin_cond, _ = _eval_inputs(twin, 1, seed)
    actual = model.reverse_denoiser(x.to(model.device, model.dtype), t, cond, guidance).float().cpu()
    with torch.no_grad():
        expected = twin.reverse_denoiser(x, t, twin_cond, guidance).float()
    found = _differences(actual.numpy(), expected.numpy())
    scale = float(expected.abs().max())
    return {**found, "relative_max": found["max_abs"] / (1.0 + scale), "reference_max_abs": scale, "timestep": t,
            "finite": bool(torch.isfinite(actual).all())}  # fmt: skip


def parity_edit(built: Built) -> dict[str, Any]:
    """A whole edit by the release's method on the device against the fp32 CPU twin: 0-255 pixel differences."""
    import numpy as np

    method = built.model.info.edit.method
    job = edit_job(built.model, method)
    actual = run_edit(built.model, job, Timings())
    start = time.perf_counter()
    expected = run_edit(built.reference, job, Timings())
    found = _differences(np.asarray(actual), np.asarray(expected))
    return {"method": method, "mean_abs_255": found["mean_abs"], "max_abs_255": found["max_abs"],
            "cpu_fp32_edit_seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


# --- the run -------------------------------------------------------------------------------------------------


class GpuBench:
    """One run of `icd bench gpu`: the report, the budget, and the steps in order."""

    def __init__(self, options: GpuOptions, say: Callable[[str], None], budget: Budget):
        import torch

        from icdcli.models.runtime import resolve_device

        self.options, self.say, self.budget = options, say, budget
        self.device = resolve_device(options.device)
        if self.device.type not in ("cuda", "cpu"):
            raise ICDError(f"icd bench gpu runs on cuda (or cpu, at reduced width), not {self.device.type}")
        self.clock = Clocked(self.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.report: dict[str, Any] = {
            "bench": "gpu",
            "format": FORMAT,
            "finished": False,
            "current_step": None,
            "device": None,
            "device_details": {},
            "versions": {},
            "backends": {},
            "options": {**{k: v for k, v in asdict(options).items() if k != "out"}, "out": str(options.out or "")},
            "precision": "fp16" if self.dtype == torch.float16 else "fp32",
            "time_limit_seconds": options.time_limit,
            "elapsed_seconds": 0.0,
            "builds": {},
            "rows": planned_rows(options),
            "parity": planned_parity(options),
        }
        self.measured: dict[tuple[str, str, str, int], dict[str, Any]] = {}

    # the file
    def save(self) -> None:
        self.report["elapsed_seconds"] = round(self.budget.elapsed(), 2)
        if self.options.out is not None:
            write_report(self.report, self.options.out)

    def row(self, arch: str, mode: str, method: str, batch: int = 1) -> dict[str, Any]:
        return next(r for r in self.report["rows"] if _row_key(r) == (arch, mode, method, batch))

    def parity_entry(self, kind: str, arch: str) -> dict[str, Any]:
        return next(entry for entry in self.report["parity"][kind] if entry["arch"] == arch)

    def skip(self, entries: list[dict[str, Any]], reason: str) -> None:
        for entry in entries:
            if entry["status"] == "skipped" and entry["reason"] in (NOT_REACHED, STARTED):
                entry["reason"] = reason
        self.save()

    def arch_entries(self, arch: str) -> list[dict[str, Any]]:
        rows = [row for row in self.report["rows"] if row["arch"] == arch]
        return rows + [self.parity_entry(kind, arch) for kind in ("eval", "edit_pixels")]

    def step(self, entry: dict[str, Any], name: str, run: Callable[[], dict[str, Any]], estimate: float) -> bool:
        """Run one step unless the budget refuses it; its result (or its failure) goes into `entry` and the file is
        written before and after. Returns whether it ran; raises TimeLimitReached when the limit cut it off."""
        refused = self.budget.refuses(estimate)
        if refused:
            entry.update(status="skipped", reason=refused)
            self.save()
            return False
        entry.update(status="skipped", reason=STARTED)
        self.report["current_step"] = name
        self.save()
        self.say(f"{name} ...")
        try:
            with self.budget.alarm():
                result = run()
        except TimeLimitReached:
            entry.update(status="skipped", reason=f"time limit: --time-limit {self.budget.limit:g} s ran out "
                                                  "during this step")  # fmt: skip
            self.report["current_step"] = None
            self.save()
            raise
        except Exception as error:  # a failed step is a finding: the run goes on with the next one
            self.clock.free()
            entry.update(status="failed", reason=_one_line(error))
            self.say(f"{name}: failed: {entry['reason']}")
        else:
            entry.update(status="ran", reason=None, **result)
            self.say(f"{name}: {result.get('seconds', '')}")
        self.report["current_step"] = None
        self.save()
        return entry["status"] == "ran"

    # estimates
    def estimate(self, arch: str, mode: str, method: str, batch: int) -> float:
        """Seconds a row is expected to take: its calls at the speed measured so far, plus a first call."""
        done = self.measured.get((arch, mode, method, batch)) or self.measured.get((arch, "eager", method, batch))
        if done is not None:
            steady = done["seconds"] or 0.0
        elif method == "eval":
            steady = (self.measured.get((arch, "eager", "eval", 1)) or {}).get("seconds", 0.0) * batch
        else:
            swap = self.measured.get((arch, "eager", "swap", 1))
            per_eval = (self.measured.get((arch, "eager", "eval", 1)) or {}).get("seconds", 0.0)
            steady = (swap["seconds"] if swap else 10 * per_eval) * (1.5 if method == "p2p" else 1.0)
        calls = (EVAL_WARMUP + self.options.eval_repeats) if method == "eval" else self.options.repeats
        first = steady
        if mode == "compile":
            firsts = [m["first_call_seconds"] for k, m in self.measured.items() if k[:2] == (arch, "compile")]
            first = max(firsts) if firsts else COMPILE_GUESS[arch] * max(self.options.width, 0.05) ** 2
        elif mode == "graphs":
            first = 2 * steady + 1.0 * self.options.width**2
        return first + calls * steady

    # the run
    def run(self) -> dict[str, Any]:
        self.report["current_step"] = "machine"
        name, details, versions = machine_facts(self.device)
        self.report.update(device=name, device_details=details, versions=versions)
        self.report["backends"] = backend_presence(self.device)
        self.report["current_step"] = None
        self.save()
        self.say(f"icd bench gpu on {name}: torch {versions['torch']}, CUDA {versions['cuda']}, "
                 f"diffusers {versions['diffusers']}")  # fmt: skip
        try:
            tokenizer = None
            for arch in self.options.archs:
                if tokenizer is None:
                    from icdcli.bench.scale_models import scale_tokenizer

                    tokenizer = scale_tokenizer()
                self.run_arch(arch, tokenizer)
        except TimeLimitReached:
            for arch in self.options.archs:
                self.skip(self.arch_entries(arch), f"time limit: --time-limit {self.budget.limit:g} s ran out")
        self.report["finished"] = True
        self.save()
        return self.report

    def run_arch(self, arch: str, tokenizer: Any) -> None:
        from icdcli.bench.scale_models import RELEASE

        options = self.options
        size = options.size or RELEASE[arch]["size"]
        for row in self.arch_entries(arch):
            if "mode" in row:
                row["size"] = size
        cuda = self.device.type == "cuda"
        parity = options.parity and cuda
        holder: dict[str, Built] = {}
        build: dict[str, Any] = {"status": "skipped", "reason": NOT_REACHED}
        self.report["builds"][arch] = build

        def make() -> dict[str, Any]:
            self.clock.reset_peak()
            start = time.perf_counter()
            holder["built"] = build_model(arch, width=options.width, size=size, device=self.device,
                                          dtype=self.dtype, seed=options.seed, reference=parity,
                                          tokenizer=tokenizer)  # fmt: skip
            self.clock.sync()
            return {"seconds": round(time.perf_counter() - start, 2), "peak_memory_gb": self.clock.peak_gb(),
                    "size": size, **holder["built"].facts}  # fmt: skip

        guess = BUILD_GUESS[arch] * options.width**2
        if not self.step(build, f"{arch}: build (random weights on {self.device})", make, guess):
            self.skip(self.arch_entries(arch), f"{arch} not built: {build['reason']}")
            return
        built = holder.pop("built")
        try:
            for mode in options.modes:
                self.run_mode(arch, mode, built)
                if mode == "eager":
                    self.run_parity(arch, built, parity)
            if "eager" not in options.modes:
                self.run_parity(arch, built, parity)
        finally:
            del built
            self.clock.free()

    def run_mode(self, arch: str, mode: str, built: Built) -> None:
        entries = [row for row in self.report["rows"] if row["arch"] == arch and row["mode"] == mode]
        if mode != "eager" and self.device.type != "cuda":
            self.skip(entries, CPU_ONLY[mode])
            return
        try:
            problem = set_mode(built.model, mode)
        except Exception as error:
            problem = f"setting the mode failed: {_one_line(error)}"
        if problem:
            self.skip(entries, problem)
            return
        for method in METHODS:
            for batch in EVAL_BATCHES if method == "eval" else (1,):
                self.run_row(arch, mode, method, batch, built)

    def run_row(self, arch: str, mode: str, method: str, batch: int, built: Built) -> None:
        model, options = built.model, self.options
        entry = self.row(arch, mode, method, batch)
        notes_before = len(_notes(model))

        def measure() -> dict[str, Any]:
            self.clock.reset_peak()
            allocated = self.clock.allocated_gb()
            if method == "eval":
                result = measure_eval(model, batch, self.clock, options.eval_repeats, options.seed)
            else:
                with default_attention(model.reverse_unet):
                    result = measure_edit(model, method, self.clock, options.repeats, self.budget)
            result["peak_memory_gb"] = self.clock.peak_gb()
            result["allocated_before_gb"] = allocated  # the weights: the row's own memory is the peak above it
            result["notes"] = _notes(model)[notes_before:]
            return result

        label = f"{arch} {mode} {method}" + (f" batch {batch}" if method == "eval" else "")
        if self.step(entry, label, measure, self.estimate(arch, mode, method, batch)):
            self.measured[(arch, mode, method, batch)] = entry

    def run_parity(self, arch: str, built: Built, parity: bool) -> None:
        entries = [self.parity_entry(kind, arch) for kind in ("eval", "edit_pixels")]
        if not parity:
            self.skip(entries, CPU_ONLY["parity"] if self.device.type != "cuda" else "parity off (--no-parity)")
            return
        if built.reference is None:
            self.skip(entries, "no fp32 CPU copy of the weights was kept")
            return
        try:
            set_mode(built.model, "eager")
            eval_entry, edit_entry = entries
            eval_guess = 0.0
            if self.step(eval_entry, f"{arch} parity: one evaluation, fp16 GPU vs fp32 CPU",
                         lambda: self._timed(parity_eval, built, self.options.seed), 0.0):  # fmt: skip
                eval_guess = eval_entry["seconds"]  # mostly the CPU's evaluation
            method = built.model.info.edit.method
            evaluations = len(built.model.info.forward_boundaries) + len(built.model.info.reverse_boundaries)
            guess = eval_guess * (evaluations * (1.5 if method == "p2p" else 1.0) + 3)  # P2P: two branches; + VAE
            self.step(edit_entry, f"{arch} parity: a whole {method} edit, fp16 GPU vs fp32 CPU",
                      lambda: parity_edit(built), guess)  # fmt: skip
        finally:
            built.reference = None  # the CPU copy is needed no more: free its memory for the rest
            gc.collect()

    @staticmethod
    def _timed(run: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        start = time.perf_counter()
        result = run(*args)
        return {**result, "seconds": round(time.perf_counter() - start, 3)}


def size_step(arch: str) -> int:
    """The side step of `arch`'s working sizes: the VAE's factor times the UNet's downsampling (64 SD1.5, 32 SDXL)."""
    from icdcli.bench.scale_models import unet_config, vae_config

    vae_scale = 2 ** (len(vae_config(arch)["block_out_channels"]) - 1)
    return int(vae_scale * 2 ** (len(unet_config(arch)["block_out_channels"]) - 1))


def _check_size(arch: str, size: int | None) -> None:
    step = size_step(arch)
    if size is not None and size % step:
        raise ICDError(f"--size {size} is not a multiple of {step}, the {arch} models' size step: use e.g. "
                       f"{max(step, size // step * step)}")  # fmt: skip


def bench_gpu(
    options: GpuOptions,
    progress: Callable[[str], None] | None = None,
    *,
    clock: Callable[[], float] = time.perf_counter,
    interrupt: bool = True,
) -> dict[str, Any]:
    """Run `icd bench gpu`; returns the report (also written to `options.out` after every step when given)."""
    for arch in options.archs:
        if arch not in ARCHS:
            raise ICDError(f"unknown --arch {arch!r}: choose sd15 or sdxl")
    for mode in options.modes:
        if mode not in MODES:
            raise ICDError(f"unknown --mode {mode!r}: choose one of {', '.join(MODES)}")
    for arch in options.archs:
        _check_size(arch, options.size)
    say = progress or (lambda message: None)
    budget = Budget(options.time_limit, clock, interrupt)
    bench = GpuBench(options, say, budget)
    return bench.run()


# --- the table -----------------------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def text_report(report: dict[str, Any]) -> str:
    """The report as a readable table (what `icd bench gpu` prints without --json)."""
    versions = report.get("versions") or {}
    lines = [
        f"device: {report.get('device')} ({report.get('precision')}); torch {versions.get('torch')}, CUDA "
        f"{versions.get('cuda')}, driver {versions.get('driver')}, diffusers {versions.get('diffusers')}, python "
        f"{versions.get('python')}",
        "",
        "| arch | mode | method | batch | size | status | seconds | first call s | encode s | decode s | peak GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    reasons: dict[str, int] = {}  # each reason once, numbered
    for row in report["rows"]:
        stages = row.get("stages") or {}
        status = row["status"]
        if status != "ran":
            status += f" [{reasons.setdefault(row.get('reason') or '', len(reasons) + 1)}]"
        cells = [row["arch"], row["mode"], row["method"], row["batch"], row.get("size"), status, row.get("seconds"),
                 row.get("first_call_seconds"), stages.get("encode"), stages.get("decode"),
                 row.get("peak_memory_gb")]  # fmt: skip
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    for reason, index in reasons.items():
        lines.append(f"[{index}] {reason}")
    for kind, entries in report["parity"].items():
        for entry in entries:
            if entry["status"] == "ran":
                shown = {k: _cell(v) for k, v in entry.items() if k not in ("arch", "status", "reason", "notes")}
                lines.append(f"parity {kind} {entry['arch']}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
            else:
                lines.append(f"parity {kind} {entry['arch']}: {entry['status']}: {entry['reason']}")
    for name, entry in (report.get("backends") or {}).items():
        lines.append(f"{name}: {entry['status']}: {entry['reason']}")
    for arch, build in (report.get("builds") or {}).items():
        if build.get("status") == "ran":
            lines.append(f"build {arch}: {build['seconds']} s, parameters (M) {build.get('parameters_m')}")
        else:
            lines.append(f"build {arch}: {build.get('status')}: {build.get('reason')}")
    for row in report["rows"]:
        for note in row.get("notes") or []:
            lines.append(f"note {row['arch']} {row['mode']} {row['method']}: {note}")
    return "\n".join(lines)
