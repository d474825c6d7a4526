#!/usr/bin/env bash
# The first run of icd's TensorRT path on a CUDA GPU that has (or can install) TensorRT 10.x–11.x.
# Usage, from the repository root with icd installed (pip install -e ".[test]"):
#   benchmarks/first-contact.sh [OUT_DIR]
# Environment:
#   MODEL         the model to try (default: default, the embedded model; sd15 etc. where cached)
#   WHEELS        a folder of wheels to install TensorRT, polygraphy and onnx-graphsurgeon from, offline
#   SKIP_INSTALL  set to 1 when TensorRT is already installed
#
# Steps, each logged to OUT_DIR/log.txt and summed up in OUT_DIR/summary.json:
#   1. the machine: GPU, driver, torch and its CUDA;
#   2. install the TensorRT wheel that matches torch's CUDA (tensorrt-cu12 / tensorrt-cu13), polygraphy,
#      onnx-graphsurgeon;
#   3. the gated TensorRT test (tests/test_engines.py -k tensorrt) and the fake-module tests;
#   4. fp16 exports with and without --fp32-norm: one reverse-UNet step on TensorRT against PyTorch fp16 at the
#      native size and at a 2.6:1 working size, engine build times, a timed edit on TensorRT and on PyTorch,
#      peak memory (torch's peak and the GPU's used memory).
# Exit status: 0 when every step ran; the numbers decide whether TensorRT works.
set -u
out=${1:-first-contact-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/log.txt"
export ICD_CACHE_DIR=${ICD_CACHE_DIR:-$out/cache}  # a fresh cache: every export and build is timed
status=0
say() { echo "== $*" | tee -a "$log"; }

say "machine"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >>"$log" 2>&1

say "install TensorRT for torch's CUDA"
cuda_major=$(python3 -c "import torch; print((torch.version.cuda or '0').split('.')[0])")
if [ -z "${SKIP_INSTALL:-}" ] && ! python3 -c "import tensorrt" >/dev/null 2>&1; then
  source_args=()
  [ -n "${WHEELS:-}" ] && source_args=(--no-index --find-links "$WHEELS")
  python3 -m pip install "${source_args[@]}" "tensorrt-cu${cuda_major}>=10.0,<12" "polygraphy>=0.49" \
    "onnx-graphsurgeon>=0.5" >>"$log" 2>&1 || say "pip install failed (see the log)"
fi
if ! python3 -c "import tensorrt as t; print('tensorrt', t.__version__)" >>"$log" 2>&1; then
  say "TensorRT does not import: nothing more to try"
  exit 1
fi

say "gated TensorRT test and fake-module tests"
python3 -m pytest -q -rs tests/test_engines.py -k tensorrt tests/test_tensorrt_fake.py >"$out/pytest.txt" 2>&1 || status=1
tail -5 "$out/pytest.txt" | tee -a "$log"

say "one UNet step against PyTorch fp16, build times, timed edits, peak memory"
python3 - "$out" "${MODEL:-default}" >>"$log" 2>&1 <<'PY' || status=1
import json
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from icdcli.accelerated import accelerate, ensure_exported
from icdcli.editing import SamplerSettings, edit
from icdcli.images import fit_size
from icdcli.sources import ModelRequest, load_requested_model

out, name = sys.argv[1], sys.argv[2]
device = torch.device("cuda")
model = load_requested_model(ModelRequest(name), need_teacher=False, progress=print)
model.to(device, torch.float16)
native, multiple, factor = model.info.native_size, model.info.size_multiple, model.vae_scale_factor


def gpu_used_mib() -> int:
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={device.index or 0}"]
    return int(subprocess.run(query, capture_output=True, text=True).stdout.split()[0])


def photo(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)
    pixels[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = (220, 40, 40)
    return Image.fromarray(pixels)


def unet_step(fast, h: int, w: int) -> float:
    """max |tensorrt - torch| / (1 + max |torch|) of one guided reverse step at h x w pixels."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, model.latent_channels, h // factor, w // factor, generator=generator).to(device, torch.float16)
    cond = model.conditioning("a photo of a red square", h, w)
    with torch.no_grad():
        expected = model.reverse_denoiser(x, 999, cond, model.info.edit_guidance).float()
        actual = fast.reverse_denoiser(x, 999, cond, model.info.edit_guidance).float()
    return float((actual - expected).abs().max() / (1 + expected.abs().max()))


def timed_edit(runner, image: Image.Image, repeats: int = 3) -> float:
    args = (image, "a red square", "a green square", model.info.edit_guidance, model.info.tau, SamplerSettings(seed=0))
    edit(runner, *args)  # warm-up: engines built or loaded, CUDA graphs captured
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        edit(runner, *args)
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


wide_w, wide_h = fit_size(native * 13 // 5, native, native, multiple)  # a 2.6:1 photo: the landscape profile
summary = {"model": model.info.name, "native": native, "torch": torch.__version__}
summary["tensorrt"] = __import__("tensorrt").__version__
summary["torch_edit_s"] = timed_edit(model, photo(native, native))
for fp32_norm in (False, True):
    label = "fp32_norm" if fp32_norm else "fp16_norm"
    started = time.perf_counter()
    folder, _ = ensure_exported(model, "fp16", out_dir=f"{out}/onnx-{label}", fp32_norm=fp32_norm, progress=print)
    exported = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    fast = accelerate(model, "tensorrt", export_dir=folder, progress=print)
    started = time.perf_counter()
    step_native = unet_step(fast, native, native)  # builds the reverse engine
    built = time.perf_counter() - started
    row = {
        "export_s": round(exported, 1),
        "first_step_with_build_s": round(built, 1),
        "unet_step_rel_error_native": step_native,
        "unet_step_rel_error_wide": unet_step(fast, wide_h, wide_w),
        "edit_s_native": timed_edit(fast, photo(native, native)),
        "edit_s_wide": timed_edit(fast, photo(native * 13 // 5, native)),
        "torch_peak_mib": torch.cuda.max_memory_allocated() // 2**20,
        "gpu_used_mib": gpu_used_mib(),
    }
    summary[label] = row
    print(label, json.dumps(row))
    del fast
    torch.cuda.empty_cache()
with open(f"{out}/summary.json", "w") as handle:
    json.dump(summary, handle, indent=2)
print(json.dumps(summary, indent=2))
PY
say "summary: $out/summary.json (exit $status)"
exit $status
