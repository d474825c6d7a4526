"""`icd bench scale`: the release's files at SD1.5 or SDXL size (random weights, see `scale_models`) taken through
the path a user's `--base/--teacher/--forward-lora/--reverse-lora` take - fuse, export, edit - on each backend.

Each stage runs in a process of its own (a *worker*: `python -m icdcli.bench.scale TASK.json`), so the peak resident
memory it reports is that stage's alone, and a stage that runs out of memory is named rather than taking the
report with it. Within a worker a sampling thread attributes resident memory to the innermost stage running.

A row is a backend at a precision (`--backends name[:precision]`, `scale_rows`), run on its engine by
`scale_engines` (OpenVINO at fp32, bf16 or int8 weights; ONNX Runtime's int8 graphs); each row's parity with the
reference row and the tables are `scale_report`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from icdcli.bench.scale_report import markdown_report, parity, row_parity
from icdcli.bench.scale_rows import RowSpec, backend_skip_reason, parse_rows, reference_label
from icdcli.core.errors import ICDError

__all__ = ["ScaleOptions", "backend_skip_reason", "bench_scale", "markdown_report", "parity", "row_parity"]

SOURCE = "a photo of a red cat sitting on a blue background"
TARGET = "a photo of a green cat sitting on a blue background"
GB = 1e9
SAMPLE_SECONDS = 0.01
EDIT_STAGES = ("text_encoder", "vae_encode", "unet_forward", "encode", "unet_reverse", "decode", "vae_decode", "edit")


@dataclass
class ScaleOptions:
    """What `icd bench scale` was asked for."""

    arch: str = "sd15"
    size: int | None = None
    backends: tuple[str, ...] = ("torch", "onnxruntime")  # rows: `name` (at `precision`) or `name:precision`
    precision: str = "fp32"
    method: str | None = None  # None: the family's recipe (p2p for SD1.5, swap for SDXL)
    repeats: int = 2
    device: str = "cpu"
    width: float = 1.0
    seed: int = 0
    low_memory: bool | None = None  # None: the size rule of icdcli.models.memory, as `icd edit` applies it
    verbosity: str = "normal"  # the workers' output: "quiet" (errors only), "normal" or "verbose" (debug detail)


# --- measuring ----------------------------------------------------------------------------------------------


def current_memory() -> tuple[int, int]:
    """(resident bytes, anonymous resident bytes) of this process now, from Linux /proc (else the peak so far for
    both). Anonymous memory is what must fit; the rest of RSS is file pages (mapped weights) the kernel can drop."""
    try:
        with open("/proc/self/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if line.startswith(("VmRSS", "RssAnon")))
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["RssAnon"].split()[0]) * 1024
    except (OSError, ValueError, KeyError):
        return peak_rss(), peak_rss()


def peak_rss() -> int:
    """The largest resident size this process has had (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class StageMeter:
    """Seconds per stage, and the peak resident memory seen while each stage was the innermost one running."""

    def __init__(self, status: Path | None = None, interval: float = SAMPLE_SECONDS):
        self.status, self.interval = status, interval
        self.stack: list[str] = []
        self.peaks: dict[str, int] = {}
        self.anon_peak = 0
        self.synchronize: Callable[[], None] | None = None  # on a GPU: wait for queued kernels before reading a clock
        self.seconds: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _note(self, memory: tuple[int, int]) -> None:
        rss, anon = memory
        self.anon_peak = max(self.anon_peak, anon)
        if self.stack:
            label = self.stack[-1]
            self.peaks[label] = max(self.peaks.get(label, 0), rss)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._note(current_memory())

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        if self.status is not None and len(self.stack) == 1:
            self.status.write_text(json.dumps({"stage": name}))  # what was running if the process dies
        self._note(current_memory())
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self.seconds.setdefault(name, []).append(time.perf_counter() - start)
            self._note(current_memory())
            self.stack.pop()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def peaks_gb(self) -> dict[str, float]:
        return {name: round(value / GB, 3) for name, value in self.peaks.items()}


class TimedDenoiser:
    """A denoiser whose every evaluation is timed under `name` (and counted)."""

    def __init__(self, inner: Any, meter: StageMeter, name: str):
        self.inner, self.meter, self.name = inner, meter, name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.meter.stage(self.name):
            return self.inner(*args, **kwargs)

    def controlled(self, *args: Any, **kwargs: Any) -> Any:
        """A step under attention control (Prompt-to-Prompt), timed like any other."""
        with self.meter.stage(self.name):
            return self.inner.controlled(*args, **kwargs)


class TimedModel:
    """A loaded model (torch or accelerated) whose text encoder, VAE and UNets are timed; keeps the last clean
    latents it decoded (the edit's result before the VAE) for the parity check."""

    def __init__(self, model: Any, meter: StageMeter):
        self.model, self.meter = model, meter
        self.last_latents: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)

    @property
    def forward_denoiser(self) -> TimedDenoiser:
        return TimedDenoiser(self.model.forward_denoiser, self.meter, "unet_forward")

    @property
    def reverse_denoiser(self) -> TimedDenoiser:
        return TimedDenoiser(self.model.reverse_denoiser, self.meter, "unet_reverse")

    def conditioning(self, *args: Any, **kwargs: Any) -> Any:
        with self.meter.stage("text_encoder"):
            return self.model.conditioning(*args, **kwargs)

    def encode_image(self, pixels: Any) -> Any:
        with self.meter.stage("vae_encode"):
            return self.model.encode_image(pixels)

    def decode_latents(self, latents: Any) -> Any:
        self.last_latents = latents.detach().float().cpu()
        with self.meter.stage("vae_decode"):
            return self.model.decode_latents(latents)


