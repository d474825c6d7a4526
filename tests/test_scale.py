"""The scale path (`icd bench scale`, `icdcli.bench.scale_models`) at shrunk width: the real architectures' blocks
and key names in seconds, and the memory rules the full-size runs forced, each checked where it would have failed."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from click.testing import CliRunner

from icdcli.bench.scale_models import (
    CLIP_VOCAB,
    LORA_RANK,
    LORA_TARGETS,
    lora_modules,
    random_unet,
    scale_tokenizer,
    text_configs,
    unet_config,
    vae_config,
    write_scale_files,
)

WIDTH = 0.1


def _meta_unet(arch: str, width: float = 1.0):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config(arch, width, 512))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_configs_are_the_real_architectures():
    """Parameter counts of the published models (SD1.5 859.5M + the 512x320 guidance projection, SDXL 2567.5M + it,
    the VAE, CLIP ViT-L/14's and OpenCLIP bigG's text towers): built on the meta device, no memory."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    assert _count(_meta_unet("sd15")) == 859_520_964 + 512 * 320
    assert _count(_meta_unet("sdxl")) == 2_567_463_684 + 512 * 320
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config("sd15"))
        clip_l, big_g = (CLIPTextModel(CLIPTextConfig(**text_configs("sdxl")[0])),
                         CLIPTextModelWithProjection(CLIPTextConfig(**text_configs("sdxl")[1])))  # fmt: skip
    assert (_count(vae), _count(clip_l), _count(big_g)) == (83_653_863, 123_060_480, 694_659_840)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_shrunk_configs_keep_every_key_name(arch):
    full, small = _meta_unet(arch), _meta_unet(arch, WIDTH)
    assert full.state_dict().keys() == small.state_dict().keys()
    assert _count(small) < _count(full) / 50
    assert [name for name, _ in lora_modules(full)] == [name for name, _ in lora_modules(small)]


