"""TensorRT paths end to end under a fake `tensorrt` module (tests/fake_tensorrt.py) on CPU tensors.

These prove that build, `Engine` and the TensorRT denoiser follow the TensorRT 10.x/11.x and polygraphy call
contracts (call order, shapes before addresses, results checked, one logger, runtime and activation-memory
lifetimes, fallbacks); they cannot prove that TensorRT accepts the graphs: the real libraries never ran here.
"""

from __future__ import annotations

import gc
import inspect
import json
import logging
import sys

import pytest
import torch
from fake_tensorrt import ContractError, Record, fake_polygraphy, make_tensorrt
from test_engines import GPU, tiny_manifest

from icdcli.core.errors import ICDError
from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding
from icdcli.engines import tensorrt as trt_engine
from icdcli.engines import tensorrt_build as trt_build
from icdcli.engines import tensorrt_lib as trt_lib
from icdcli.engines import tensorrt_plan as trt_plan
from icdcli.engines import tensorrt_run as trt_run
from icdcli.engines.base import BackendUnavailable, EngineFailed, ShapeNotCovered

CPU = torch.device("cpu")


def write_fake_graphs(folder, manifest) -> None:
    """The fake's "ONNX files": JSON naming each graph's inputs, outputs and symbolic shapes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, spec in manifest.graphs.items():
        data = {
            "name": name,
            "inputs": {t.name: t.dtype for t in spec.inputs},
            "outputs": {t.name: [t.dtype, t.shape] for t in spec.outputs},
            "symbolic": {t.name: t.shape for t in spec.inputs},
        }
        (folder / spec.file).write_text(json.dumps(data))


class Fake:
    """A fake TensorRT installed for one test, with an export folder and a way to make TensorRT parts."""

    def __init__(self, monkeypatch, tmp_path, version: str = "10.13.0.35", polygraphy: bool = True, tf32: bool = True):
        self.trt = make_tensorrt(version, Record(), tf32=tf32)
        self.record = self.trt.record
        self.poly = fake_polygraphy(self.trt) if polygraphy else None
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setattr(trt_lib, "_LOGGER", None)
        for module in (trt_lib, trt_build):  # the logger's choice and the build's
            monkeypatch.setattr(module, "polygraphy_backend", lambda: self.poly)
        monkeypatch.setattr(trt_engine, "engines_root", lambda: tmp_path / "engines")
        self.folder = tmp_path / "export"
        self.manifest = tiny_manifest()
        write_fake_graphs(self.folder, self.manifest)
        self.fallback_calls: list[str] = []
        self.messages: list[str] = []

    def fallback(self, role: str):
        def run(x, t, cond, guidance=1.0):
            self.fallback_calls.append(role)
            return x * 0 - 1

        return run

    def parts(self, sizes=trt_plan.EngineSizes(), build_now=(), next_backend=None, profiles=trt_plan.ALL_PROFILES,
              fallbacks=None):  # fmt: skip
        if fallbacks is None:
            fallbacks = {role: self.fallback(role) for role in ("forward_unet", "reverse_unet")}
        return trt_engine.engine_parts(
            self.folder, self.manifest, CPU, facts=GPU, fallbacks=fallbacks, sizes=sizes,
            progress=self.messages.append, cuda_graph=False, build_now=build_now, next_backend=next_backend,
            profiles=profiles,
        )  # fmt: skip

    def calls(self, name: str, graph: str | None = None) -> list[tuple]:
        return [c for c in self.record.calls if c[0] == name and (graph is None or c[1] == graph)]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    made = Fake(monkeypatch, tmp_path)
    yield made
    gc.collect()  # every engine and runtime of the test released: the fake saw no lifetime rule broken
    assert made.record.violations == []


def unet_inputs(x: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = x.shape[0]
    return {
        "sample": x, "timestep": torch.zeros(batch), "encoder_hidden_states": torch.zeros(batch, 12, 32),
        "timestep_cond": torch.zeros(batch, 512),
    }  # fmt: skip


def conditioning() -> Conditioning:
    return Conditioning(PromptEmbedding(torch.zeros(1, 12, 32)))


def test_reverse_unet_builds_through_polygraphy_and_runs(fake):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    eps = parts.reverse(x, 999, conditioning(), 8.0)
    assert torch.allclose(eps, 0.5 * x, rtol=1e-6, atol=1e-6 * float(x.abs().max()))
    network = fake.calls("network_from_onnx_path")
    assert [c[1].endswith("reverse_unet.onnx") for c in network] == [True]  # only the graph that ran was built
    assert network[0][2] == {"strongly_typed": True}
    config = fake.calls("CreateConfig")[0][1]
    assert [len(p.shapes) for p in config["profiles"]] == [4, 4, 4, 4] and "fp16" not in config and config["tf32"]
    assert config["load_timing_cache"].endswith(".cache")
    assert "nvidia-h100" in config["load_timing_cache"] and "progress_monitor" in config
    saved = fake.calls("engine_bytes_from_network")[0][2]["save_timing_cache"]
    assert saved == config["load_timing_cache"]
    plans = list((fake.folder.parent / "engines" / fake.manifest.model_key).glob("reverse_unet-*.plan"))
    meta = json.loads(plans[0].with_suffix(".json").read_text())
    assert len(plans) == 1 and meta["device"] == GPU.name and meta["build_format"] == trt_plan.BUILD_FORMAT
    assert any("building TensorRT engine reverse_unet" in m for m in fake.messages)


def test_call_order_shapes_before_addresses_memory_before_run(fake):
    parts = fake.parts()
    parts.reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    order = [c[0] for c in fake.record.calls if len(c) > 1 and c[1] == "reverse_unet"]
    first = order.index
    # the profile first, then the activation memory that profile needs
    assert first("create_execution_context") < first("set_optimization_profile_async") < first("set_device_memory")
    last_shape = len(order) - 1 - order[::-1].index("set_input_shape")
    assert last_shape < first("set_tensor_address") and order[-1] == "execute_async_v3"
    assert fake.calls("create_execution_context", "reverse_unet")[0][2] == "USER_MANAGED"
    assert fake.calls("set_optimization_profile_async", "reverse_unet")[0][2] == 0  # the static native profile
    shapes = len(fake.calls("set_input_shape"))
    parts.reverse(torch.randn(1, 4, 64, 64), 779, conditioning(), 8.0)
    assert len(fake.calls("set_input_shape")) == shapes  # same shapes: nothing set again
    assert len(fake.calls("execute_async_v3")) == 2


def test_other_sizes_get_their_profile_and_share_activation_memory(fake):
    parts = fake.parts()
    parts.reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    wide = torch.randn(1, 4, 40, 104)  # a 2.6:1 photo: 832 x 320 pixels
    assert torch.allclose(parts.reverse(wide, 999, conditioning(), 8.0), 0.5 * wide)
    tall = torch.randn(1, 4, 96, 48)
    assert torch.allclose(parts.forward(tall, 19, conditioning(), 1.0), 0.5 * tall)
    profiles = [c[2] for c in fake.calls("set_optimization_profile_async", "reverse_unet")]
    assert profiles == [0, 2]  # native, landscape
    assert [c[2] for c in fake.calls("set_optimization_profile_async", "forward_unet")] == [3]  # portrait
    contexts = [b.context for r in (parts.reverse, parts.forward) for b in r.runner.engine.bindings.values()]
    assert len(contexts) == 3 and len({c.memory for c in contexts}) == 1, "every context points at one block"
    del contexts  # contexts never outlive their Engine wrapper (it releases the runtime after them)
    assert fake.fallback_calls == []


def test_one_logger_for_builds_and_runtimes(fake):
    parts = fake.parts()
    parts.reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    parts.vae_decoder({"latents": torch.randn(1, 4, 64, 64)})
    assert len(fake.record.loggers) >= 3 and all(lg is fake.record.loggers[0] for lg in fake.record.loggers)
    assert fake.record.loggers[0] is fake.poly.get_trt_logger()


def test_the_fake_refuses_a_second_logger(monkeypatch, tmp_path):
    fake = Fake(monkeypatch, tmp_path)
    fake.trt.Runtime(fake.trt.Logger(fake.trt.Logger.WARNING))
    with pytest.raises(ContractError, match="one logger"):
        fake.trt.Runtime(fake.trt.Logger(fake.trt.Logger.WARNING))


def test_runtime_lives_as_long_as_its_engine(fake):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    gc.collect()
    parts.reverse(x, 779, conditioning(), 8.0)  # the fake raises if the Runtime had been collected
    engine = parts.reverse.runner.engine
    assert engine.runtime is not None and engine.engine._runtime() is engine.runtime
    engine.runtime = None
    gc.collect()
    with pytest.raises(ContractError, match="Runtime was destroyed"):
        engine.infer(unet_inputs(x))
    fake.record.violations.clear()  # dropped on purpose (test_the_fake_sees_a_runtime_destroyed_before_its_engine)


def test_borrowed_eps_and_copied_outputs(fake):
    parts = fake.parts()
    first = parts.reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    second = parts.reverse(torch.randn(1, 4, 64, 64), 779, conditioning(), 8.0)
    assert first.data_ptr() == second.data_ptr()  # the engine's own buffer, no copy per step
    a = parts.vae_encoder({"images": torch.zeros(1, 3, 512, 512)})["latents"]
    b = parts.vae_encoder({"images": torch.zeros(1, 3, 512, 512)})["latents"]
    assert a.data_ptr() != b.data_ptr()  # latents are kept by the caller: copied


def test_failed_build_falls_back_to_pytorch_with_a_note(fake, caplog):
    fake.record.fail_build.add("reverse_unet")
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    with caplog.at_level(logging.INFO, logger="icd"):
        assert torch.equal(parts.reverse(x, 999, conditioning(), 8.0), x * 0 - 1)
        assert torch.equal(parts.reverse(x, 779, conditioning(), 8.0), x * 0 - 1)
    assert fake.fallback_calls == ["reverse_unet", "reverse_unet"]
    assert len(fake.calls("engine_bytes_from_network", "reverse_unet")) == 1  # not retried every step
    assert "could not build an engine from reverse_unet.onnx" in caplog.text and "PyTorch" in caplog.text
    assert caplog.text.count("could not build") == 1


def test_failed_context_creation_falls_back_with_the_engine_named(fake, caplog):
    fake.record.fail_context.add("forward_unet")
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    with caplog.at_level(logging.INFO, logger="icd"):
        assert torch.equal(parts.forward(x, 19, conditioning(), 1.0), x * 0 - 1)
    assert "execution context for forward_unet" in caplog.text


def test_shapes_outside_every_profile_fall_back(fake):
    parts = fake.parts()
    thin = torch.randn(1, 4, 8, 512)
    assert torch.equal(parts.reverse(thin, 999, conditioning(), 8.0), thin * 0 - 1)
    with pytest.raises(ShapeNotCovered, match="vae_encoder: input images of shape"):
        parts.vae_encoder({"images": torch.zeros(1, 3, 64, 4096)})


def test_rejected_input_shape_and_failed_run_are_one_line_errors(fake):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    engine = parts.reverse.runner.engine
    # a profile that claims more than the engine holds: TensorRT's set_input_shape refuses, and says so
    label, profile = engine.profiles[1]
    engine.profiles = (engine.profiles[0], (label, {**profile, "sample": ((1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 9))}))
    with pytest.raises(EngineFailed, match=r"reverse_unet: input sample shape \(1, 4, 8, 9\) is outside"):
        engine.infer(unet_inputs(torch.zeros(1, 4, 8, 9)))
    fake.record.fail_execute.add("reverse_unet")
    with pytest.raises(EngineFailed, match="inference failed in engine reverse_unet at shapes") as error:
        engine.infer(unet_inputs(x))
    assert "\n" not in str(error.value)


def test_engines_are_found_again_and_rebuilt_only_when_inputs_change(monkeypatch, tmp_path):
    fake = Fake(monkeypatch, tmp_path)
    fake.parts(build_now=["reverse_unet", "vae_decoder"])
    assert len(fake.calls("engine_bytes_from_network")) == 2
    fake.parts(build_now=["reverse_unet", "vae_decoder"]).reverse(torch.randn(1, 4, 64, 64), 9, conditioning(), 2.0)
    assert len(fake.calls("engine_bytes_from_network")) == 2  # same sizes, same keys: loaded from the cache
    fake.parts(trt_plan.EngineSizes(768, 512, None), build_now=["reverse_unet"])
    assert len(fake.calls("engine_bytes_from_network")) == 3  # other sizes: another engine


def test_vae_and_text_fall_back_to_pytorch_in_the_accelerated_model(monkeypatch, tmp_path, merged_model, caplog):
    from icdcli.backends.accelerated import AcceleratedModel

    fake = Fake(monkeypatch, tmp_path)
    fake.record.fail_build.update({"vae_decoder", "text_encoder"})
    accelerated = AcceleratedModel(merged_model, fake.parts())
    latents = torch.randn(1, 4, 4, 4)
    with caplog.at_level(logging.INFO, logger="icd"):
        pixels = accelerated.decode_latents(latents)
        prompt = accelerated.encode_prompt("a cat")
    assert torch.allclose(pixels, merged_model.decode_latents(latents))
    assert torch.allclose(prompt.hidden_states, merged_model.encode_prompt("a cat").hidden_states)
    assert "the VAE decoder runs on PyTorch" in caplog.text and "the text encoder runs on PyTorch" in caplog.text


@pytest.mark.parametrize("version, flagged", [("10.11.0.33", True), ("11.4.0.106", False)])
def test_tensorrt_builder_without_polygraphy(monkeypatch, tmp_path, version, flagged):
    """Where polygraphy is missing, TensorRT's own builder: BuilderFlag.FP16 before 10.12, strongly typed after."""
    fake = Fake(monkeypatch, tmp_path, version=version, polygraphy=False)
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    assert torch.allclose(parts.reverse(x, 999, conditioning(), 8.0), 0.5 * x)
    flags = fake.calls("create_network")[0][1]
    assert flags == (0 if flagged else 1 << 1)
    assert fake.calls("build_serialized_network")[0][2] == 4
    assert all(lg is fake.record.loggers[0] for lg in fake.record.loggers)
    timing = list((tmp_path / "engines").glob("timing-*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes().startswith(b"timing:")


def test_polygraphy_receives_only_arguments_it_has(fake):
    """Every keyword icd passes to polygraphy exists in the installed polygraphy's signatures."""
    poly = pytest.importorskip("polygraphy.backend.trt")
    from polygraphy.backend.trt.config import _CreateConfigCommon

    fake.parts().reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    accepted = set(inspect.signature(_CreateConfigCommon.__init__).parameters)
    accepted |= set(inspect.signature(poly.CreateConfig.__init__).parameters)
    assert set(fake.calls("CreateConfig")[0][1]) <= accepted
    assert set(fake.calls("network_from_onnx_path")[0][2]) <= set(
        inspect.signature(poly.NetworkFromOnnxPath.__init__).parameters
    )
    assert set(fake.calls("engine_bytes_from_network")[0][2]) <= set(
        inspect.signature(poly.EngineBytesFromNetwork.__init__).parameters
    )
    assert {"name", "min", "opt", "max"} <= set(inspect.signature(poly.Profile.add).parameters)
    assert callable(poly.get_trt_logger) and callable(poly.engine_bytes_from_network)


def test_build_failure_surfaces_as_backend_unavailable(fake):
    fake.record.fail_build.add("vae_encoder")
    with pytest.raises(BackendUnavailable, match="vae_encoder.onnx"):
        fake.parts(build_now=["vae_encoder"])


def test_cuda_graphs_replay_static_at_once_and_dynamic_when_shapes_repeat(fake, monkeypatch):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    engine = parts.reverse.runner.engine
    replays = []

    class Graph:
        def replay(self):
            replays.append(1)

    monkeypatch.setattr(engine, "cuda_graph", True)
    monkeypatch.setattr(engine, "_capture", lambda binding: Graph())
    executes = lambda: len(fake.calls("execute_async_v3", "reverse_unet"))  # noqa: E731
    engine.bindings[0].graph = None  # as if the first run had not captured
    parts.reverse(x, 779, conditioning(), 8.0)  # static profile: run and capture at once
    parts.reverse(x, 519, conditioning(), 8.0)
    assert (executes(), len(replays)) == (2, 1)
    wide = torch.randn(1, 4, 40, 104)
    for _ in range(3):  # dynamic profile: run, run and capture, replay
        parts.reverse(wide, 999, conditioning(), 8.0)
    assert (executes(), len(replays)) == (4, 2)
    parts.reverse(torch.randn(1, 4, 48, 96), 999, conditioning(), 8.0)  # new shapes: no stale graph replayed
    assert (executes(), len(replays)) == (5, 2)


def test_a_failed_cuda_graph_capture_leaves_plain_runs(fake, caplog):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    engine = parts.reverse.runner.engine
    engine.cuda_graph, engine.bindings[0].graph = True, None
    with caplog.at_level(logging.INFO, logger="icd"):
        eps = parts.reverse(x, 779, conditioning(), 8.0)  # capture cannot work on a CPU tensor
    assert torch.allclose(eps, 0.5 * x) and not engine.cuda_graph
    assert "reverse_unet runs without CUDA-graph replay: capture failed" in caplog.text
    before = len(fake.calls("execute_async_v3"))
    parts.reverse(x, 519, conditioning(), 8.0)
    assert len(fake.calls("execute_async_v3")) == before + 1


def test_graphs_tensorrt_cannot_run_go_to_the_next_backend_before_pytorch(fake, caplog):
    made = []

    def onnxruntime_like(spec):
        made.append(spec.name)
        if spec.name == "forward_unet":
            raise RuntimeError("onnxruntime cannot load it either")
        return lambda feeds: {"eps": 3 * feeds["sample"]}

    fake.record.fail_build.update({"reverse_unet", "forward_unet"})
    parts = fake.parts(next_backend=onnxruntime_like)
    x = torch.randn(1, 4, 64, 64)
    with caplog.at_level(logging.INFO, logger="icd"):
        assert torch.allclose(parts.reverse(x, 999, conditioning(), 8.0), 3 * x)
        assert torch.allclose(parts.reverse(x, 779, conditioning(), 8.0), 3 * x)
        assert torch.equal(parts.forward(x, 19, conditioning(), 1.0), x * 0 - 1)  # no next backend: PyTorch
        assert torch.equal(parts.forward(x, 259, conditioning(), 1.0), x * 0 - 1)
    assert made == ["reverse_unet", "forward_unet"] and fake.fallback_calls == ["forward_unet", "forward_unet"]
    assert "reverse_unet runs on ONNX Runtime (CUDA) where TensorRT cannot" in caplog.text
    thin = torch.randn(1, 4, 8, 512)  # outside every profile: the next backend takes any shape
    fake.record.fail_build.clear()
    assert torch.allclose(fake.parts(next_backend=onnxruntime_like).reverse(thin, 999, conditioning(), 8.0), 3 * thin)


def test_load_parts_needs_a_cuda_model(fake):
    class Model:
        device = CPU

    with pytest.raises(ICDError, match="CUDA device"):
        trt_engine.load_parts(fake.folder, fake.manifest, Model(), fallbacks={})


def test_contexts_then_engine_then_runtime_are_released(fake):
    parts = fake.parts()
    parts.reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    parts.reverse(torch.randn(1, 4, 40, 104), 999, conditioning(), 8.0)  # a second context
    assert not [c for c in fake.record.calls if c[0] == "destroyed"]  # alive while the parts are
    del parts
    gc.collect()
    released = [c[1] for c in fake.record.calls if c[0] == "destroyed" and c[2] == "reverse_unet"]
    assert released == ["context", "context", "engine", "runtime"]


def test_built_engines_are_listed_for_icd_info(monkeypatch, tmp_path):
    from icdcli.cli.export import describe_cache
    from icdcli.core.paths import cache_root

    fake = Fake(monkeypatch, tmp_path)
    monkeypatch.setattr(trt_engine, "engines_root", lambda: cache_root() / "engines")
    fake.parts(build_now=["reverse_unet", "text_encoder"])
    listed = {entry["graph"]: entry for entry in describe_cache()["engines"]}
    assert set(listed) == {"reverse_unet", "text_encoder"}
    assert listed["reverse_unet"]["profiles"] == ["batched", "landscape", "native", "portrait"]
    assert listed["reverse_unet"]["device"] == GPU.name and listed["reverse_unet"]["bytes"] > 0
    assert listed["text_encoder"]["profiles"] == ["only"]


def test_builds_loads_and_runs_happen_under_the_models_device(fake, monkeypatch):
    import contextlib

    devices = []

    @contextlib.contextmanager
    def on_device(device):
        devices.append(device)
        fake.record.log("enter device")
        yield
        fake.record.log("leave device")

    for module in (trt_engine, trt_run):  # builds, then loads and runs
        monkeypatch.setattr(module, "on_device", on_device)
    fake.parts().reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    depth, outside = 0, []
    for call in fake.record.calls:
        depth += {"enter device": 1, "leave device": -1}.get(call[0], 0)
        if call[0] in ("network_from_onnx_path", "Runtime", "create_execution_context", "execute_async_v3"):
            outside += [call[0]] if depth == 0 else []
    assert outside == [] and set(devices) == {CPU}


def test_activation_memory_is_sized_to_the_profiles_that_run(fake):
    """One block for every context, as large as the largest need of the profiles used so far (not of the engine)."""
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    engine = parts.reverse.runner.engine
    needs = engine.activation_bytes()
    assert list(needs) == ["native", "batched", "landscape", "portrait"] and needs["native"] < needs["landscape"]
    memory = engine.memory
    assert memory.size == needs["native"] < engine.engine.device_memory_size_v2  # the batch-2 profiles never ran
    generation = memory.generation
    parts.reverse(torch.randn(1, 4, 40, 104), 999, conditioning(), 8.0)  # landscape: the block grows
    assert memory.size == needs["landscape"] and memory.generation == generation + 1
    assert {b.context.memory for b in engine.bindings.values()} == {(memory.block.data_ptr(), memory.size)}
    parts.reverse(x, 779, conditioning(), 8.0)  # the native context runs on the grown block (the fake checks)
    parts.forward(x, 19, conditioning(), 1.0)  # a smaller need: no new block
    assert memory.size == needs["landscape"] and memory.generation == generation + 1


def test_a_block_that_does_not_fit_leaves_the_old_one_and_falls_back(fake, monkeypatch):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    memory = parts.reverse.runner.engine.memory
    small = memory.size
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if args and args[0] > small:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    wide = torch.randn(1, 4, 40, 104)
    assert torch.equal(parts.reverse(wide, 999, conditioning(), 8.0), wide * 0 - 1)  # PyTorch took the step
    assert memory.size == small
    monkeypatch.setattr(torch, "empty", real_empty)
    assert torch.allclose(parts.reverse(x, 779, conditioning(), 8.0), 0.5 * x)  # native still runs on TensorRT


def test_io_names_modes_and_dtypes_are_read_once_at_load(fake):
    parts = fake.parts()
    for t in (999, 779, 519, 259):
        parts.reverse(torch.randn(1, 4, 64, 64), t, conditioning(), 8.0)
    parts.reverse(torch.randn(1, 4, 40, 104), 999, conditioning(), 8.0)
    engine = parts.reverse.runner.engine
    count = len(engine.inputs) + len(engine.outputs)
    assert engine.inputs == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert engine.outputs == ["eps"]
    assert len(fake.calls("num_io_tensors", "reverse_unet")) == 1
    for query in ("get_tensor_name", "get_tensor_mode", "get_tensor_dtype"):
        assert len(fake.calls(query, "reverse_unet")) == count, query


def test_inputs_are_converted_by_the_copy_into_the_engine_buffer(fake):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64, dtype=torch.float64)
    feeds = {k: v.double() for k, v in unet_inputs(x).items()}
    eps = parts.runners["reverse_unet"](feeds)["eps"]
    assert eps.dtype == torch.float32 and torch.allclose(eps.double(), 0.5 * x, rtol=1e-6, atol=1e-6)


def test_the_fake_sees_a_runtime_destroyed_before_its_engine(fake):
    """The lifetime rule is checked, not assumed: drop the Runtime while its engine lives and the fake records it."""
    parts = fake.parts()
    parts.reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    engine = parts.reverse.runner.engine
    engine.runtime = None
    gc.collect()
    assert fake.record.violations == ["Runtime destroyed while its engines ['reverse_unet'] were alive"]
    fake.record.violations.clear()  # seen: the fixture's own check stays for the rest


def test_close_releases_contexts_then_engine_then_runtime(fake):
    parts = fake.parts()
    parts.reverse(torch.randn(1, 4, 64, 64), 999, conditioning(), 8.0)
    parts.reverse(torch.randn(1, 4, 40, 104), 999, conditioning(), 8.0)
    engine = parts.reverse.runner.engine
    engine.close()
    gc.collect()
    released = [c[1] for c in fake.record.calls if c[0] == "destroyed" and c[2] == "reverse_unet"]
    assert released == ["context", "context", "engine", "runtime"] and fake.record.violations == []
    engine.close()  # idempotent


def test_a_batch_of_p2p_pairs_runs_in_one_call_of_the_p2p_engine(fake):
    from tiny import make_teacher

    from icdcli.diffusion.p2p.control import StepControl, stack_controls
    from icdcli.export.manifest import GraphSpec
    from icdcli.export.signatures import p2p_unet_specs

    inputs, outputs, guidance, _ = p2p_unet_specs(
        make_teacher("sd15"), latent_channels=4, text_length=12, dtype=torch.float32, latent_side=64
    )
    fake.manifest.graphs["reverse_unet_p2p"] = GraphSpec("reverse_unet_p2p", "p2p.onnx", inputs, outputs, guidance,
                                                         sha256="p2p")  # fmt: skip
    write_fake_graphs(fake.folder, fake.manifest)
    parts = fake.parts(trt_plan.EngineSizes(batch=4))
    one = StepControl(torch.ones(12), torch.ones(12), torch.eye(12), torch.ones(12), torch.ones(1), blend_queries=256)
    control = stack_controls([one, one, one])
    x = torch.randn(6, 4, 64, 64)  # three (source, target) pairs
    cond = Conditioning(PromptEmbedding(torch.zeros(6, 12, 32)))
    step = parts.reverse.controlled(x, 519, cond, torch.tensor([1.0, 8.0] * 3), control)
    assert torch.allclose(step.eps, 0.5 * x) and fake.fallback_calls == []
    assert len(fake.calls("execute_async_v3", "reverse_unet_p2p")) == 1  # one call for the three pairs
    shapes = {c[2]: c[3] for c in fake.calls("set_input_shape", "reverse_unet_p2p")}
    assert shapes["sample"] == (6, 4, 64, 64) and shapes["mapper"] == (3, 12, 12) and shapes["self_replace"] == (3, 1)
    assert [tuple(m.shape) for m in step.maps] == [(6, 256, 12)]  # (P, 2, Q, L) back to rows for local blend
    built = fake.calls("engine_bytes_from_network", "reverse_unet_p2p")
    assert len(built) == 1
    (p2p_profile,) = built[0][2]["config"].kwargs["profiles"]
    assert p2p_profile.shapes["mapper"] == [[1, 12, 12], [1, 12, 12], [4, 12, 12]]  # 1..4 pairs
    assert p2p_profile.shapes["sample"] == [[2, 4, 64, 64], [2, 4, 64, 64], [8, 4, 64, 64]]


# --- failures after load: the engine is dropped, the call and every later one run on PyTorch ------------------

RUN_FAILURES = {
    "execute": ("fail_execute", "inference failed in engine reverse_unet"),
    "address": ("fail_address", "cannot bind tensor"),
    "profile": ("fail_profile", "cannot select optimisation profile native"),
    "nan": ("nan_output", "non-finite values (NaN/Inf) in eps on its first call of profile native"),
}


@pytest.mark.parametrize("kind", sorted(RUN_FAILURES))
@pytest.mark.slow
def test_a_failure_after_load_drops_the_engine_and_pytorch_takes_every_later_step(fake, caplog, kind):
    attribute, message = RUN_FAILURES[kind]
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(torch.randn(1, 4, 40, 104), 999, conditioning(), 8.0)  # the engine loads and runs (landscape)
    getattr(fake.record, attribute).add("reverse_unet")
    runner = parts.reverse.runner
    with caplog.at_level(logging.INFO, logger="icd"):
        for t in (999, 779, 519):  # the native profile is new: its first use meets the failure
            assert torch.equal(parts.reverse(x, t, conditioning(), 8.0), x * 0 - 1)
    assert fake.fallback_calls == ["reverse_unet"] * 3
    assert runner.engine is None and message in str(runner.failure)
    assert parts.fallback_notes() == {"reverse_unet": str(runner.failure)}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and message in r.getMessage()]
    assert len(warnings) == 1 and "reverse_unet runs on PyTorch from here on" in warnings[0].getMessage()
    gc.collect()
    released = [c[1] for c in fake.record.calls if c[0] == "destroyed" and c[2] == "reverse_unet"]
    assert released[-2:] == ["engine", "runtime"]  # dropped at once, in TensorRT's order
    assert torch.allclose(parts.forward(x, 19, conditioning(), 1.0), 0.5 * x)  # other graphs keep their engines


