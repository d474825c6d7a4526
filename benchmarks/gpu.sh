#!/usr/bin/env bash
# icd's PyTorch CUDA path measured on a borrowed GPU, in one call of at most 8 minutes (`icd bench gpu`).
# Usage, from the repository root on the GPU machine (torch with CUDA, transformers, safetensors, tokenizers,
# peft installed; diffusers may come as a wheel carried with the repository; no network needed):
#   benchmarks/gpu.sh [OUT_DIR]          # OUT_DIR defaults to $OUT (the device tool's), else ./gpu-out
# Environment:
#   DIFFUSERS_WHEEL  the diffusers wheel to install offline (default: every diffusers-*.whl under wheels/,
#                    shared/wheels/ or up to 3 folders down, newest version first, until one imports: carry
#                    0.42.1 and 0.35.2); nothing is installed when diffusers already imports
#   GPU_SECONDS      the whole script's budget in seconds (default 480: 8 minutes)
#   ARCHS            architectures of the main run (default: sd15)
#   SKIP_INSTALL     set to 1 when diffusers and icd are installed already
#   BENCH_ARGS       more options for both runs, after the script's own (a dry run on a CPU machine:
#                    BENCH_ARGS="--device cpu --width-scale 0.125 --size 128" SKIP_INSTALL=1 benchmarks/gpu.sh /tmp/o)
#
# Steps, logged to OUT_DIR/log.txt:
#   1. the machine: nvidia-smi, python, torch and its CUDA, transformers, onnxruntime's providers, TensorRT;
#   2. install the diffusers wheel and icd offline (pip install --no-index --no-deps --no-build-isolation -e .);
#   3. `icd bench gpu --json --out OUT_DIR/gpu.json` (SD1.5: eager, CUDA graphs, torch.compile; parity), the
#      report rewritten after every step, under `timeout`;
#   4. with the time left: SDXL in eager and CUDA-graph modes into OUT_DIR/gpu-sdxl.json.
# TensorRT or onnxruntime-gpu missing is recorded, never a reason to stop. Exit status: that of step 3.
set -u
started=$SECONDS
budget=${GPU_SECONDS:-480}
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/log.txt"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export ICD_CACHE_DIR=${ICD_CACHE_DIR:-${TMPDIR:-/tmp}/icd-gpu-cache} # nothing large lands in OUT_DIR
say() { echo "== $* ($((SECONDS - started)) s)" | tee -a "$log"; }
left() { echo $((budget - (SECONDS - started))); }

say "machine"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed (no driver?)" >>"$log"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv >>"$log" 2>&1
python3 - >>"$log" 2>&1 <<'PY'
import importlib.metadata as metadata
import importlib.util
import platform

import torch