# --- the workers --------------------------------------------------------------------------------------------


def _request(task: dict[str, Any]) -> Any:
    from icdcli.models.sources import ModelRequest

    files = task["files"]
    request = ModelRequest(None, files["base"], files["teacher"], files["forward_lora"], files["reverse_lora"])
    request.half = task["precision"] in ("fp16", "bf16")  # the fused cache in half: SDXL's fp32 UNets fill 24 GB
    return request


def _dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def _load(task: dict[str, Any], meter: StageMeter, say: Callable[[str], None]) -> Any:
    from icdcli.models.runtime import resolve_device, set_memory_policy
    from icdcli.models.sources import load_requested_model

    with meter.stage("load"):
        model = load_requested_model(_request(task), progress=say)
        set_memory_policy(model, task.get("low_memory"), _dtype(task["precision"]), resolve_device(task["device"]))
        model.to(resolve_device(task["device"]), _dtype(task["precision"]))
    if task.get("size"):
        model.info.native_size = int(task["size"])  # the edit's working area, and the P2P graph's static size
    return model


def _export_folder(model: Any, task: dict[str, Any], progress: Callable[[str], None]) -> Path:
    from icdcli.backends.accelerated import ensure_exported

    folder, _ = ensure_exported(model, precision="fp16" if task["precision"] == "fp16" else "fp32", progress=progress)
    return folder


def worker_prepare(task: dict[str, Any], meter: StageMeter, say: Callable[[str], None]) -> dict[str, Any]:
    """Fuse the LoRA files into the fused-model cache (or find them there)."""
    return {"model": _load(task, meter, say).info.name}


def worker_export(task: dict[str, Any], meter: StageMeter, say: Callable[[str], None]) -> dict[str, Any]:
    """Export the model to ONNX (or find the export current)."""
    model = _load(task, meter, say)
    with meter.stage("export"):
        folder = _export_folder(model, task, say)
    return {"export_dir": str(folder)}