def test_non_finite_outputs_are_checked_on_the_first_call_of_each_profile_only(fake, caplog):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    fake.record.nan_output.add("reverse_unet")  # after the profile's first call: not checked again (no sync per step)
    assert torch.isnan(parts.reverse(x, 779, conditioning(), 8.0)).all() and fake.fallback_calls == []
    fake.record.nan_output = {"forward_unet"}
    with caplog.at_level(logging.INFO, logger="icd"):
        assert torch.equal(parts.forward(x, 19, conditioning(), 1.0), x * 0 - 1)
    assert "--fp32-norm" in parts.fallback_notes()["forward_unet"] and "--fp32-norm" in caplog.text


def test_nan_note_names_fp32_norm_as_the_export_has_it():
    manifest = tiny_manifest()
    assert "icd export --backend tensorrt --fp16 --fp32-norm --force" in trt_engine.nan_hint(manifest)
    manifest.fp32_norm = True
    assert "already keeps normalisation and the P2P softmax in fp32 (--fp32-norm)" in trt_engine.nan_hint(manifest)
    manifest.precision = "fp32"
    assert "--fp32-norm concerns fp16 exports" in trt_engine.nan_hint(manifest)


def test_a_failed_buffer_allocation_drops_the_engine(fake, monkeypatch):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if args and isinstance(args[0], tuple) and args[0] == (1, 4, 40, 104):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    wide = torch.randn(1, 4, 40, 104)
    assert torch.equal(parts.reverse(wide, 999, conditioning(), 8.0), wide * 0 - 1)
    assert "no GPU memory for tensor sample of shape (1, 4, 40, 104)" in parts.fallback_notes()["reverse_unet"]
    monkeypatch.setattr(torch, "empty", real_empty)
    assert torch.equal(parts.reverse(x, 779, conditioning(), 8.0), x * 0 - 1)  # dropped: PyTorch from here on


