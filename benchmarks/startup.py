"""Start-up times: `icd info`, and loading the embedded model split into its parts, each in a fresh process.

Usage, from the repository root with icd installed:  python benchmarks/startup.py [--runs 5] [--json]

Each figure is the median over `--runs` fresh interpreters (wall seconds, and CPU seconds of the process,
which a busy machine inflates less). The fused-model cache is warmed first, so no row includes fusing.
Rows:
  info            `icd info` end to end (the interpreter's own start-up included)
  import torch    `import torch` alone
  libraries       diffusers' UNet/VAE and transformers' CLIP imported after torch
  model build     `load_requested_model()` of the embedded model once the libraries are imported
  model load      the same from `import icdcli.models.sources` on: libraries and build together, as `icd edit` pays it
  onnxruntime load  `load_model(..., backend="onnxruntime")` after `import torch`, the export current: the lean
                  load from the export (icdcli.backends.graph_model), its sessions opened on first use
  edit onnxruntime  `icd edit examples/red-circle.png ... --backend onnxruntime` end to end, one fresh process:
                  what a script that calls icd once per file pays per image (its optimized graphs in the cache)
  edit onnxruntime, optimizing  the same with ICD_ORT_CACHE=0: every session optimizes its graph anew, as each
                  process did before optimized graphs were kept
  edit openvino   the same on `--backend openvino` (where openvino is installed), its compiled graphs in the cache
  edit openvino, compiling  the same with ICD_OPENVINO_CACHE=0: every graph compiled anew, as each process did before
                  compiled graphs were cached
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PROBE = r"""
import json, resource, sys, time
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
marks = {}
start, start_cpu = time.perf_counter(), cpu()
import torch
marks["import torch"] = (time.perf_counter() - start, cpu() - start_cpu)
if sys.argv[1] == "split":
    t, c = time.perf_counter(), cpu()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel
    marks["libraries"] = (time.perf_counter() - t, cpu() - c)
t, c = time.perf_counter(), cpu()
if sys.argv[1] == "onnxruntime":
    from icdcli.cli.common import load_model
    options = dict(model=None, base=None, teacher=None, forward_lora=None, reverse_lora=None, device="cpu",
                   precision="auto")
    load_model(options, need_teacher=False, backend="onnxruntime")
    marks["onnxruntime load"] = (time.perf_counter() - t, cpu() - c)
    print(json.dumps(marks))
    sys.exit(0)
from icdcli.models.sources import ModelRequest, load_requested_model
load_requested_model(ModelRequest())
marks["model build" if sys.argv[1] == "split" else "model load"] = (time.perf_counter() - t, cpu() - c)
print(json.dumps(marks))
"""


def _median(samples: list[tuple[float, float]]) -> dict[str, float]:
    return {"seconds": round(statistics.median(s[0] for s in samples), 3),
            "cpu_seconds": round(statistics.median(s[1] for s in samples), 3)}  # fmt: skip


EDIT = ["examples/red-circle.png", "--src", "a red circle on a blue background",
        "--tgt", "a yellow circle on a blue background", "--backend", "onnxruntime", "--overwrite"]  # fmt: skip


def _icd(*args: str, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of one `icd ARGS` process."""
    before = os.times()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "icdcli", *args], check=True, capture_output=True, env=env)
    after = os.times()
    return time.perf_counter() - start, (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )


def measure(runs: int) -> dict[str, object]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", PROBE, "whole"], check=True, capture_output=True, env=env)  # warm the cache
    samples: dict[str, list[tuple[float, float]]] = {}
    folder = tempfile.mkdtemp(prefix="icd-startup-")
    _icd("edit", *EDIT, "-o", os.path.join(folder, "edit.png"))  # exports on first use
    openvino = importlib.util.find_spec("openvino") is not None
    on_openvino = [*EDIT[:-3], "--backend", "openvino", "--overwrite", "-o", os.path.join(folder, "openvino.png")]
    if openvino:
        _icd("edit", *on_openvino)  # compiles the graphs into the cache
    for _ in range(runs):
        samples.setdefault("info", []).append(_icd("info"))
        samples.setdefault("edit onnxruntime", []).append(_icd("edit", *EDIT, "-o", os.path.join(folder, "edit.png")))
        optimizing = {**os.environ, "ICD_ORT_CACHE": "0"}
        samples.setdefault("edit onnxruntime, optimizing", []).append(
            _icd("edit", *EDIT, "-o", os.path.join(folder, "edit.png"), env=optimizing)
        )
        if openvino:
            samples.setdefault("edit openvino", []).append(_icd("edit", *on_openvino))
            compiling = {**os.environ, "ICD_OPENVINO_CACHE": "0"}
            samples.setdefault("edit openvino, compiling", []).append(_icd("edit", *on_openvino, env=compiling))
        for mode in ("split", "whole", "onnxruntime"):
            out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, env=env)
            for name, value in json.loads(out.stdout.decode().strip().splitlines()[-1]).items():
                samples.setdefault(name, []).append(tuple(value))
    shutil.rmtree(folder, ignore_errors=True)
    order = ["info", "import torch", "libraries", "model build", "model load", "onnxruntime load", "edit onnxruntime",
             "edit onnxruntime, optimizing"]  # fmt: skip
    order += ["edit openvino", "edit openvino, compiling"] if openvino else []
    return {
        "runs": runs,
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
        "rows": [{"step": name, **_median(samples[name])} for name in order],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"median of {result['runs']} fresh processes; {result['cpus']} CPUs, load average {result['load_average']}")
    print("| step | seconds | CPU seconds |\n| --- | --- | --- |")
    for row in result["rows"]:
        print(f"| {row['step']} | {row['seconds']:.2f} | {row['cpu_seconds']:.2f} |")


if __name__ == "__main__":
    main()