def worker_run(task: dict[str, Any], meter: StageMeter, say: Callable[[str], None]) -> dict[str, Any]:
    """One warm-up and `repeats` timed edits on one backend; saves the last edit's latents and pixels."""
    import numpy as np
    from tqdm import tqdm

    from icdcli.bench.latency import sample_image
    from icdcli.diffusion.recipe import P2POptions, SamplerSettings, guidance_and_tau
    from icdcli.editing.edits import edit
    from icdcli.editing.stages import Timings

    model = _load(task, meter, say)
    if task["backend"] != "torch":
        from icdcli.bench.scale_engines import accelerate_row

        with meter.stage("sessions"):
            model = accelerate_row(model, task["backend"], task.get("row_precision", task["precision"]), say)
    timed = TimedModel(model, meter)
    guidance, tau = guidance_and_tau(model.info, "icd", guidance=None, tau=None)
    method = task["method"] or model.info.edit.method
    p2p = P2POptions().resolve(model.info.edit) if method == "p2p" else None
    image = sample_image(model.info.native_size)
    settings = SamplerSettings("icd", seed=task["seed"])

    def run() -> Any:
        timings = Timings()
        with meter.stage("edit"):
            result = edit(
                timed, image, SOURCE, TARGET, guidance=guidance, tau=tau, settings=settings, timings=timings, p2p=p2p
            )
        for name, seconds in timings.seconds.items():
            meter.seconds.setdefault(name, []).append(seconds)
        return result

    say(f"{task['label']}: warm-up edit")
    with meter.stage("warmup"):
        run()
    meter.seconds = {key: value for key, value in meter.seconds.items() if key in ("load", "sessions", "warmup")}
    result = None
    quiet = True if task.get("verbosity") == "quiet" else None  # tqdm's disable: None, a bar only on a terminal
    for _ in tqdm(range(task["repeats"]), desc=f"{task['label']} edits", unit="edit", file=sys.stderr, disable=quiet):
        result = run()
    out = Path(task["out"])
    np.save(out.with_suffix(".latents.npy"), timed.last_latents.numpy())
    np.save(out.with_suffix(".pixels.npy"), np.asarray(result))
    unet_calls = len(meter.seconds.get("unet_forward", [])) + len(meter.seconds.get("unet_reverse", []))
    evaluations = unet_calls // max(1, task["repeats"])
    return {"method": method, "unet_evaluations_per_edit": evaluations, "low_memory": model.low_memory}


def worker_quantize(task: dict[str, Any], meter: StageMeter, say: Callable[[str], None]) -> dict[str, Any]:
    """ONNX Runtime's int8 graphs of the export (`icdcli.bench.scale_engines`), or why the quantizer cannot."""
    from icdcli.bench.scale_engines import quantized_export

    with meter.stage("quantize"):
        try:
            folder = quantized_export(Path(task["export_dir"]), say)
        except ICDError as error:
            return {"skipped": str(error)}
    return {"int8_dir": str(folder)}


WORKERS = {"prepare": worker_prepare, "export": worker_export, "quantize": worker_quantize, "run": worker_run}


