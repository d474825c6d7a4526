"""ONNX export: graph signatures, the manifest, and onnxruntime outputs against PyTorch on the tiny models.

Tolerance for fp32 graphs on onnxruntime vs PyTorch: |ort - torch| <= 1e-4 * (1 + max|torch|). Both sides
compute in float32 with the same weights; they differ only in summation order (onnxruntime fuses
attention, group norm and convolution differently), which moves results by ~1e-6 relative on these tiny
models. 1e-4 leaves headroom for other CPUs' SIMD widths while still catching any real graph error (a
wrong input, a missing scaling factor or guidance embedding changes results by O(1)).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (pip install 'icd[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="comparisons need onnxruntime (pip install 'icd[onnx]')")

from icdcli.diffusion.denoiser import guidance_scale_embedding  # noqa: E402
from icdcli.export import export_model, model_fingerprint, read_manifest, stale_reason  # noqa: E402
from icdcli.export.cleanup import save_graph  # noqa: E402
from icdcli.export.files import atomic_folder, file_lock  # noqa: E402
from icdcli.export.manifest import DEFAULT_OPSET, GUIDANCE_CFG, GUIDANCE_EMBEDDING, GUIDANCE_FOLDED  # noqa: E402

RTOL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The error relative to the tolerance (<= 1 passes)."""
    error = (actual.float() - expected.float()).abs().max().item()
    return error / (RTOL * (1.0 + expected.abs().max().item()))


def exported(tmp_path_factory, model, name: str, precision: str = "fp32") -> Path:
    """Export once per test session (shared by test_export and test_engines through the session's basetemp)."""
    folder = tmp_path_factory.getbasetemp() / "icd-exports" / f"{name}-{precision}"
    with file_lock(folder.parent / f".{folder.name}.lock"):
        if read_manifest(folder) is None:
            export_model(model, folder, precision=precision)
    return folder


def sdxl_model(sdxl_parts):
    from icdcli.models.fusion import LoraSources, fuse_lora_model

    parts = sdxl_parts
    return fuse_lora_model(LoraSources(parts.base, parts.teacher_pt, parts.forward_lora, parts.reverse_lora))


def cfg_model(merged_model):
    """An SD1.5 model whose UNets have no guidance distillation (real CFG, batch 2 on guided steps)."""
    from tiny import make_teacher

    from icdcli.models.info import ModelInfo
    from icdcli.models.runtime import ICDModel

    info = ModelInfo.from_json({**merged_model.info.to_json(), "guidance_distilled": False, "name": "tiny-cfg"})
    forward, reverse = make_teacher("sd15", 21, False), make_teacher("sd15", 22, False)
    teacher = make_teacher("sd15", 23, False)
    m = merged_model
    return ICDModel(info, m.vae, m.text_encoders, m.tokenizers, forward, reverse, teacher_unet=teacher, source="")


@pytest.fixture(scope="module")
def sd15_export(merged_model, tmp_path_factory):
    return exported(tmp_path_factory, merged_model, "sd15")


@pytest.fixture(scope="module")
def sdxl_setup(sdxl_parts, tmp_path_factory):
    model = sdxl_model(sdxl_parts)
    return model, exported(tmp_path_factory, model, "sdxl")


def session(folder: Path, graph: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / f"{graph}.onnx"), providers=["CPUExecutionProvider"])


def run(folder: Path, graph: str, **feeds: torch.Tensor) -> list[torch.Tensor]:
    outputs = session(folder, graph).run(None, {name: tensor.numpy() for name, tensor in feeds.items()})
    return [torch.from_numpy(array) for array in outputs]