def test_tokenizer_has_clips_vocabulary_size():
    tokenizer = scale_tokenizer()
    assert len(tokenizer) == CLIP_VOCAB and tokenizer.model_max_length == 77
    ids = tokenizer("a photo of a red cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and tokenizer.unk_token_id not in ids


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    return write_scale_files(tmp_path_factory.mktemp("scale") / "sd15", "sd15", WIDTH)


def test_lora_files_have_the_release_keys_and_shapes(shrunk):
    """Every key and shape PEFT itself writes for rank 64 on the teacher, under the released `unet.` prefix."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open

    from icdcli.models.lora import read_lora
    from icdcli.models.unets import build_teacher_unet

    teacher = build_teacher_unet(shrunk.base, shrunk.teacher)
    peft = get_peft_model(teacher, LoraConfig(r=LORA_RANK, lora_alpha=8, target_modules=list(LORA_TARGETS)))
    expected = {f"unet.{k}": tuple(v.shape) for k, v in get_peft_model_state_dict(peft).items()}
    with safe_open(str(shrunk.forward_lora), framework="pt") as handle:
        written = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert written == expected
    adapter = read_lora(shrunk.reverse_lora)
    assert (adapter.rank, adapter.scale) == (64, 8 / 64)
    assert shrunk.forward_lora.name == "iCD-SD15-forward_19_259_519_779.safetensors"
    assert shrunk.teacher.name == "sd15_cfg_distill.pt"


def test_random_weights_are_seeded_and_allocated_in_their_dtype():
    config = unet_config("sd15", WIDTH, 512)
    first, second = random_unet(config, 3, torch.float16), random_unet(config, 3, torch.float16)
    assert all(p.dtype == torch.float16 for p in first.parameters())
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = random_unet(config, 4, torch.float16)
    assert not torch.equal(other.conv_in.weight, first.conv_in.weight)


def _live_cpu_bytes() -> int:
    """Bytes of every distinct CPU tensor storage alive in this process."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.slow
def test_fusing_holds_two_unets_not_a_teacher_beside_them(shrunk, monkeypatch):
    """Fusing once held the teacher and two deep copies of it (three UNets: 10.3 GB for SD1.5, 31 GB for SDXL in
    fp32). Now each fused UNet reads the teacher's file into itself: at the second fuse only two UNets are alive."""
    import icdcli.models.unets as models
    from icdcli.models.fusion import LoraSources, fuse_lora_model

    unet_bytes = sum(t.numel() * 4 for t in torch.load(shrunk.teacher, weights_only=True).values())
    original, seen = models.fuse_lora, []

    def spy(unet, adapter):
        result = original(unet, adapter)
        seen.append(_live_cpu_bytes())
        return result

    gc.collect()
    baseline = _live_cpu_bytes()
    monkeypatch.setattr(models, "fuse_lora", spy)
    sources = LoraSources(shrunk.base, shrunk.teacher, shrunk.forward_lora, shrunk.reverse_lora)
    model = fuse_lora_model(sources, keep_teacher=False)
    assert model.teacher_unet is None and len(seen) == 2
    others = sum(_count(m) * 4 for m in (model.vae, *model.text_encoders))
    adapter = shrunk.reverse_lora.stat().st_size
    # two UNets, the VAE and text encoder, the adapter being fused; a third UNet would add unet_bytes
    assert seen[1] - baseline < 2 * unet_bytes + others + adapter + unet_bytes // 2


@pytest.mark.slow
def test_an_edit_loads_no_teacher_and_ddim_adds_it_to_the_cache(shrunk, monkeypatch, tmp_path):
    from icdcli.models.sources import ModelRequest, load_requested_model

    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path))
    request = ModelRequest(None, str(shrunk.base), str(shrunk.teacher), str(shrunk.forward_lora),
                           str(shrunk.reverse_lora))  # fmt: skip
    model = load_requested_model(request)
    (cached,) = (tmp_path / "merged").iterdir()
    assert model.teacher_unet is None and not (cached / "teacher_unet").exists()
    with_teacher = load_requested_model(request, need_teacher=True)
    state = torch.load(shrunk.teacher, weights_only=True)
    for name, value in with_teacher.teacher_unet.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert (cached / "teacher_unet" / "diffusion_pytorch_model.safetensors").is_file()
    again = load_requested_model(request, need_teacher=True)  # now from the cache
    assert torch.equal(again.teacher_unet.conv_in.weight, state["conv_in.weight"])


@pytest.mark.slow
def test_half_fused_cache_matches_the_fp32_fusion(shrunk, monkeypatch, tmp_path):
    """fp16/bf16 runs keep the fused cache in fp16 (SDXL's fp32 UNets alone are 20.6 GB): fused in fp32, then cast."""
    from icdcli.models.fusion import LoraSources, fuse_lora_model

    sources = LoraSources(shrunk.base, shrunk.teacher, shrunk.forward_lora, shrunk.reverse_lora)
    full = fuse_lora_model(sources, keep_teacher=False)
    half = fuse_lora_model(sources, keep_teacher=False, dtype=torch.float16)
    assert next(half.reverse_unet.parameters()).dtype == torch.float16
    for (name, a), b in zip(
        full.reverse_unet.state_dict().items(), half.reverse_unet.state_dict().values(), strict=True
    ):
        assert torch.equal(a.half(), b), name


def test_parity_is_the_largest_difference_from_the_first_backend(tmp_path):
    import numpy as np

    from icdcli.bench.scale import parity

    outputs = {}
    for name, shift, pixel in (("torch", 0.0, 10), ("onnxruntime", 0.25, 13), ("tensorrt", -0.5, 9)):
        out = tmp_path / name
        np.save(out.with_suffix(".latents.npy"), np.full((1, 4, 8, 8), 1.0 + shift, dtype=np.float32))
        np.save(out.with_suffix(".pixels.npy"), np.full((64, 64, 3), pixel, dtype=np.uint8))
        outputs[name] = out
    assert parity(outputs) == {"reference": "torch", "latents": 0.5, "pixels": 3}
    assert parity({"torch": outputs["torch"]})["latents"] is None


