"""`icd bench gpu`: the PyTorch CUDA path at SD1.5 (and SDXL) size, measured on a GPU in a few minutes.

Models of the real architectures (`scale_models`' configs: the release's guidance-distilled UNets with
`time_cond_proj_dim=512`, its boundaries and edit recipe) are built in memory, directly on the device, with seeded
random weights - the cost of a network does not depend on its weights' values, and nothing is read from disk. Each
architecture then runs, in each execution mode (`eager`, `graphs`: CUDA graphs, `compile`: torch.compile; see
`icdcli.models.torch_speed`), one UNet evaluation at batch 1 and 2 and a whole prompt-swap and Prompt-to-Prompt edit
(`icdcli.editing.edits.edit_batch`), timed between `torch.cuda.synchronize()` calls, with GPU peak memory reset
per row.
Parity compares fp16 on the GPU with an fp32 copy of the same weights on the CPU: one evaluation, one whole edit.

The report is written (atomically) after every step: a run that is killed or times out leaves every row it
finished, and the rest say why they did not run. `--time-limit` skips the steps that would not fit and interrupts
a step that runs past it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from icdcli.bench.gpu_machine import Budget, Clocked, TimeLimitReached, backend_presence, machine_facts
from icdcli.bench.gpu_models import Built, build_model, check_size, default_attention, execution_notes, set_mode
from icdcli.bench.gpu_report import (
    ARCHS,
    EVAL_BATCHES,
    FORMAT,
    METHODS,
    MODES,
    NOT_REACHED,
    STARTED,
    GpuOptions,
    planned_parity,
    planned_rows,
    row_key,
    write_report,
)
from icdcli.bench.gpu_steps import estimate_seconds, measure_edit, measure_eval, parity_edit, parity_eval
from icdcli.core.errors import ICDError
from icdcli.diffusion.recipe import SD15, SDXL

CPU_ONLY = {
    "graphs": "CUDA graphs need a CUDA device (--device cuda)",
    "compile": "torch.compile rows are measured on CUDA only (--device cuda)",
    "parity": "parity compares fp16 on a CUDA GPU with fp32 on the CPU: needs --device cuda",
}
BUILD_GUESS = {SD15: 20.0, SDXL: 60.0}
"""Seconds a full-width build is assumed to take before one was measured (scaled by width squared)."""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


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
        return next(r for r in self.report["rows"] if row_key(r) == (arch, mode, method, batch))

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
        return estimate_seconds(self.measured, self.options, arch, mode, method, batch)

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
        notes_before = len(execution_notes(model))

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
            result["notes"] = execution_notes(model)[notes_before:]
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
        check_size(arch, options.size)
    say = progress or (lambda message: None)
    budget = Budget(options.time_limit, clock, interrupt)
    bench = GpuBench(options, say, budget)
    return bench.run()
