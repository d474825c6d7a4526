"""Per-edit latency of each backend, iCD against the 50-step teacher baseline, in one run on one machine.

Methods: `icd4` (prompt swap) and `icd4-p2p` (Prompt-to-Prompt) with the iCD models; `ddim50`, DDIM50
inversion + 50 guided steps on the teacher as it is (guidance-distilled: one evaluation per step), and
`ddim50-cfg`, the same with real classifier-free guidance (two evaluations per guided step), which is
what the baseline costs with a teacher that is not guidance-distilled, as in the paper's comparison.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from icdcli.diffusion.denoiser import Conditioning, Denoiser, Guidance, PromptEmbedding, is_unguided, real_cfg
from icdcli.diffusion.recipe import P2POptions, SamplerSettings
from icdcli.editing.edits import edit

SOURCE = "a red square on a blue background"
TARGET = "a green square on a blue background"
DDIM_STEPS = 50


def sample_image(size: int) -> Image.Image:
    pixels = np.full((size, size, 3), (30, 60, 200), dtype=np.uint8)
    pixels[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (220, 40, 40)
    return Image.fromarray(pixels)


class RealCFGDenoiser:
    """Any denoiser's guided steps as real classifier-free guidance: a batch of two (unconditional and
    conditional) evaluated at w = 1 and combined. The cost of a teacher without guidance distillation."""

    def __init__(self, inner: Denoiser):
        self.inner = inner

    def __call__(self, x: Any, t: int, cond: Conditioning, guidance: Guidance = 1.0) -> Any:
        if is_unguided(guidance):
            return self.inner(x, t, cond, 1.0)

        def evaluate(xx: Any, prompt: PromptEmbedding, time_ids: Any) -> Any:
            return self.inner(xx, t, Conditioning(prompt, None, time_ids), 1.0)

        return real_cfg(evaluate, x, cond, guidance)


class RealCFGBaseline:
    """A model whose teacher runs real classifier-free guidance (for the `ddim50-cfg` row)."""

    def __init__(self, model: Any):
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    @property
    def teacher_denoiser(self) -> RealCFGDenoiser:
        return RealCFGDenoiser(self._model.teacher_denoiser)

    def needs_negative(self, guidance: float) -> bool:
        return guidance != 1.0


METHODS = ("icd", "icd-p2p", "ddim", "ddim-cfg")


def edit_runner(model: Any, image: Image.Image, method: str) -> Callable[[], None]:
    """One whole edit (VAE, text, inversion, decoding) of `image` by `method`: icd (prompt swap), icd-p2p
    (Prompt-to-Prompt), ddim (the teacher as it is) or ddim-cfg (the teacher under real CFG)."""
    sampler = "icd" if method.startswith("icd") else "ddim"
    settings = SamplerSettings(sampler, ddim_steps=DDIM_STEPS, seed=0)
    guidance = model.info.edit_guidance if sampler == "icd" else model.info.generate_guidance
    tau = model.info.tau if sampler == "icd" else 1.0
    runnable = RealCFGBaseline(model) if method == "ddim-cfg" else model
    p2p = P2POptions().resolve(model.info.edit) if method == "icd-p2p" else None  # the model's recipe

    def run() -> None:
        edit(runnable, image, SOURCE, TARGET, guidance=guidance, tau=tau, settings=settings, p2p=p2p)

    return run


def interleaved_medians(runners: dict[Any, Callable[[], None]], repeats: int) -> dict[Any, float]:
    """Median seconds of each runner over `repeats` rounds, after one warm-up call each.

    Each round calls every runner once in turn, so a machine that speeds up or slows down during the
    measurement shifts every row alike and the ratios between rows stay fair.
    """
    for run in runners.values():
        run()  # warm-up: sessions, allocations, CUDA graphs
    timings: dict[Any, list[float]] = {key: [] for key in runners}
    for _ in range(repeats):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            timings[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in timings.items()}


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
    *,
    repeats: int = 5,
    size: int | None = None,
    progress: Callable[[str], None] | None = None,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Any]:
    """Rows of seconds per edit for each runnable backend and method, and the speed-ups between them.

    Args:
        model: The PyTorch model; other backends are made from it.
        backends: Backend names to try; those that cannot run here are listed as skipped.
        repeats: Timed edits per row (after one warm-up).
        size: Image side in pixels; the model's native size when None.
        progress: Called with a line per backend.
        methods: Which edit methods to time.
    """
    from icdcli.backends.accelerated import accelerate, backend_problem, probe_backends

    say = progress or (lambda message: None)
    facts = probe_backends(model.device)
    image = sample_image(size or model.info.native_size)
    icd_method = f"icd{model.info.num_steps}"
    runners, skipped = {}, {}
    for backend in backends:
        problem = backend_problem(backend, facts)
        if problem:
            skipped[backend] = problem
            continue
        runnable = accelerate(model, backend, progress=say)
        for method in methods:
            name = method.replace("icd", icd_method).replace("ddim", f"ddim{DDIM_STEPS}")
            runners[(backend, name)] = edit_runner(runnable, image, method)
    rows = []
    for backend in dict.fromkeys(b for b, _ in runners):  # one backend at a time: their thread pools differ
        say(f"timing {backend}: {len(methods)} methods, {repeats} interleaved rounds")
        own = {key: run for key, run in runners.items() if key[0] == backend}
        medians = interleaved_medians(own, repeats)
        rows += [{"backend": b, "method": m, "seconds_per_edit": seconds} for (b, m), seconds in medians.items()]
    table = {(row["backend"], row["method"]): row["seconds_per_edit"] for row in rows}
    ddim, cfg, p2p = f"ddim{DDIM_STEPS}", f"ddim{DDIM_STEPS}-cfg", f"{icd_method}-p2p"
    speedup = {}
    for backend in ("onnxruntime", "tensorrt"):
        if (backend, icd_method) in table and ("torch", icd_method) in table:
            speedup[f"{backend}_vs_torch"] = table[("torch", icd_method)] / table[(backend, icd_method)]
        if (backend, p2p) in table and ("torch", p2p) in table:
            speedup[f"{backend}_vs_torch_p2p"] = table[("torch", p2p)] / table[(backend, p2p)]
    for backend in backends:  # the first backend with both rows gives the iCD-vs-baseline ratios
        if (backend, icd_method) in table and (backend, ddim) in table:
            speedup.setdefault("icd_vs_ddim50", table[(backend, ddim)] / table[(backend, icd_method)])
        if (backend, icd_method) in table and (backend, cfg) in table:
            speedup.setdefault("icd_vs_ddim50_cfg", table[(backend, cfg)] / table[(backend, icd_method)])
    overhead = {
        f"p2p_over_swap_{backend}": table[(backend, p2p)] / table[(backend, icd_method)]
        for backend in backends
        if (backend, p2p) in table and (backend, icd_method) in table
    }
    return {
        "device": device_description(model.device),
        "model": model.info.name,
        "image": list(image.size),
        "repeats": repeats,
        "rows": rows,
        "speedup": speedup,
        "overhead": overhead,
        "skipped": skipped,
    }
