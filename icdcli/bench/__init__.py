"""Benchmarks, one module per benchmark; `icd bench ...` commands call them.

- `scenes`: what the benchmarks on held-out procedural scenes share (scenes, round trips, the attribute
  classifier, Markdown tables);
- `inversion`: reconstruction quality (the paper's Table 2, at small scale);
- `shapes_edit`: edits scored against rendered ground truth;
- `latency`: seconds per edit per backend, iCD against the 50-step teacher baseline;
- `pie_fixture`: a PIE-Bench-format folder made from procedural scenes (`icd bench pie` runs on it here).
"""
