"""`icd bench pie`: PIE-Bench-format evaluation, one module per concern.

- `dataset`: the benchmark folder (mapping file, items, RLE masks) and where outputs go;
- `editing`: the edits, through `icd edit`'s runner (batches, resume, Ctrl-C), with PIE-Bench's records;
- `networks`: the metric networks from local weights (LPIPS, DINO structure distance, CLIP score);
- `scoring`: every metric of an output as the benchmark computes it, and the means per editing type;
- `report`: the report as Markdown tables and the files beside the outputs.

The click command is `icdcli.cli.bench_pie`. Nothing here imports torch at import time.
"""
