#!/usr/bin/env bash
# Train the inversion-table ablation variants (cd2, cd3, cd4, cd4+lf, cd4+lf+lr) side by side on one
# CUDA GPU, each for exactly the same number of consistency steps on the run's guidance stage, and
# time edits with PyTorch on CUDA. Usage: benchmarks/gpu-variants.sh RUN_DIR OUT_DIR [STEPS]
#
# RUN_DIR needs only its finished guidance/ stage. OUT_DIR receives one tar per variant (its fp16
# adapters, icd.json and training records: unpack it into RUN_DIR), CUDA latency tables and a log.
set -u
run=${1:?RUN_DIR}
out=${2:?OUT_DIR}
steps=${3:-800}
mkdir -p "$out"
log="$out/log.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
  python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)" 2>&1 | tail -1
  python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
} >>"$log" 2>&1

for size in 32 512; do
  icd bench latency --device cuda --backends torch --size "$size" --limit 10 --json \
    >"$out/latency-cuda-$size.json" 2>>"$log"
done

variants=(cd2 cd3 cd4 cd4+lf cd4+lf+lr)
started=$(date +%s)
for v in "${variants[@]}"; do
  OMP_NUM_THREADS=3 icd train "$run" --variant "$v" --steps "$steps" --minutes 5.5 \
    >"$out/train-$v.tmp" 2>&1 &
done
wait
echo "variants trained in $(( $(date +%s) - started )) s" >>"$log"
for v in "${variants[@]}"; do
  { echo "== $v"; tail -c 1500 "$out/train-$v.tmp"; echo; } >>"$log"
  rm -f "$out/train-$v.tmp"
  tar -cf "$out/variant-${v//+/_}.tar" -C "$run" "variants/$v/icd.json" \
    $(cd "$run" && ls variants/"$v"/*.safetensors) \
    "consistency-$v/icd_lora.json" "consistency-$v/losses.jsonl" "consistency-$v/train_config.json" >>"$log" 2>&1
done
