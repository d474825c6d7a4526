"""Per-edit latency of each backend, iCD against the 50-step teacher baseline, in one run on one machine."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from icdcli.editing import SamplerSettings, edit

SOURCE = "a red square on a blue background"
TARGET = "a green square on a blue background"
DDIM_STEPS = 50


def sample_image(size: int) -> Image.Image:
    pixels = np.full((size, size, 3), (30, 60, 200), dtype=np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (220, 40, 40)
    return Image.fromarray(pixels)


def seconds_per_edit(model: Any, image: Image.Image, sampler: str, repeats: int) -> float:
    """Median wall time of a whole edit (VAE, text, inversion, decoding) after one warm-up edit."""
    settings = SamplerSettings(sampler, ddim_steps=DDIM_STEPS, seed=0)
    guidance = model.info.edit_guidance if sampler == "icd" else model.info.generate_guidance
    tau = model.info.tau if sampler == "icd" else 1.0
    edit(model, image, SOURCE, TARGET, guidance, tau, settings)  # warm-up: sessions, allocations, CUDA graphs
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        edit(model, image, SOURCE, TARGET, guidance, tau, settings)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def device_description(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU: {name}, {torch.get_num_threads()} threads"


def measure_latency(
    model: Any,
    backends: list[str],
    repeats: int = 5,
    size: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Rows of seconds per edit for each runnable backend and method, and the speed-ups between them."""
    from icdcli.accelerated import accelerate, backend_problem, probe_backends

    say = progress or (lambda message: None)
    facts = probe_backends(model.device)
    image = sample_image(size or model.info.native_size)
    icd_method = f"icd{model.info.num_steps}"
    rows, skipped = [], {}
    for backend in backends:
        problem = backend_problem(backend, facts)
        if problem:
            skipped[backend] = problem
            continue
        runnable = accelerate(model, backend, progress=say)
        for sampler, method in (("icd", icd_method), ("ddim", f"ddim{DDIM_STEPS}")):
            say(f"timing {backend} {method}")
            rows.append(
                {
                    "backend": backend,
                    "method": method,
                    "seconds_per_edit": seconds_per_edit(runnable, image, sampler, repeats),
                }
            )
    table = {(row["backend"], row["method"]): row["seconds_per_edit"] for row in rows}
    speedup = {}
    for backend in ("onnxruntime", "tensorrt"):
        if (backend, icd_method) in table and ("torch", icd_method) in table:
            speedup[f"{backend}_vs_torch"] = table[("torch", icd_method)] / table[(backend, icd_method)]
    for backend in backends:
        if (backend, icd_method) in table and (backend, f"ddim{DDIM_STEPS}") in table:
            speedup.setdefault("icd_vs_ddim50", table[(backend, f"ddim{DDIM_STEPS}")] / table[(backend, icd_method)])
    return {
        "device": device_description(model.device),
        "model": model.info.name,
        "image": list(image.size),
        "repeats": repeats,
        "rows": rows,
        "speedup": speedup,
        "skipped": skipped,
    }
