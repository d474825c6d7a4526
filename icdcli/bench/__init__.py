"""Benchmarks, one module per benchmark; `icd bench ...` commands call them.

- `scenes`: what the benchmarks on held-out procedural scenes share (scenes, round trips, the attribute
  classifier, Markdown tables);
- `inversion`: reconstruction quality (the paper's Table 2, at small scale);
- `shapes_edit`: edits scored against rendered ground truth;
- `latency`: seconds per edit per backend, iCD against the 50-step teacher baseline;
- `pie_fixture`: a PIE-Bench-format folder made from procedural scenes (`icd bench pie` runs on it here);
- `throughput`: images per second of `icd edit` at batch 1 against larger batches (`icd bench throughput`);
- `scale_models`, `scale`: SD1.5/SDXL-architecture files in the release's formats with random weights, and their
  run end to end per backend (`icd bench scale`; each stage a worker process, `python -m icdcli.bench.scale`);
- `gpu`: the PyTorch CUDA path at those sizes, models built in memory on the device, in eager, CUDA-graph and
  torch.compile modes, with fp16-vs-fp32 parity (`icd bench gpu`; `benchmarks/gpu.sh` runs it on a lent GPU); its
  parts in `gpu_report` (options, rows, the JSON file, the table), `gpu_machine` (facts, timing, the time budget),
  `gpu_models` (building the models on the device, execution modes) and `gpu_steps` (the timed rows, parity).

The PIE-Bench runner is the `icdcli.pie` package; `benchmarks/` at the repository root holds one-off research
scripts (P2P fractions and token mapping, variant pairing, start-up, the GPU run).
"""