def test_a_runtime_error_of_a_run_is_a_failure_of_the_engine(fake):
    parts = fake.parts()
    x = torch.randn(1, 4, 64, 64)
    parts.reverse(x, 999, conditioning(), 8.0)
    engine = parts.reverse.runner.engine

    def broken(binding):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore lines")

    engine._run = broken
    assert torch.equal(parts.reverse(x, 779, conditioning(), 8.0), x * 0 - 1)
    note = parts.fallback_notes()["reverse_unet"]
    assert (
        note == "TensorRT engine reverse_unet failed at run time: CUDA error: an illegal memory access was encountered"
    )


def test_a_dropped_engine_goes_to_the_next_backend_where_there_is_one(fake):
    parts = fake.parts(next_backend=lambda spec: lambda feeds: {"eps": 3 * feeds["sample"]})
    x = torch.randn(1, 4, 64, 64)
    fake.record.fail_execute.add("reverse_unet")
    assert torch.allclose(parts.reverse(x, 999, conditioning(), 8.0), 3 * x)
    assert torch.allclose(parts.reverse(x, 779, conditioning(), 8.0), 3 * x)
    assert len(fake.calls("execute_async_v3", "reverse_unet")) == 1 and fake.fallback_calls == []


def fake_export_of(fake: Fake, model) -> None:
    """The fake's export folder for `model`: its graphs as the exporter plans them (fp16, with P2P)."""
    from icdcli.export.manifest import Manifest
    from icdcli.export.onnx import plan_graphs

    graphs = {spec.name: spec for spec, _ in plan_graphs(model, "fp16", include_teacher=False)}
    for spec in graphs.values():
        spec.sha256 = f"{spec.name}-hash"
    text_length = int(model.tokenizers[0].model_max_length)
    fake.manifest = Manifest(
        "tiny-0123-fp16", "0123", "fp16", 17, model.info.to_json(), model.vae_scale_factor, model.latent_channels,
        text_length, graphs,
    )  # fmt: skip
    write_fake_graphs(fake.folder, fake.manifest)


