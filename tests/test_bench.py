import numpy as np
import pytest

from icdcli.bench.inversion import bench_inversion
from icdcli.bench.scenes import classify, edit_pairs, markdown_table
from icdcli.bench.shapes_edit import bench_shapes_edit
from icdcli.training.scenes import EDIT_KINDS, change_mask


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_classify_recovers_the_rendered_attribute_under_noise(kind):
    rng = np.random.default_rng(0)
    hits = 0
    pairs = [p for p in edit_pairs(20) if p[2] == kind]
    for _, target, _ in pairs:
        image = target.render(32).astype(np.float64) + rng.normal(0, 20, (32, 32, 3))
        attribute = {"colour": target.colour, "shape": target.shape, "background": target.background}[kind]
        hits += classify(np.clip(image, 0, 255), target, kind) == attribute
    assert hits == len(pairs)


def test_classify_rejects_the_unedited_source():
    wrong = 0
    for source, target, kind in edit_pairs(20):
        attribute = {"colour": target.colour, "shape": target.shape, "background": target.background}[kind]
        wrong += classify(source.render(32).astype(np.float64), target, kind) != attribute
    assert wrong == 60


def test_edit_pairs_change_exactly_one_attribute():
    for source, target, kind in edit_pairs(30):
        differs = [a for a in ("colour", "shape", "background") if getattr(source, a) != getattr(target, a)]
        assert differs == [kind]
        assert change_mask(source, target).any()


@pytest.mark.slow
def test_benches_run_end_to_end_on_a_tiny_model(merged_model):
    inversion = bench_inversion({"cd4+lf+lr": merged_model}, merged_model, count=4, batch=4)
    names = [row["config"] for row in inversion["rows"]]
    assert names == ["vae", "ddim50", "cd4+lf+lr", "ddim50-w8", "ddim50-w8-dcfg", "cd4+lf+lr-w8-dcfg"]
    assert "cd2" in inversion["skipped"] and inversion["n_images"] == 4
    assert all(np.isfinite(row["psnr"]) and row["mse"] >= 0 for row in inversion["rows"])
    edits = bench_shapes_edit(merged_model, count=2, batch=6)
    assert [(r["method"], r["kind"]) for r in edits["rows"]][:4] == [
        ("icd4-swap", "colour"), ("icd4-swap", "shape"), ("icd4-swap", "background"), ("icd4-swap", "all")
    ]  # fmt: skip
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in edits["rows"])
    assert "| method |" in markdown_table(edits["rows"], ["method", "kind", "accuracy"])


@pytest.mark.slow
def test_bench_commands_print_json(merged_dir):
    import json

    from click.testing import CliRunner

    from icdcli.cli.main import main

    inversion = CliRunner().invoke(main, ["bench", "inversion", "--model", str(merged_dir), "--limit", "2", "--json"])
    assert inversion.exit_code == 0, inversion.output
    report = json.loads(inversion.stdout)
    assert report["n_images"] == 2 and {"config", "mse", "psnr", "ssim"} <= report["rows"][0].keys()
    edits = CliRunner().invoke(main, ["bench", "shapes-edit", "--model", str(merged_dir), "--limit", "1", "--json"])
    assert edits.exit_code == 0, edits.output
    rows = json.loads(edits.stdout)["rows"]
    assert {row["method"] for row in rows} == {
        "icd4-swap", "ddim50-swap", "icd4-p2p", "ddim50-p2p", "icd4-p2p-blend", "icd4-p2p-blend-inversion",
        "icd4-swap-mask", "icd4-p2p-mask", "vae", "latent-blend-oracle",
    }  # fmt: skip
    assert {row["kind"] for row in rows} == {"colour", "shape", "background", "all"}
    localisation = json.loads(edits.stdout)["localisation"]
    assert [row["word_kind"] for row in localisation] == ["colour", "shape", "background"]
    assert all(0.0 <= row["iou"] <= 1.0 and 0.0 <= row["region"] <= 1.0 for row in localisation)
    p2p_only = CliRunner().invoke(
        main, ["bench", "shapes-edit", "--model", str(merged_dir), "--limit", "1", "--method", "p2p"]
    )
    assert p2p_only.exit_code == 0, p2p_only.output
    assert "icd4-p2p-blend" in p2p_only.stdout and "ddim50-swap" not in p2p_only.stdout
    assert "| word_kind | iou |" in p2p_only.stdout


@pytest.mark.slow
def test_bench_latency_json(merged_dir):
    import json

    import pytest
    from click.testing import CliRunner

    from icdcli.cli.main import main

    pytest.importorskip("onnxruntime")
    # pinned to the CPU, where TensorRT cannot run (on a GPU it would be timed, not skipped)
    args = ["bench", "latency", "--model", str(merged_dir), "--limit", "1", "--backends", "torch,onnxruntime,tensorrt",
            "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    methods = ("icd4", "icd4-p2p", "ddim50", "ddim50-cfg")
    assert {(row["backend"], row["method"]) for row in report["rows"]} == {
        (backend, method) for backend in ("torch", "onnxruntime") for method in methods
    }
    assert all(row["seconds_per_edit"] > 0 for row in report["rows"])
    assert {"onnxruntime_vs_torch", "onnxruntime_vs_torch_p2p", "icd_vs_ddim50", "icd_vs_ddim50_cfg"} <= report[
        "speedup"
    ].keys()
    assert {"p2p_over_swap_torch", "p2p_over_swap_onnxruntime"} == report["overhead"].keys()
    assert "tensorrt" in report["skipped"] and report["device"]


@pytest.mark.slow
def test_bench_inversion_lpips_column(merged_dir, tmp_path):
    import json

    from click.testing import CliRunner
    from test_pie import _lpips_file

    from icdcli.cli.main import main

    weights = _lpips_file(tmp_path)
    result = CliRunner().invoke(
        main, ["bench", "inversion", "--model", str(merged_dir), "--limit", "2", "--lpips", str(weights), "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert all(row["lpips"] >= 0 for row in rows) and len({round(row["lpips"], 9) for row in rows}) > 1
    missing = CliRunner().invoke(main, ["bench", "inversion", "--model", str(merged_dir), "--lpips", "nope.pth"])
    assert missing.exit_code == 1 and "--lpips" in missing.output
