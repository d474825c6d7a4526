"""Per-edit latency of torch vs onnxruntime (and TensorRT where present), iCD vs the DDIM-50 baseline.

    python benchmarks/latency.py [--model NAME|PATH] [--device cpu|cuda] [--repeats 3] [--size 512]

Prints one line per (backend, sampler): the median seconds of a whole `icdcli.editing.edit` call (encode,
invert, decode, VAE) after one warm-up run. Exports (and TensorRT builds) happen before timing starts.
Timings on a machine shared with other jobs are not meaningful: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from PIL import Image


def scene(size: int) -> Image.Image:
    pixels = np.full((size, size, 3), (30, 60, 200), dtype=np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (220, 40, 40)
    return Image.fromarray(pixels)


def time_edit(model, image, sampler: str, repeats: int) -> float:
    from icdcli.editing import SamplerSettings, edit

    settings = SamplerSettings(sampler, ddim_steps=50, seed=0)
    guidance = model.info.edit_guidance if sampler == "icd" else model.info.generate_guidance
    tau = model.info.tau if sampler == "icd" else 1.0
    args = (image, "a red square on a blue background", "a green square on a blue background", guidance, tau, settings)
    edit(model, *args)  # warm-up: sessions, allocations, CUDA graphs
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        edit(model, *args)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or preset (default: the embedded model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--backends", default="torch,onnxruntime,tensorrt")
    options = parser.parse_args()
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")

    from icdcli.accelerated import accelerate, backend_problem, probe_backends
    from icdcli.models import resolve_device
    from icdcli.sources import ModelRequest, load_requested_model

    device = resolve_device(options.device)
    model = load_requested_model(ModelRequest(options.model), need_teacher=True).to(device)
    image = scene(options.size or model.info.native_size)
    facts = probe_backends(device)
    print(f"model {model.info.name}, device {device}, image {image.size}, median of {options.repeats}")
    for backend in options.backends.split(","):
        problem = backend_problem(backend, facts)
        if problem:
            print(f"{backend:12s} skipped: {problem}")
            continue
        runnable = accelerate(model, backend)
        for sampler, label in (("icd", f"iCD {model.info.num_steps}-step"), ("ddim", "DDIM-50")):
            print(f"{backend:12s} {label:12s} {time_edit(runnable, image, sampler, options.repeats):8.3f} s/edit")


if __name__ == "__main__":
    main()