def onnx_inputs(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {item.name: item.type.tensor_type.elem_type for item in graph.input}


# --- signatures and manifest ------------------------------------------------------------------------------


@pytest.mark.slow
def test_forward_graph_has_no_timestep_cond_and_reverse_takes_it(sd15_export):
    forward = onnx_inputs(sd15_export / "forward_unet.onnx")
    reverse = onnx_inputs(sd15_export / "reverse_unet.onnx")
    assert list(forward) == ["sample", "timestep", "encoder_hidden_states"]
    assert list(reverse) == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    manifest = read_manifest(sd15_export)
    assert manifest.graphs["forward_unet"].guidance == GUIDANCE_FOLDED
    assert manifest.graphs["reverse_unet"].guidance == GUIDANCE_EMBEDDING
    assert manifest.graphs["reverse_unet"].input("timestep_cond").shape == ["batch", 512]


@pytest.mark.slow
def test_manifest_records_model_precision_versions_and_hashes(sd15_export, merged_model):
    from icdcli.core.digests import files_sha256

    data = json.loads((sd15_export / "manifest.json").read_text())
    assert data["precision"] == "fp32" and data["opset"] == DEFAULT_OPSET
    assert data["info"]["reverse_boundaries"] == list(merged_model.info.reverse_boundaries)
    assert data["info"]["scaling_factor"] == merged_model.info.scaling_factor
    assert data["info"]["guidance_distilled"] is True
    assert data["fingerprint"] == model_fingerprint(merged_model)
    assert data["versions"]["torch"] and data["versions"]["onnx"] and data["versions"]["icd"]
    assert set(data["graphs"]) == {
        "forward_unet", "reverse_unet", "teacher_unet", "reverse_unet_p2p", "vae_encoder", "vae_decoder",
        "text_encoder"
    }  # fmt: skip
    for graph in data["graphs"].values():
        assert graph["sha256"] == files_sha256([sd15_export / graph["file"]])
        assert graph["external_data"] is None
    sample = data["graphs"]["reverse_unet"]["inputs"][0]
    assert sample == {"name": "sample", "dtype": "float32", "shape": ["batch", 4, "latent_height", "latent_width"]}


@pytest.mark.slow
def test_sdxl_graphs_take_text_embeds_and_time_ids(sdxl_setup):
    _, folder = sdxl_setup
    assert list(onnx_inputs(folder / "forward_unet.onnx")) == [
        "sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"
    ]  # fmt: skip
    assert "timestep_cond" in onnx_inputs(folder / "reverse_unet.onnx")
    manifest = read_manifest(folder)
    assert [o.name for o in manifest.graphs["text_encoder_2"].outputs] == ["hidden_states", "pooled"]
    assert [o.name for o in manifest.graphs["text_encoder"].outputs] == ["hidden_states"]


def whole_graphs() -> dict:
    """Graph entries (names only) of an export that holds every graph an edit needs."""
    return dict.fromkeys(("forward_unet", "reverse_unet", "vae_encoder", "vae_decoder", "text_encoder"))


def test_stale_reasons():
    from icdcli.export.manifest import Manifest

    manifest = Manifest("k", "abc", "fp32", DEFAULT_OPSET, {}, 2, 4, 12, whole_graphs())
    assert stale_reason(None, "abc", "fp32", DEFAULT_OPSET) == "no export yet"
    assert stale_reason(manifest, "abc", "fp32", DEFAULT_OPSET) is None
    assert "source model" in stale_reason(manifest, "xyz", "fp32", DEFAULT_OPSET)
    assert "precision" in stale_reason(manifest, "abc", "fp16", DEFAULT_OPSET)
    assert "opset" in stale_reason(manifest, "abc", "fp32", DEFAULT_OPSET + 1)
    assert "teacher" in stale_reason(manifest, "abc", "fp32", DEFAULT_OPSET, need_teacher=True)


def test_an_export_missing_a_graph_an_edit_needs_is_stale():
    """A folder left by an export that stopped (or holding only some graphs) is exported again, not failed at load."""
    from icdcli.export.manifest import Manifest

    for missing in ("forward_unet", "reverse_unet", "vae_encoder", "vae_decoder", "text_encoder"):
        graphs = {name: spec for name, spec in whole_graphs().items() if name != missing}
        reason = stale_reason(
            Manifest("k", "abc", "fp32", DEFAULT_OPSET, {}, 2, 4, 12, graphs), "abc", "fp32", DEFAULT_OPSET
        )
        assert reason == f"the export lacks the {missing} graph"
    two_missing = Manifest("k", "abc", "fp32", DEFAULT_OPSET, {}, 2, 4, 12, {"vae_encoder": None})
    assert "forward_unet, reverse_unet, vae_decoder, text_encoder graphs" in stale_reason(
        two_missing, "abc", "fp32", DEFAULT_OPSET
    )
    sdxl = {**whole_graphs(), "text_encoder_2": None}
    assert (
        stale_reason(Manifest("k", "abc", "fp32", DEFAULT_OPSET, {}, 2, 4, 12, sdxl), "abc", "fp32", DEFAULT_OPSET)
        is None
    )


def test_atomic_folder_leaves_nothing_behind_on_failure(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "half.onnx").write_text("partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as staging:
        (staging / "manifest.json").write_text("{}")  # what icd writes into an export: it may be replaced
    with atomic_folder(target) as staging:
        (staging / "again").write_text("ok")
    assert [p.name for p in target.iterdir()] == ["again"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    with pytest.raises(FileExistsError), atomic_folder(target) as staging:  # "again" has no manifest: not icd's
        (staging / "third").write_text("ok")
    assert [p.name for p in target.iterdir()] == ["again"]


@pytest.mark.slow
def test_external_data_round_trip(sd15_export, tmp_path):
    """Graphs over 2 GB keep weights in one external file: the same code path, forced on a small graph."""
    target = tmp_path / "vae_decoder.onnx"
    assert save_graph(sd15_export / "vae_decoder.onnx", target, large=True) == "vae_decoder.onnx.data"
    assert (tmp_path / "vae_decoder.onnx.data").stat().st_size > target.stat().st_size
    latents = torch.randn(1, 4, 8, 8)
    (expected,) = run(sd15_export, "vae_decoder", latents=latents)
    (actual,) = run(tmp_path, "vae_decoder", latents=latents)
    assert torch.equal(actual, expected)


# --- onnxruntime vs PyTorch, graph by graph ---------------------------------------------------------------


def unet_reference(unet, sample, t, hidden, cond=None, pooled=None, time_ids=None):
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        return unet(sample, t, encoder_hidden_states=hidden, timestep_cond=cond, added_cond_kwargs=added).sample


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("batch, latent_hw", [(1, (8, 8)), (2, (16, 8))])
@pytest.mark.slow
def test_unet_graphs_match_torch(family, batch, latent_hw, merged_model, sd15_export, sdxl_setup):
    model, folder = (merged_model, sd15_export) if family == "sd15" else sdxl_setup
    generator = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, 4, *latent_hw, generator=generator)
    timestep = torch.tensor([999.0, 259.0][:batch])
    cond = model.conditioning("a red circle", latent_hw[0] * 2, latent_hw[1] * 2)
    hidden = cond.prompt.hidden_states.expand(batch, -1, -1)
    extra, pooled, time_ids = {}, None, None
    if family == "sdxl":
        pooled, time_ids = cond.prompt.pooled.expand(batch, -1), cond.time_ids.expand(batch, -1)
        extra = {"text_embeds": pooled, "time_ids": time_ids}
    feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden, **extra}
    folded = guidance_scale_embedding(torch.ones(batch))
    expected = unet_reference(model.forward_unet, sample, timestep, hidden, folded, pooled, time_ids)
    assert close(run(folder, "forward_unet", **feeds)[0], expected) <= 1
    embedding = guidance_scale_embedding(torch.tensor([8.0, 3.0][:batch]))
    for graph, unet in (("reverse_unet", model.reverse_unet), ("teacher_unet", model.teacher_unet)):
        expected = unet_reference(unet, sample, timestep, hidden, embedding, pooled, time_ids)
        assert close(run(folder, graph, **feeds, timestep_cond=embedding)[0], expected) <= 1


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.slow
def test_vae_and_text_graphs_match_torch(family, merged_model, sd15_export, sdxl_setup):
    model, folder = (merged_model, sd15_export) if family == "sd15" else sdxl_setup
    pixels = torch.rand(2, 3, 32, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    (latents,) = run(folder, "vae_encoder", images=pixels)
    assert close(latents, model.encode_image(pixels)) <= 1
    (images,) = run(folder, "vae_decoder", latents=latents)
    assert close(images, model.decode_latents(latents)) <= 1
    expected = model.encode_prompt("a blue square on a white background")
    tokenizer = model.tokenizers[0]
    ids = tokenizer("a blue square on a white background", padding="max_length", return_tensors="pt").input_ids
    outputs = [run(folder, name, input_ids=ids.to(torch.int32)) for name in sorted(read_manifest(folder).graphs)
               if name.startswith("text_encoder")]  # fmt: skip
    hidden = torch.cat([output[0] for output in outputs], dim=-1)
    assert close(hidden, expected.hidden_states) <= 1
    if family == "sdxl":
        assert close(outputs[-1][1], expected.pooled) <= 1


@pytest.mark.slow
def test_cfg_unet_graph_serves_batch_one_and_two(merged_model, tmp_path_factory):
    model = cfg_model(merged_model)
    folder = exported(tmp_path_factory, model, "sd15-cfg")
    manifest = read_manifest(folder)
    assert {manifest.graphs[g].guidance for g in ("forward_unet", "reverse_unet")} == {GUIDANCE_CFG}
    assert "timestep_cond" not in onnx_inputs(folder / "reverse_unet.onnx")
    hidden = model.encode_prompt("a cat")
    for batch in (1, 2):
        sample = torch.randn(batch, 4, 8, 8)
        feeds = dict(
            sample=sample,
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=hidden.hidden_states.expand(batch, -1, -1),
        )
        expected = unet_reference(model.reverse_unet, sample, feeds["timestep"], feeds["encoder_hidden_states"])
        assert close(run(folder, "reverse_unet", **feeds)[0], expected) <= 1


@pytest.mark.slow
def test_fp16_export_types(merged_model, tmp_path_factory):
    """fp16 graphs are for TensorRT / CUDA: UNets and text encoders in fp16, the VAE's inputs and outputs fp32.

    Not run here: onnxruntime's CPU provider has no fp16 kernels for most of these ops."""
    folder = exported(tmp_path_factory, merged_model, "sd15", "fp16")
    float16, float32, int32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
    assert onnx_inputs(folder / "reverse_unet.onnx") == {
        "sample": float16, "timestep": float32, "encoder_hidden_states": float16, "timestep_cond": float16
    }  # fmt: skip
    assert onnx_inputs(folder / "vae_decoder.onnx") == {"latents": float32}
    assert onnx_inputs(folder / "text_encoder.onnx") == {"input_ids": int32}
    onnx.checker.check_model(str(folder / "forward_unet.onnx"))
    assert read_manifest(folder).precision == "fp16"
    assert next(merged_model.forward_unet.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.slow
def test_export_measured_error_is_tiny(merged_model, sd15_export):
    """Documents the measured fp32 error (docs/engines.md quotes it): far below the tolerance."""
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    hidden = merged_model.encode_prompt("a cat").hidden_states
    embedding = guidance_scale_embedding(torch.tensor([8.0]))
    feeds = dict(sample=sample, timestep=torch.tensor([519.0]), encoder_hidden_states=hidden)
    expected = unet_reference(merged_model.reverse_unet, sample, feeds["timestep"], hidden, embedding)
    actual = run(sd15_export, "reverse_unet", **feeds, timestep_cond=embedding)[0]
    assert np.abs((actual - expected).numpy()).max() < 1e-4


# --- sanitising for TensorRT, fp32 normalisation, --check -------------------------------------------------


def foldable_graph(path: Path) -> None:
    """y = x * (c1 + c2): the Add of two constants is what constant folding must remove."""
    from onnx import TensorProto, helper, numpy_helper

    c1 = numpy_helper.from_array(np.full((1, 4), 1.5, dtype=np.float32), "c1")
    c2 = numpy_helper.from_array(np.arange(4, dtype=np.float32).reshape(1, 4), "c2")
    nodes = [helper.make_node("Add", ["c1", "c2"], ["c"]), helper.make_node("Mul", ["x", "c"], ["y"])]
    graph = helper.make_graph(
        nodes, "foldable", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [c1, c2],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def ort_run(path: Path, **feeds: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("tool", ["polygraphy", "onnx-graphsurgeon"])
def test_constant_folding_removes_constant_nodes_and_keeps_outputs(tmp_path, monkeypatch, tool):
    pytest.importorskip("onnx_graphsurgeon")
    if tool == "polygraphy":
        pytest.importorskip("polygraphy")
    else:
        monkeypatch.setitem(__import__("sys").modules, "polygraphy.backend.onnx", None)  # as if not installed
    from icdcli.export.cleanup import fold_constants

    foldable_graph(tmp_path / "raw.onnx")
    folded, used = fold_constants(onnx.load(str(tmp_path / "raw.onnx")), large=False)
    assert used == tool
    assert [node.op_type for node in folded.graph.node] == ["Mul"]
    onnx.save(folded, str(tmp_path / "folded.onnx"))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    (before,), (after,) = ort_run(tmp_path / "raw.onnx", x=x), ort_run(tmp_path / "folded.onnx", x=x)
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6 * float(np.abs(before).max()))


@pytest.mark.slow
def test_sanitized_unet_graph_gives_the_same_outputs_on_onnxruntime(merged_model, tmp_path):
    """The reverse UNet traced raw, saved as it is and saved sanitised: same outputs on ONNX Runtime."""
    from icdcli.export.graphs import UNetGraph
    from icdcli.export.onnx import torch_export
    from icdcli.export.signatures import example_inputs, unet_specs

    unet = merged_model.reverse_unet
    inputs, outputs, guidance = unet_specs(unet, "reverse_unet", latent_channels=4, text_length=12, dtype=torch.float32)
    sizes = {"batch": 2, "latent_height": 8, "latent_width": 8}
    args = example_inputs(inputs, sizes, torch.device("cpu"))
    raw = tmp_path / "raw" / "model.onnx"
    torch_export(
        UNetGraph(unet, [s.name for s in inputs], guidance).eval(),
        args,
        inputs=inputs,
        outputs=outputs,
        path=raw,
        opset=17,
    )
    save_graph(raw, tmp_path / "plain.onnx", large=False, sanitize=False)
    save_graph(raw, tmp_path / "sanitized.onnx", large=False, sanitize=True)
    plain_nodes = len(onnx.load(str(tmp_path / "plain.onnx")).graph.node)
    assert len(onnx.load(str(tmp_path / "sanitized.onnx")).graph.node) <= plain_nodes
    feeds = {spec.name: tensor.numpy() for spec, tensor in zip(inputs, args, strict=True)}
    (before,), (after,) = ort_run(tmp_path / "plain.onnx", **feeds), ort_run(tmp_path / "sanitized.onnx", **feeds)
    assert close(torch.from_numpy(after), torch.from_numpy(before)) <= 0.01  # 1e-6 relative


def test_norms_in_fp32_patches_only_while_open(merged_model):
    from icdcli.export.precision import norms_in_fp32

    unet = merged_model.forward_unet
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)]
    x = torch.randn(2, 32, 4, 4).half()
    group = next(m for m in norms if isinstance(m, torch.nn.GroupNorm) and m.num_channels == 32)
    with norms_in_fp32(unet) as count:
        assert count == len(norms) > 0
        half_group = torch.nn.GroupNorm(group.num_groups, 32, group.eps).half()
        half_group.load_state_dict(group.state_dict())
        with norms_in_fp32(half_group):
            out = half_group(x)
    assert out.dtype == torch.float16
    reference = torch.nn.functional.group_norm(x.float(), group.num_groups, group.weight, group.bias, group.eps)
    assert close(out.float(), reference) <= 10  # fp32 compute, one fp16 rounding of the result
    assert all("forward" not in vars(m) for m in norms)  # nothing left behind


def elem_types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {init.name: init.data_type for init in graph.initializer}
    return types


@pytest.mark.slow
def test_fp16_export_with_fp32_norm_runs_normalisation_in_fp32(merged_model, tmp_path):
    from icdcli.export.graphs import UNetGraph
    from icdcli.export.manifest import GraphSpec
    from icdcli.export.onnx import _cast, export_graph
    from icdcli.export.signatures import example_inputs, unet_specs

    inputs, outputs, guidance = unet_specs(
        merged_model.forward_unet, "forward_unet", latent_channels=4, text_length=12, dtype=torch.float16
    )
    args = example_inputs(inputs, {"batch": 2, "latent_height": 8, "latent_width": 8}, torch.device("cpu"))
    found = {}
    for fp32_norm in (False, True):
        module = UNetGraph(_cast(merged_model.forward_unet, torch.float16), [s.name for s in inputs], guidance).eval()
        spec = GraphSpec("forward_unet", f"forward-{fp32_norm}.onnx", inputs, outputs, guidance)
        export_graph(module, args, spec, folder=tmp_path, opset=17, optimize=False, fp32_norm=fp32_norm)
        model = onnx.load(str(tmp_path / spec.file))
        types = elem_types(model)
        norms = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization")]
        found[fp32_norm] = {types.get(n.input[0]) for n in norms}
        assert norms and types["eps"] == onnx.TensorProto.FLOAT16
    assert found == {False: {onnx.TensorProto.FLOAT16}, True: {onnx.TensorProto.FLOAT}}


def test_stale_reason_for_fp32_norm():
    from icdcli.export.manifest import Manifest

    manifest = Manifest("k", "abc", "fp16", DEFAULT_OPSET, {}, 2, 4, 12, whole_graphs())
    assert stale_reason(manifest, "abc", "fp16", DEFAULT_OPSET) is None
    assert stale_reason(manifest, "abc", "fp16", DEFAULT_OPSET, fp32_norm=False) is None
    assert "fp32" in stale_reason(manifest, "abc", "fp16", DEFAULT_OPSET, fp32_norm=True)
    assert "constant-folded" in stale_reason(manifest, "abc", "fp16", DEFAULT_OPSET, need_sanitized=True)
    manifest.sanitized = True
    assert stale_reason(manifest, "abc", "fp16", DEFAULT_OPSET, need_sanitized=True) is None


@pytest.mark.slow
def test_export_check_compares_every_graph_with_torch(merged_dir, tmp_path):
    from click.testing import CliRunner

    from icdcli.cli.export import export

    out = tmp_path / "checked"
    result = CliRunner().invoke(export, ["--model", str(merged_dir), "--out", str(out), "--no-p2p", "--check"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert not manifest.sanitized  # folded for TensorRT only (`--backend tensorrt`): ONNX Runtime folds at load
    for graph in manifest.graphs:
        assert f"{graph}: relative error" in result.output
    result = CliRunner().invoke(export, ["--model", str(merged_dir), "--out", str(out), "--fp32-norm"])
    assert result.exit_code != 0 and "--fp16" in result.output


@pytest.mark.slow
def test_export_check_catches_a_wrong_graph(merged_model, sd15_export, tmp_path):
    import shutil

    from icdcli.export.check import check_export

    folder = tmp_path / "swapped"
    shutil.copytree(sd15_export, folder)
    shutil.copy(folder / "reverse_unet.onnx", folder / "teacher_unet.onnx")  # the wrong weights for the teacher
    checks = {c.graph: c for c in check_export(merged_model, folder, read_manifest(folder))}
    assert checks["reverse_unet"].passed and checks["vae_decoder"].passed
    assert not checks["teacher_unet"].passed and checks["teacher_unet"].error > 10 * checks["teacher_unet"].tolerance


@pytest.mark.slow
def test_export_check_through_a_backends_runners(merged_model, sd15_export):
    """With runners (here ONNX Runtime's, as `--backend tensorrt --check` passes TensorRT's) the graphs run through
    them at the native size, batch 1."""
    from icdcli.backends.accelerated import torch_fallbacks
    from icdcli.engines import onnxruntime as ort_engine
    from icdcli.export.check import check_export

    manifest = read_manifest(sd15_export)
    parts = ort_engine.load_parts(
        sd15_export, manifest, device=torch.device("cpu"), fallbacks=torch_fallbacks(merged_model)
    )
    assert set(parts.runners) == set(manifest.graphs)
    seen = []

    def watched(runner):
        return lambda feeds: seen.append(feeds) or runner(feeds)

    runners = {name: watched(runner) for name, runner in parts.runners.items()}
    checks = check_export(merged_model, sd15_export, manifest, runners=runners)
    assert all(c.passed for c in checks) and len(checks) == len(manifest.graphs)
    native = merged_model.info.native_size // merged_model.vae_scale_factor
    samples = [feeds["sample"].shape for feeds in seen if "sample" in feeds and feeds["sample"].shape[0] == 1]
    assert samples and all(shape[2:] == (native, native) for shape in samples)
    side = merged_model.info.native_size
    wrong = {**runners, "vae_decoder": lambda feeds: {"images": torch.zeros(1, 3, side, side)}}
    checks = {c.graph: c for c in check_export(merged_model, sd15_export, manifest, runners=wrong)}
    assert not checks["vae_decoder"].passed and checks["vae_encoder"].passed


def test_constant_folding_keeps_stdout_clean(tmp_path, capsys):
    """icd writes results (JSON) to stdout; polygraphy prints there unless told otherwise."""
    pytest.importorskip("polygraphy")
    from icdcli.export.cleanup import fold_constants

    foldable_graph(tmp_path / "raw.onnx")
    fold_constants(onnx.load(str(tmp_path / "raw.onnx")), large=False)
    from polygraphy.logger import G_LOGGER

    G_LOGGER.warning("a polygraphy warning")
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_a_later_teacher_is_exported_beside_the_graphs_already_there(merged_dir, tmp_path):
    """`icd edit` exports without the teacher; a later `--sampler ddim` adds only the teacher's graph."""
    from icdcli.backends.accelerated import ensure_exported
    from icdcli.export.manifest import TEACHER, read_manifest
    from icdcli.models.runtime import load_merged

    folder = tmp_path / "export"
    ensure_exported(load_merged(merged_dir, need_teacher=False), precision="fp32", out_dir=folder)
    first = read_manifest(folder)
    assert TEACHER not in first.graphs
    stamps = {name: (folder / spec.file).stat().st_mtime_ns for name, spec in first.graphs.items()}
    said = []
    _, manifest = ensure_exported(
        load_merged(merged_dir, need_teacher=True), precision="fp32", out_dir=folder, progress=said.append
    )
    assert TEACHER in manifest.graphs and read_manifest(folder).graphs.keys() == manifest.graphs.keys()
    assert {name: (folder / first.graphs[name].file).stat().st_mtime_ns for name in first.graphs} == stamps
    assert len(said) == 1 and "teacher" in said[0]
    assert manifest.graphs[TEACHER].sha256 and (folder / manifest.graphs[TEACHER].file).is_file()


@pytest.mark.slow
def test_fp16_export_keeps_norms_and_the_explicit_p2p_softmax_in_fp32_and_runs_the_vae_in_fp16(
    merged_model, tmp_path_factory
):
    """The defaults of a new fp16 export (format 5): fp32 norms and P2P softmax, the SD1.5 VAE in fp16 inside."""
    from icdcli.export.manifest import EXPORT_FORMAT

    folder = exported(tmp_path_factory, merged_model, "sd15", "fp16")
    manifest = read_manifest(folder)
    assert manifest.fp32_norm and manifest.vae_precision == "float16" and manifest.export_format == EXPORT_FORMAT == 5
    float16, float32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def softmax_types(graph: str) -> set[int]:
        model = onnx.load(str(folder / f"{graph}.onnx"))
        types = elem_types(model)
        return {types.get(node.input[0]) for node in model.graph.node if node.op_type == "Softmax"}

    assert float32 in softmax_types("reverse_unet_p2p")  # the P2P processors' explicit softmax
    assert softmax_types("reverse_unet") == {float16}  # fused attention ignores the flag
    vae = onnx.load(str(folder / "vae_decoder.onnx"))
    kernels = {init.data_type for init in vae.graph.initializer if len(init.dims) == 4}
    assert kernels == {float16}  # the convolutions run in fp16 ...
    assert onnx_inputs(folder / "vae_decoder.onnx") == {"latents": float32}  # ... behind float32 inputs and outputs
    assert {o.type.tensor_type.elem_type for o in vae.graph.output} == {float32}


def test_softmax_in_fp32_sets_upcast_only_while_open(merged_model):
    from icdcli.export.precision import softmax_in_fp32

    unet = merged_model.reverse_unet
    layers = [m for m in unet.modules() if getattr(m, "upcast_softmax", None) is not None]
    before = [m.upcast_softmax for m in layers]
    with softmax_in_fp32(unet) as count:
        assert count == before.count(False) > 0 and all(m.upcast_softmax for m in layers)
    assert [m.upcast_softmax for m in layers] == before


def test_vae_graph_modules_compute_in_the_vae_precision_behind_float32(merged_model):
    from icdcli.export.graphs import VaeDecoderGraph, VaeEncoderGraph
    from icdcli.export.onnx import _cast
    from icdcli.export.precision import vae_graph_dtype

    assert vae_graph_dtype("sd15", "fp16") == torch.float16
    assert vae_graph_dtype("sdxl", "fp16") == torch.float32  # overflows in fp16; graphs have no bfloat16
    assert vae_graph_dtype("sd15", "fp32") == torch.float32
    scaling = float(merged_model.info.scaling_factor)
    half = _cast(merged_model.vae, torch.float16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = VaeDecoderGraph(half, scaling)(latents)
        reference = VaeDecoderGraph(merged_model.vae, scaling)(latents)
        encoded = VaeEncoderGraph(half, scaling)(reference)
        expected = VaeEncoderGraph(merged_model.vae, scaling)(reference)
    assert images.dtype == encoded.dtype == torch.float32
    assert close(images, reference) <= 300  # 3e-2 relative: fp16 rounding through the decoder
    assert close(encoded, expected) <= 300


def test_ensure_exported_follows_the_fp32_norm_default_and_keeps_an_explicit_choice(
    merged_model, tmp_path, monkeypatch
):
    import icdcli.export.onnx as onnx_export
    from icdcli.backends.accelerated import ensure_exported
    from icdcli.export.manifest import DEFAULT_FP32_NORM, EXPORT_FORMAT, GraphSpec, Manifest, write_manifest

    asked = []

    def fake_export(model, folder, *, fp32_norm=None, precision="fp16", **options):
        asked.append(fp32_norm)
        chosen = DEFAULT_FP32_NORM if fp32_norm is None else fp32_norm
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = model_fingerprint(model) if len(asked) != 2 else "an older model"
        graphs = {name: GraphSpec(name, f"{name}.onnx", [], []) for name in [*whole_graphs(), "teacher_unet"]}
        manifest = Manifest("k", fingerprint, precision, DEFAULT_OPSET, {}, 8, 4, 12, graphs, fp32_norm=chosen)
        write_manifest(folder, manifest)
        return folder

    # where `ensure_exported` imports it from: the package's lazy attribute, patched first, so that what monkeypatch
    # restores is the real function (patched second, the lazy lookup would find the fake and leave it bound there for
    # every later test in the process: their exports wrote a manifest and no graphs)
    monkeypatch.setattr("icdcli.export.export_model", fake_export, raising=False)
    monkeypatch.setattr(onnx_export, "export_model", fake_export)
    folder = tmp_path / "export"
    _, manifest = ensure_exported(merged_model, precision="fp16", out_dir=folder)  # a new export: the default
    assert asked == [None] and manifest.fp32_norm is DEFAULT_FP32_NORM is True
    _, manifest = ensure_exported(merged_model, precision="fp16", out_dir=folder, fp32_norm=False)  # --no-fp32-norm
    assert asked == [None, False] and manifest.fp32_norm is False
    _, manifest = ensure_exported(merged_model, precision="fp16", out_dir=folder)  # stale for another reason
    assert asked == [None, False, False] and manifest.export_format == EXPORT_FORMAT  # the choice is kept
    _, manifest = ensure_exported(merged_model, precision="fp16", out_dir=folder)  # either kind serves
    assert asked == [None, False, False]


def test_fp32_norm_flags_need_an_fp16_export():
    from click.testing import CliRunner

    from icdcli.cli.export import export

    for flag in ("--fp32-norm", "--no-fp32-norm"):
        result = CliRunner().invoke(export, [flag, "--precision", "fp32"])
        assert result.exit_code != 0 and f"{flag} applies to fp16 exports" in result.output
    result = CliRunner().invoke(export, ["--native-only"])
    assert result.exit_code != 0 and "--native-only chooses which TensorRT engines to build" in result.output