def run_worker(task_path: Path) -> None:
    """Run the task in `task_path` and write its result beside it (`.result.json`)."""
    import logging

    from icdcli.core.quiet import quiet_libraries

    task = json.loads(task_path.read_text())
    verbosity = task.get("verbosity", "normal")  # the parent command's -q / -v
    level = {"quiet": logging.ERROR, "verbose": logging.DEBUG}.get(verbosity, logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")  # the icd logger, on stderr
    if verbosity != "verbose":
        quiet_libraries()
    meter = StageMeter(task_path.with_suffix(".status.json"))
    if task["device"].startswith("cuda"):
        import torch

        meter.synchronize = torch.cuda.synchronize

    def say(message: str) -> None:
        if verbosity != "quiet":
            print(message, file=sys.stderr, flush=True)

    try:
        result = WORKERS[task["kind"]](task, meter, say)
    except ICDError as error:  # what to do, said in one line: the report's failure names it
        result = {"error": str(error)}
    finally:
        meter.close()
    seconds = {name: values for name, values in meter.seconds.items()}
    if meter.synchronize is not None:
        import torch

        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
    result |= {"seconds": seconds, "peak_rss_gb": round(peak_rss() / GB, 3), "peak_rss_gb_by_stage": meter.peaks_gb(),
               "peak_anon_gb": round(meter.anon_peak / GB, 3)}  # fmt: skip
    task_path.with_suffix(".result.json").write_text(json.dumps(result))


# --- the parent ---------------------------------------------------------------------------------------------


@dataclass
class WorkerOutcome:
    result: dict[str, Any] | None
    failure: str | None = None
    stage: str | None = None


def spawn(task: dict[str, Any], folder: Path, name: str) -> WorkerOutcome:
    """Run one worker process; its stderr (progress) passes through."""
    task_path = folder / f"{name}.json"
    task_path.write_text(json.dumps(task))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.run([sys.executable, "-m", "icdcli.bench.scale", str(task_path)], env=env, check=False)
    result_path = task_path.with_suffix(".result.json")
    status = task_path.with_suffix(".status.json")
    stage = json.loads(status.read_text())["stage"] if status.is_file() else None
    if process.returncode == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        if "error" in result:
            return WorkerOutcome(None, f"{result['error']} (during stage {stage or 'start-up'})", stage)
        return WorkerOutcome(result)
    if process.returncode in (-9, 137):
        why = "killed (SIGKILL: out of memory, most likely)"
    else:
        why = f"exited with status {process.returncode}"
    return WorkerOutcome(None, f"{why} during stage {stage or 'start-up'}", stage)


def _summary(seconds: dict[str, list[float]], repeats: int) -> dict[str, float | None]:
    """Per stage: the median over the timed edits of its per-edit total, or its one value (load, export, ...);
    `unet_eval`: the mean of one UNet evaluation."""
    out: dict[str, float | None] = {}
    for name, values in _edit_totals(seconds, repeats).items():
        out[name] = round(statistics.median(values), 4)
    evaluations = seconds.get("unet_forward", []) + seconds.get("unet_reverse", [])
    out["unet_eval"] = round(statistics.mean(evaluations), 4) if evaluations else None
    return out


def _edit_totals(seconds: dict[str, list[float]], repeats: int) -> dict[str, list[float]]:
    """Per-edit totals of the stages that run several times per edit (UNet evaluations, text encoding)."""
    totals = dict(seconds)
    for name in ("unet_forward", "unet_reverse", "text_encoder", "vae_encode", "vae_decode"):
        values = seconds.get(name, [])
        if values and repeats and len(values) % repeats == 0:
            per = len(values) // repeats
            totals[name] = [sum(values[i * per : (i + 1) * per]) for i in range(repeats)]
    return totals


def _size_of(path: Path | None) -> float | None:
    from icdcli.export.files import folder_size

    if path is None or not path.exists():
        return None
    return round(folder_size(path) / GB, 3)


def bench_scale(options: ScaleOptions, progress: Callable[[str], None] | None = None, work: Path | None = None) -> dict:
    """Build (once) and run the scale benchmark; the report `icd bench scale --json` prints."""
    import tempfile

    from icdcli.bench.scale_models import RELEASE, scale_files

    say = progress or (lambda message: None)
    if options.arch not in RELEASE:
        raise ICDError(f"unknown --arch {options.arch!r}: choose sd15 or sdxl")
    rows = parse_rows(options.backends, options.precision)
    files, built = scale_files(options.arch, options.width, options.seed, say)
    size = options.size or RELEASE[options.arch]["size"]
    base_task = {
        "files": {k: str(v) for k, v in asdict(files).items()},
        "precision": options.precision,
        "device": options.device,
        "size": size,
        "method": options.method,
        "repeats": options.repeats,
        "seed": options.seed,
        "low_memory": options.low_memory,
        "verbosity": options.verbosity,
    }
    report: dict[str, Any] = {
        "arch": options.arch,
        "size": size,
        "width_scale": options.width,
        "precision": options.precision,
        "device": options.device,
        "repeats": options.repeats,
        "files_gb": {k: round(v / GB, 3) for k, v in files.sizes().items()},
        "stages": {"build": round(built, 2) if built is not None else None},
        "rows": [],
        "skipped": {},
        "failures": {},
        "disk_gb": {},
    }
    runnable = []
    for row in rows:
        reason = backend_skip_reason(row.backend, row.precision, options.device)
        if reason:
            report["skipped"][row.label] = reason
        else:
            runnable.append(row)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        folder = Path(scratch)
        if not runnable or not _prepare_caches(runnable, base_task, folder, report, say):
            return report
        outputs: dict[str, Path] = {}
        exports: dict[str, tuple[str, dict[str, Any]]] = {}
        for row in runnable:
            out = _run_row(row, base_task, folder, report, say, exports)
            if out is not None:
                outputs[row.label] = out
        _add_parity(report, outputs, {row.label: row.precision for row in rows})
    return report


def _row_task(row: RowSpec, base_task: dict[str, Any]) -> dict[str, Any]:
    """The worker task of a row: `precision` is what the PyTorch model loads at (and the fused cache's half flag and
    the export's precision follow from it), `row_precision` what the backend runs."""
    return {**base_task, "precision": row.load_precision, "row_precision": row.precision, "backend": row.backend,
            "label": row.label}  # fmt: skip


def _prepare_caches(
    rows: list[RowSpec], base_task: dict[str, Any], folder: Path, report: dict[str, Any], say: Callable[[str], None]
) -> bool:
    """Fuse the LoRA files into each fused cache the rows read (fp32, and half for fp16/bf16 PyTorch rows): stages
    `fuse` or `load_cached` (with `_half` for the half cache when both are read). False when fusing failed."""
    firsts = {row.half_cache: row for row in reversed(rows)}  # per cache, its first row
    for half in dict.fromkeys(row.half_cache for row in rows):
        task = _row_task(firsts[half], base_task)
        suffix = "_half" if half and len(firsts) > 1 else ""
        fused_cache = _fused_cache_path(task)
        stage = ("load_cached" if fused_cache.is_dir() else "fuse") + suffix
        say("fusing the LoRA files (the path of --base/--teacher/--forward-lora/--reverse-lora)")
        prepared = spawn({**task, "kind": "prepare"}, folder, f"prepare{suffix}")
        if prepared.result is None:
            report["failures"]["fuse" + suffix] = prepared.failure
            return False
        report["stages"][stage] = round(prepared.result["seconds"]["load"][0], 2)
        report["stages"][f"{stage}_peak_rss_gb"] = prepared.result["peak_rss_gb"]
        report["stages"][f"{stage}_peak_anon_gb"] = prepared.result["peak_anon_gb"]
        report["disk_gb"]["fused_cache" + suffix] = _size_of(fused_cache)
    return True


def _add_parity(report: dict[str, Any], outputs: dict[str, Path], precisions: dict[str, str]) -> None:
    """Each row's parity against the reference row (the first fp32 row that ran, else the first), and the summary."""
    reference = reference_label(list(outputs), precisions)
    per_row = row_parity(outputs, reference)
    for row in report["rows"]:
        row["parity"] = per_row.get(row["row"])
    report["parity"] = parity(outputs, reference)


def _export(
    row: RowSpec, task: dict[str, Any], folder: Path, report: dict[str, Any], say: Callable[[str], None],
    exports: dict[str, tuple[str, dict[str, Any]]],
) -> dict[str, Any] | None:  # fmt: skip
    """Export for a graph backend (or find the export current), and for an int8 ONNX Runtime row quantize its UNets:
    what the row records of it, or None where it failed or the quantizer cannot (noted in `report`).

    `exports` keeps, per PyTorch precision, the first row that exported and its worker's result: the rows after it
    that load the model at the same precision run the same export (OpenVINO and int8 rows all read the fp32 one), so
    no other worker loads the model to find it current; such a row records `export_shared_with` instead of seconds."""
    name = row.label.replace(":", "-")
    shared = exports.get(row.load_precision)
    if shared is not None:
        first, result = shared
        say(f"{row.label} runs the export made for {first}")
        found: dict[str, Any] = {"seconds": {}, "export_shared_with": first}
    else:
        say(f"exporting for {row.label}")
        exported = spawn({**task, "kind": "export"}, folder, f"export-{name}")
        if exported.result is None:
            report["failures"][f"{row.label} export"] = exported.failure
            return None
        result = exported.result
        exports[row.load_precision] = (row.label, result)
        found = {"seconds": {"export": result["seconds"]["export"][0]},
                 "export_peak_rss_gb": result["peak_rss_gb_by_stage"].get("export"),
                 "export_peak_anon_gb": result["peak_anon_gb"]}  # fmt: skip
    export_dir = Path(result["export_dir"])
    report["disk_gb"].setdefault("export", _size_of(export_dir))
    if row.backend != "onnxruntime" or row.precision != "int8":
        return found
    say(f"quantizing for {row.label}")
    quantized = spawn({**task, "kind": "quantize", "export_dir": str(export_dir)}, folder, f"quantize-{name}")
    if quantized.result is None:
        report["failures"][f"{row.label} quantize"] = quantized.failure
        return None
    if "skipped" in quantized.result:
        report["skipped"][row.label] = quantized.result["skipped"]
        return None
    found["seconds"]["quantize"] = quantized.result["seconds"]["quantize"][0]
    found["quantize_peak_rss_gb"] = quantized.result["peak_rss_gb"]
    report["disk_gb"]["export_int8"] = _size_of(Path(quantized.result["int8_dir"]))
    return found


def _run_row(
    row: RowSpec, base_task: dict[str, Any], folder: Path, report: dict[str, Any], say: Callable[[str], None],
    exports: dict[str, tuple[str, dict[str, Any]]],
) -> Path | None:  # fmt: skip
    """Export (when the backend needs it, see `_export` for `exports`) and time one row; adds it (or its failure) to
    `report`. Returns where its last edit's arrays are, for the parity check."""
    task = _row_task(row, base_task)
    repeats, size = task["repeats"], task["size"]
    record: dict[str, Any] = {"backend": row.backend, "precision": row.precision, "row": row.label}
    extra: dict[str, Any] = {}
    if row.exports:
        found = _export(row, task, folder, report, say, exports)
        if found is None:
            return None
        extra = found.pop("seconds")
        record |= found
    say(f"timing {row.label}: a warm-up and {repeats} edits at {size} px")
    name = row.label.replace(":", "-")
    out = folder / f"run-{name}"
    ran = spawn({**task, "kind": "run", "out": str(out)}, folder, f"run-{name}")
    if ran.result is None:
        report["failures"][row.label] = ran.failure
        return None
    seconds = _summary(ran.result["seconds"], repeats)
    record["seconds"] = {**{k: round(v, 2) for k, v in extra.items()}, **seconds}
    record |= {
        key: ran.result[key]
        for key in ("method", "unet_evaluations_per_edit", "low_memory", "peak_rss_gb", "peak_anon_gb")
    }
    record["peak_rss_gb_by_stage"] = ran.result["peak_rss_gb_by_stage"]
    report["rows"].append(record)
    return out


def _fused_cache_path(task: dict[str, Any]) -> Path:
    """Where the user's path keeps this model fused (`load_lora_cached`)."""
    from icdcli.core.paths import cache_root
    from icdcli.models.fusion import LoraSources

    files = task["files"]
    sources = LoraSources(
        Path(files["base"]), Path(files["teacher"]), Path(files["forward_lora"]), Path(files["reverse_lora"]),
        cache_half=task["precision"] in ("fp16", "bf16"),
    )  # fmt: skip
    return cache_root() / "merged" / sources.cache_key()


if __name__ == "__main__":
    run_worker(Path(sys.argv[1]))