def test_stage_meter_attributes_memory_to_the_innermost_stage():
    from icdcli.bench.scale import StageMeter

    meter = StageMeter(interval=0.001)
    try:
        with meter.stage("outer"), meter.stage("inner"):
            block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
            block += 1
            del block
    finally:
        meter.close()
    assert meter.peaks["inner"] >= meter.peaks["outer"] - 2**20
    assert len(meter.seconds["outer"]) == len(meter.seconds["inner"]) == 1


@pytest.mark.slow
def test_bench_scale_runs_the_users_path_end_to_end(monkeypatch, tmp_path, capfd):
    """The command at shrunk width on PyTorch: files written once into the cache, fused through the user's flags'
    path, one warm-up and one timed edit; the JSON the docs' tables come from. Under -q its worker processes print
    nothing either."""
    from icdcli.cli.main import main

    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path))
    args = ["bench", "scale", "--arch", "sd15", "--width-scale", str(WIDTH), "--size", "64", "--repeats", "1",
            "--backends", "torch", "--json", "-q"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert capfd.readouterr().err == "", "the workers' stderr (they write to the terminal, not to CliRunner)"
    report = json.loads(result.stdout)
    assert (report["arch"], report["size"]) == ("sd15", 64) and report["failures"] == {}
    (row,) = report["rows"]
    assert (row["backend"], row["precision"], row["method"], row["unet_evaluations_per_edit"]) == (
        "torch",
        "fp32",
        "p2p",
        8,
    )
    seconds = row["seconds"]
    assert seconds["edit"] >= seconds["decode"] > 0 and seconds["unet_eval"] > 0 and seconds["load"] > 0
    assert 0 < row["peak_rss_gb"] < 8 and row["peak_rss_gb_by_stage"]["unet_reverse"] > 0
    assert report["stages"]["fuse"] > 0 and report["disk_gb"]["fused_cache"] > 0
    assert set(report["parity"]) >= {"latents", "pixels"}
    from icdcli.bench.scale_models import scale_files

    files, seconds = scale_files("sd15", WIDTH)
    assert seconds is None and files.teacher.is_file(), "written once into the cache, then reused"


@pytest.mark.parametrize("layout", ["one file", "one file per weight"])
def test_a_large_graph_is_written_without_reading_its_weights(layout, tmp_path, monkeypatch):
    """Over 2 GB (forced here on a small graph), saving a graph once loaded all its weights (3.4 GB per SD1.5 UNet,
    10 GB for SDXL) to write them again. Now only the graph proto is read: onnxruntime's optimiser's one weights
    file is moved, the exporter's one file per weight gathered into one (page-aligned), and shape inference and the
    checker run on the path."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from icdcli.export.cleanup import EXTERNAL_ALIGNMENT, ort_optimize, save_graph
    from icdcli.export.manifest import TensorSpec
    from icdcli.export.onnx import torch_export

    module = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    spec_in, spec_out = [TensorSpec("x", "float32", ["batch", 64])], [TensorSpec("y", "float32", ["batch", 64])]
    raw = tmp_path / "raw" / "model.onnx"
    torch_export(module, (torch.randn(2, 64),), inputs=spec_in, outputs=spec_out, path=raw, opset=17)
    source = tmp_path / "source" / "model.onnx"
    source.parent.mkdir()
    if layout == "one file":
        ort_optimize(raw, source, large=True)
    else:
        onnx.save_model(onnx.load(str(raw)), str(source), save_as_external_data=True, all_tensors_to_one_file=False,
                        size_threshold=0)  # fmt: skip
        assert len(list(source.parent.iterdir())) > 3
    loads, checked = [], []
    real_load, real_check = onnx.load, onnx.checker.check_model
    monkeypatch.setattr(onnx, "load", lambda path, **kw: loads.append(kw) or real_load(path, **kw))
    monkeypatch.setattr(onnx.checker, "check_model", lambda model, **kw: checked.append(model) or real_check(model))
    target = tmp_path / "final" / "forward_unet.onnx"
    target.parent.mkdir()
    assert save_graph(source, target, large=True) == "forward_unet.onnx.data"
    assert loads == [{"load_external_data": False}], "the weights were read into memory"
    assert checked == [str(target)]
    assert sorted(p.name for p in target.parent.iterdir()) == ["forward_unet.onnx", "forward_unet.onnx.data"]
    if layout != "one file":
        offsets = [int(e.value) for t in real_load(str(target), load_external_data=False).graph.initializer
                   for e in t.external_data if e.key == "offset"]  # fmt: skip
        assert offsets and all(offset % EXTERNAL_ALIGNMENT == 0 for offset in offsets)
    x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    (y,) = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(y, module(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def test_p2p_at_64x64_latents_edits_self_attention_only_up_to_32x32_and_stores_no_maps(monkeypatch):
    """SD1.5 at 512 px has 64x64 latents: explicit self-attention there would be (2, heads, 4096, 4096) per layer.
    Like the release, P2P rewrites self-attention only on maps of at most 32x32 queries (the 64x64 layers keep the
    fused kernel), and without local blend it stores no cross-attention maps at any resolution."""
    import icdcli.diffusion.p2p.attention as p2p
    from icdcli.diffusion.p2p.control import StepControl

    unet = random_unet(unet_config("sd15", WIDTH, 512), 0)
    p2p.install_p2p_processors(unet)
    seen = []
    original = p2p.controlled_attention

    def spy(probs, values, *, is_cross, control):
        seen.append((is_cross, probs.shape[2]))
        return original(probs, values, is_cross=is_cross, control=control)

    monkeypatch.setattr(p2p, "controlled_attention", spy)
    length = 77
    control = StepControl(
        cross_alpha=torch.ones(length), refine=torch.ones(length), mapper=torch.eye(length),
        reweight=torch.ones(length), self_replace=torch.ones(1),
    )  # fmt: skip
    hidden = torch.randn(2, length, unet.config.cross_attention_dim)
    maps: list[torch.Tensor] = []
    with torch.no_grad():
        unet(torch.randn(2, 4, 64, 64), 500, encoder_hidden_states=hidden, timestep_cond=torch.randn(2, 512),
             cross_attention_kwargs={"control": control, "blend_maps": maps})  # fmt: skip
    self_queries = {queries for is_cross, queries in seen if not is_cross}
    cross_queries = {queries for is_cross, queries in seen if is_cross}
    assert self_queries and max(self_queries) == 32 * 32
    assert 64 * 64 in cross_queries, "cross-attention is edited at every resolution"
    assert maps == []


@pytest.mark.slow
def test_onnxruntime_folds_no_constants_and_opens_only_the_graphs_an_edit_runs(merged_dir, tmp_path):
    """Two memory rules the SD1.5 run forced. Folding constants (for TensorRT) holds a graph's weights in memory two
    or three times: ONNX Runtime folds at load by itself, so its exports skip it. And each session holds its graph's
    weights (3.4 GB per SD1.5 UNet), so on the CPU a session opens on first use: a swap edit never opens the reverse
    UNet's P2P graph, and a P2P edit whose every step reads the source branch (local blend) never the plain one."""
    from icdcli.backends.accelerated import accelerate
    from icdcli.bench.latency import sample_image
    from icdcli.diffusion.recipe import P2POptions, SamplerSettings
    from icdcli.editing.edits import edit
    from icdcli.export.manifest import read_manifest
    from icdcli.models.runtime import load_merged

    def opened_by(p2p: object) -> set[str]:
        accelerated = accelerate(load_merged(merged_dir), "onnxruntime", export_dir=tmp_path / "export")
        runners = accelerated.parts.runners
        assert {"reverse_unet", "reverse_unet_p2p"} <= runners.keys()
        assert all(runner._session is None for runner in runners.values()), "nothing opened before an edit"
        edit(
            accelerated,
            sample_image(32),
            "a red cat",
            "a blue cat",
            guidance=4.0,
            tau=0.8,
            settings=SamplerSettings(),
            p2p=p2p,
        )
        return {name for name, runner in runners.items() if runner._session is not None}

    shared = {"forward_unet", "vae_encoder", "vae_decoder", "text_encoder"}
    model = load_merged(merged_dir)
    blended = P2POptions(blend_source=("cat",), blend_target=("cat",)).resolve(model.info.edit)
    assert opened_by(blended) == shared | {"reverse_unet_p2p"}
    assert read_manifest(tmp_path / "export").sanitized is False
    assert opened_by(None) == shared | {"reverse_unet"}


@pytest.mark.slow
def test_the_first_run_maps_the_fused_weights_from_the_cache(shrunk, monkeypatch, tmp_path):
    """Fusing builds the two UNets in private memory (7 GB at SD1.5 size in fp32); once they are in the cache the
    model is read back from it, so its weights are file pages the kernel can drop and re-read, as on later runs -
    not 7 GB of private memory for the rest of the run."""
    from icdcli.bench.scale import current_memory
    from icdcli.models.sources import ModelRequest, load_requested_model

    request = ModelRequest(None, str(shrunk.base), str(shrunk.teacher), str(shrunk.forward_lora),
                           str(shrunk.reverse_lora))  # fmt: skip
    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path / "warm"))
    load_requested_model(request)  # every library imported, every lazy allocation made
    gc.collect()
    monkeypatch.setenv("ICD_CACHE_DIR", str(tmp_path / "fresh"))
    before = current_memory()[1]
    model = load_requested_model(request)  # fuses anew into an empty cache
    touched = sum(float(p.sum()) for unet in (model.forward_unet, model.reverse_unet) for p in unet.parameters())
    assert touched == touched  # every weight page read
    unet_bytes = sum(p.numel() * p.element_size() for p in model.reverse_unet.parameters())
    assert current_memory()[1] - before < unet_bytes, "the fused UNets stayed in private memory"


