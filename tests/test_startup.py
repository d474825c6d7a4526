"""What start-up imports: `icd info` and choosing a model source stay free of torch and the model libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

HEAVY = ("torch", "diffusers", "transformers", "onnxruntime")


def _run_and_list_heavy(code: str) -> tuple[str, list[str]]:
    probe = f"import sys\n{code}\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    output, _, heavy = result.stdout.rpartition("HEAVY=")
    return output, [name for name in heavy.strip().split(",") if name]


def test_info_reads_torch_facts_without_importing_torch():
    output, heavy = _run_and_list_heavy(
        "from click.testing import CliRunner\nfrom icdcli.cli.main import main\n"
        "result = CliRunner().invoke(main, ['info', '--json'])\nassert result.exit_code == 0, result.output\n"
        "print(result.stdout)"
    )
    report = json.loads(output)
    assert report["torch"] == torch.__version__ and report["cuda"]["version"] == torch.version.cuda
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert heavy == ([] if torch.version.cuda is None and torch.version.hip is None else ["torch"])


def test_naming_a_model_source_imports_no_model_library():
    _, heavy = _run_and_list_heavy("import icdcli.models.sources, icdcli.models.single_file, icdcli.export.manifest")
    assert heavy == []