print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version() if torch.cuda.is_available() else None)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch")
for name in ("transformers", "peft", "safetensors", "tokenizers", "accelerate", "onnx", "onnxruntime",
             "onnxruntime-gpu", "diffusers", "tensorrt"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
if importlib.util.find_spec("onnxruntime"):
    import onnxruntime

    print("onnxruntime providers", onnxruntime.get_available_providers())
PY
python3 -m pip freeze >"$out/pip-freeze.txt" 2>&1

say "install diffusers (carried wheel) and icd, offline"
if [ -n "${SKIP_INSTALL:-}" ]; then
  echo "SKIP_INSTALL: nothing installed" >>"$log"
elif python3 -c "import diffusers" >/dev/null 2>&1; then
  echo "diffusers already importable: $(python3 -c 'import diffusers; print(diffusers.__version__)')" >>"$log"
else
  # newest first: a diffusers that does not import beside this machine's huggingface_hub and transformers (0.42
  # needs huggingface_hub >= 1.32) gives way to the next carried one (0.35 needs >= 0.34)
  if [ -n "${DIFFUSERS_WHEEL:-}" ]; then
    wheels=$DIFFUSERS_WHEEL
  else
    wheels=$(find wheels shared/wheels . -maxdepth 3 -name 'diffusers-*.whl' -not -path './.git/*' 2>/dev/null |
      awk -F/ '!seen[$NF]++' | sort -t- -k2,2 -V -r)
  fi
  imported=""
  for wheel in $wheels; do
    [ -f "$wheel" ] || continue
    if ! python3 -m pip install --no-index --no-deps "$wheel" >>"$log" 2>&1; then
      say "installing $wheel failed (see the log)"
      continue
    fi
    if python3 -c "from diffusers import AutoencoderKL, UNet2DConditionModel" >>"$log" 2>&1; then
      imported=$wheel
      echo "diffusers from $wheel imports" >>"$log"
      break
    fi
    say "diffusers from $wheel does not import here (see the log)"
  done
  [ -z "$imported" ] && say "no carried diffusers wheel imports (set DIFFUSERS_WHEEL or put wheels under wheels/):" \
    "the bench will fail to build models"
fi
[ -z "${SKIP_INSTALL:-}" ] && { python3 -m pip install --no-index --no-deps --no-build-isolation -e . >>"$log" 2>&1 ||
  say "pip install -e . failed"; }
python3 -c "import tensorrt" >/dev/null 2>&1 || echo "TensorRT does not import: the PyTorch timings go on" >>"$log"

# the main run: what it measured is in gpu.json even when it is cut off
reserve=130 # seconds kept for the SDXL run
run_seconds=$(($(left) - reserve))
[ "$run_seconds" -lt 200 ] && run_seconds=$(($(left) - 15)) # too little for both: all of it to the main run
[ "$run_seconds" -lt 90 ] && run_seconds=90
limit=$((run_seconds - 30)) # imports, and the last write, inside the timeout
say "icd bench gpu --arch ${ARCHS:-sd15} (time limit $limit s, timeout $run_seconds s)"
arch_args=()
for arch in ${ARCHS:-sd15}; do arch_args+=(--arch "$arch"); done
# shellcheck disable=SC2086 # BENCH_ARGS is a list of options
timeout --kill-after=10 "$run_seconds" python3 -m icdcli bench gpu "${arch_args[@]}" --device cuda \
  --time-limit "$limit" --json --out "$out/gpu.json" ${BENCH_ARGS:-} >"$out/gpu.stdout.json" 2>"$out/gpu.log"
status=$?
[ $status -ne 0 ] && { say "icd bench gpu exited with $status"; tail -5 "$out/gpu.log" | tee -a "$log"; }

sdxl_seconds=$(($(left) - 5))
if [ "$sdxl_seconds" -ge 90 ]; then
  say "icd bench gpu --arch sdxl --mode eager --mode graphs (timeout $sdxl_seconds s)"
  # shellcheck disable=SC2086
  timeout --kill-after=10 "$sdxl_seconds" python3 -m icdcli bench gpu --arch sdxl --mode eager --mode graphs --no-parity \
    --device cuda --time-limit $((sdxl_seconds - 30)) --json --out "$out/gpu-sdxl.json" ${BENCH_ARGS:-} \
    >/dev/null 2>"$out/gpu-sdxl.log" || say "the SDXL run exited with $?"
else
  say "no time left for SDXL ($sdxl_seconds s)"
fi

say "summary"
python3 - "$out" <<'PY' 2>&1 | tee -a "$log"
import json
import sys
from pathlib import Path

for path in sorted(Path(sys.argv[1]).glob("gpu*.json")):
    if path.name.endswith("stdout.json"):
        continue
    try:
        report = json.loads(path.read_text())
    except ValueError as error:
        print(f"{path.name}: unreadable ({error})")
        continue
    print(f"{path.name}: {report.get('device')}, finished {report.get('finished')}, versions {report.get('versions')}")
    for row in report.get("rows", []):
        cells = [row["arch"], row["mode"], row["method"], row["batch"], row["status"], row.get("seconds"),
                 row.get("first_call_seconds"), row.get("peak_memory_gb"), row.get("stages"), row.get("reason")]
        print("  ", *cells, *(row.get("notes") or []))
    for kind, entries in report.get("parity", {}).items():
        for entry in entries:
            print("  parity", kind, entry)
    print("  backends", report.get("backends"))
PY
say "done: $out (exit $status)"
exit $status
