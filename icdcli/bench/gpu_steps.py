"""The timed steps of `icd bench gpu`: one guided reverse-UNet evaluation, a whole prompt-swap or Prompt-to-Prompt
edit (`icdcli.editing.edits.edit_batch`), parity of fp16 on the GPU against the fp32 CPU twin, and how long a
row is expected to take."""

from __future__ import annotations

import statistics
import time
from typing import Any

from icdcli.bench.gpu_machine import Budget, Clocked
from icdcli.bench.gpu_models import Built
from icdcli.bench.gpu_report import GpuOptions
from icdcli.bench.scale import SOURCE, TARGET
from icdcli.diffusion.recipe import SD15, SDXL
from icdcli.editing.stages import Timings

EVAL_WARMUP = 3
COMPILE_GUESS = {SD15: 60.0, SDXL: 150.0}
"""Seconds torch.compile's first call of a row is assumed to take before one was measured."""


def _eval_inputs(model: Any, batch: int, seed: int) -> tuple[Any, int, Any, float]:
    from icdcli.editing.stages import seeded_noise

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
    from icdcli.diffusion.recipe import P2POptions
    from icdcli.editing.edits import EditJob

    info = model.info
    p2p = P2POptions().resolve(info.edit) if method == "p2p" else None
    return EditJob(sample_image(info.native_size), SOURCE, TARGET, info.edit_guidance, info.tau, info.edit.seed, p2p)


def run_edit(model: Any, job: Any, timings: Timings) -> Any:
    """One whole edit (VAE, text, forward and reverse steps); an error the edit met is raised."""
    from icdcli.diffusion.recipe import SamplerSettings
    from icdcli.editing.edits import edit_batch

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


def estimate_seconds(
    measured: dict[tuple[str, str, str, int], dict[str, Any]], options: GpuOptions, arch: str, mode: str, method: str,
    batch: int,
) -> float:  # fmt: skip
    """Seconds a row is expected to take: its calls at the speed measured so far, plus a first call."""
    done = measured.get((arch, mode, method, batch)) or measured.get((arch, "eager", method, batch))
    if done is not None:
        steady = done["seconds"] or 0.0
    elif method == "eval":
        steady = (measured.get((arch, "eager", "eval", 1)) or {}).get("seconds", 0.0) * batch
    else:
        swap = measured.get((arch, "eager", "swap", 1))
        per_eval = (measured.get((arch, "eager", "eval", 1)) or {}).get("seconds", 0.0)
        steady = (swap["seconds"] if swap else 10 * per_eval) * (1.5 if method == "p2p" else 1.0)
    calls = (EVAL_WARMUP + options.eval_repeats) if method == "eval" else options.repeats
    first = steady
    if mode == "compile":
        firsts = [m["first_call_seconds"] for k, m in measured.items() if k[:2] == (arch, "compile")]
        first = max(firsts) if firsts else COMPILE_GUESS[arch] * max(options.width, 0.05) ** 2
    elif mode == "graphs":
        first = 2 * steady + 1.0 * options.width**2
    return first + calls * steady