@pytest.mark.parametrize("kind", ["execute", "nan", "address", "profile"])
def test_an_edit_whose_engines_fail_completes_on_pytorch_with_one_note_per_graph(
    monkeypatch, tmp_path, merged_model, caplog, kind
):
    from test_engines import pixel_gap, scene

    from icdcli.backends.accelerated import AcceleratedModel, torch_fallbacks
    from icdcli.diffusion.recipe import P2PSettings, SamplerSettings
    from icdcli.editing.edits import edit

    fake = Fake(monkeypatch, tmp_path)
    fake_export_of(fake, merged_model)
    attribute, _ = RUN_FAILURES[kind]
    getattr(fake.record, attribute).update(fake.manifest.graphs)
    parts = fake.parts(fallbacks=torch_fallbacks(merged_model), profiles=trt_plan.NATIVE_FIRST)
    accelerated = AcceleratedModel(merged_model, parts)
    args = (scene(), "a red square on a blue background", "a green square on a blue background")
    options = {"guidance": 7.0, "tau": 0.8, "settings": SamplerSettings(seed=3)}
    with caplog.at_level(logging.INFO, logger="icd"):
        swapped = edit(accelerated, *args, **options)
        controlled = edit(accelerated, *args, **options, p2p=P2PSettings())
    assert pixel_gap(swapped, edit(merged_model, *args, **options)) == 0
    assert pixel_gap(controlled, edit(merged_model, *args, **options, p2p=P2PSettings())) == 0
    notes = accelerated.fallback_notes()
    ran = {"forward_unet", "reverse_unet", "reverse_unet_p2p", "vae_encoder", "vae_decoder", "text_encoder"}
    assert set(notes) == ran
    for graph, note in notes.items():
        assert sum(note in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1, graph
        assert len(fake.calls("execute_async_v3", graph)) <= 1  # never tried again after the failure
        assert ("--fp32-norm" in note) == (kind == "nan")


# --- native-first builds ---------------------------------------------------------------------------------


def test_native_first_plans_one_profile_at_the_working_size():
    manifest = tiny_manifest()
    first = {r.graph: r for r in trt_plan.plan_engines(manifest, native_only=True)}
    full = {r.graph: r for r in trt_plan.plan_engines(manifest)}
    reverse = first["reverse_unet"]
    assert [label for label, _ in reverse.profiles] == ["native"] and reverse.kind == trt_plan.STATIC
    assert reverse.profiles[0] == full["reverse_unet"].profiles[0]  # the full plan's static native profile
    assert first["vae_decoder"].profile["latents"] == ((1, 4, 64, 64),) * 3
    assert first["text_encoder"].profiles == full["text_encoder"].profiles  # one profile anyway
    two = {r.graph: r for r in trt_plan.plan_engines(manifest, native_only=True, max_batch=2, height=768)}
    assert two["reverse_unet"].profile["sample"] == ((1, 4, 96, 64), (1, 4, 96, 64), (2, 4, 96, 64))
    cfg = {r.graph: r for r in trt_plan.plan_engines(tiny_manifest(guidance_distilled=False), native_only=True)}
    assert cfg["reverse_unet"].profile["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (2, 4, 64, 64))  # CFG: 2 rows
    assert cfg["forward_unet"].profile["sample"] == ((1, 4, 64, 64),) * 3  # the forward UNet is never guided


def test_native_first_builds_one_profile_then_the_rest_when_another_size_comes(monkeypatch, tmp_path, caplog):
    fake = Fake(monkeypatch, tmp_path)
    parts = fake.parts(profiles=trt_plan.NATIVE_FIRST)
    x = torch.randn(1, 4, 64, 64)
    assert torch.allclose(parts.reverse(x, 999, conditioning(), 8.0), 0.5 * x)
    built = fake.calls("engine_bytes_from_network", "reverse_unet")
    assert [len(c[2]["config"].kwargs["profiles"]) for c in built] == [1]
    parts.reverse(x, 779, conditioning(), 8.0)
    assert len(fake.calls("engine_bytes_from_network")) == 1  # nothing more for the same size
    wide = torch.randn(1, 4, 40, 104)
    with caplog.at_level(logging.INFO, logger="icd"):
        assert torch.allclose(parts.reverse(wide, 999, conditioning(), 8.0), 0.5 * wide)
    built = fake.calls("engine_bytes_from_network", "reverse_unet")
    assert [len(c[2]["config"].kwargs["profiles"]) for c in built] == [1, 4]
    assert "building its other profiles" in caplog.text and fake.fallback_calls == []
    gc.collect()
    assert [c[1] for c in fake.record.calls if c[0] == "destroyed" and c[2] == "reverse_unet"] == [
        "context", "engine", "runtime"
    ]  # fmt: skip  # the one-profile engine, closed once the full one was built
    assert torch.allclose(parts.reverse(x, 519, conditioning(), 8.0), 0.5 * x)  # on the full engine's native profile
    assert len(fake.calls("engine_bytes_from_network", "reverse_unet")) == 2
    again = fake.parts(profiles=trt_plan.NATIVE_FIRST)
    again.reverse(x, 999, conditioning(), 8.0)  # the full engine is in the cache: loaded, nothing built
    assert len(fake.calls("engine_bytes_from_network", "reverse_unet")) == 2
    assert len(again.reverse.runner.engine.profiles) == 4


def test_a_failed_wider_build_keeps_the_native_engine(fake):
    parts = fake.parts(profiles=trt_plan.NATIVE_FIRST)
    x, wide = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 40, 104)
    parts.reverse(x, 999, conditioning(), 8.0)
    fake.record.fail_build.add("reverse_unet")
    assert torch.equal(parts.reverse(wide, 999, conditioning(), 8.0), wide * 0 - 1)
    assert torch.equal(parts.reverse(wide, 779, conditioning(), 8.0), wide * 0 - 1)
    assert len(fake.calls("engine_bytes_from_network", "reverse_unet")) == 2  # the wider build is not retried
    assert torch.allclose(parts.reverse(x, 779, conditioning(), 8.0), 0.5 * x)  # native still on TensorRT
    assert parts.fallback_notes() == {}


def test_native_first_builds_nothing_wider_for_shapes_no_profile_holds(fake):
    parts = fake.parts(profiles=trt_plan.NATIVE_FIRST)
    thin = torch.randn(1, 4, 8, 512)
    assert torch.equal(parts.reverse(thin, 999, conditioning(), 8.0), thin * 0 - 1)
    built = fake.calls("engine_bytes_from_network", "reverse_unet")
    assert [len(c[2]["config"].kwargs["profiles"]) for c in built] == [1]


def test_build_now_builds_the_first_engine_of_the_mode(fake):
    fake.parts(build_now=["reverse_unet", "text_encoder"], profiles=trt_plan.NATIVE_FIRST)
    built = {c[1]: len(c[2]["config"].kwargs["profiles"]) for c in fake.calls("engine_bytes_from_network")}
    assert built == {"reverse_unet": 1, "text_encoder": 1}
    with pytest.raises(ICDError, match="unknown TensorRT profile mode 'some'"):
        fake.parts(profiles="some")


def test_tf32_is_asked_for_only_where_tensorrt_has_the_flag(monkeypatch, tmp_path):
    fake = Fake(monkeypatch, tmp_path, tf32=False)
    x = torch.randn(1, 4, 64, 64)
    assert torch.allclose(fake.parts().reverse(x, 999, conditioning(), 8.0), 0.5 * x)  # the fake refuses tf32 here
    assert "tf32" not in fake.calls("CreateConfig")[0][1]