def test_rows_that_read_the_same_export_share_one_export_worker(tmp_path, monkeypatch):
    """OpenVINO and int8 rows run the fp32 export the first graph row made: one worker loads the model to export (or
    to find the export current), not one per row; a bf16 ONNX Runtime row loads another model and exports its own."""
    from icdcli.bench import scale
    from icdcli.bench.scale_rows import parse_row

    spawned: list[str] = []

    def fake_spawn(task, folder, name):
        spawned.append(name)
        if task["kind"] == "export":
            result = {"export_dir": str(tmp_path / task["precision"]), "seconds": {"export": [1.5]},
                      "peak_rss_gb_by_stage": {"export": 2.0}, "peak_anon_gb": 1.0}  # fmt: skip
            return scale.WorkerOutcome(result)
        return scale.WorkerOutcome(None, "not timed here")

    monkeypatch.setattr(scale, "spawn", fake_spawn)
    report: dict = {"failures": {}, "skipped": {}, "disk_gb": {}, "rows": []}
    exports: dict = {}
    base = {"repeats": 1, "size": 64}
    found = {}
    for entry in ("onnxruntime", "openvino", "openvino:bf16", "onnxruntime:bf16"):
        row = parse_row(entry, "fp32")
        found[row.label] = scale._export(row, scale._row_task(row, base), tmp_path, report, lambda line: None, exports)
    assert spawned == ["export-onnxruntime", "export-onnxruntime-bf16"]
    assert found["onnxruntime"]["seconds"] == {"export": 1.5} and "export_shared_with" not in found["onnxruntime"]
    for label in ("openvino", "openvino:bf16"):
        assert found[label] == {"seconds": {}, "export_shared_with": "onnxruntime"}
    assert found["onnxruntime:bf16"]["seconds"] == {"export": 1.5}
    assert report["failures"] == {}
