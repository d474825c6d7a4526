"""The PyTorch path's speed-ups, driven on the CPU: CUDA graph bookkeeping behind its capture seam, inputs put on the
device once per stage, every prompt encoded once per edit, the VAE's precision, and the memory rule by device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from icdcli.core.dtypes import vae_precision
from icdcli.diffusion.denoiser import DeviceCopies
from icdcli.diffusion.recipe import P2PSettings, SamplerSettings
from icdcli.editing.edits import EditJob, edit_batch
from icdcli.models.memory import release_between_stages
from icdcli.models.runtime import ICDModel
from icdcli.models.sources import ModelRequest, load_requested_model
from icdcli.models.torch_speed import GraphedCalls, TorchExecution, eager_replay

SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"


@pytest.fixture
def model() -> ICDModel:
    return load_requested_model(ModelRequest(None), need_teacher=False).to("cpu")


def scene(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def jobs(p2p: P2PSettings | None, count: int = 2) -> list[EditJob]:
    return [EditJob(scene(i), SOURCE, TARGET, 4.0 + i, 0.8, i, p2p) for i in range(count)]


def pixels(results: list) -> np.ndarray:
    assert all(isinstance(image, Image.Image) for image in results), results
    return np.stack([np.asarray(image, dtype=np.int16) for image in results])


# --- CUDA graph bookkeeping ------------------------------------------------------------------------------------


def test_replayed_outputs_are_copies_and_inputs_reach_the_static_buffers():
    calls = GraphedCalls(eager_replay)

    def run(tensors):
        return (tensors["x"] * 2 + tensors["t"],)

    first = calls(None, {"x": torch.ones(3), "t": torch.tensor([1.0])}, run)[0]
    second = calls(None, {"x": torch.full((3,), 5.0), "t": torch.tensor([2.0])}, run)[0]
    assert torch.equal(first, torch.full((3,), 3.0))  # not overwritten by the second replay
    assert torch.equal(second, torch.full((3,), 12.0))  # the second call's inputs, not the captured ones
    assert (calls.captures, calls.replays) == (1, 2)
    calls(None, {"x": torch.ones(4), "t": torch.tensor([1.0])}, run)  # another shape: another graph
    calls("other", {"x": torch.ones(4), "t": torch.tensor([1.0])}, run)  # another static choice: another graph
    assert calls.captures == 3


def test_a_failed_capture_runs_plain_calls_with_one_note():
    notes: list[str] = []

    def broken(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    calls = GraphedCalls(broken, name="reverse UNet", note=notes.append)
    for value in (1.0, 2.0):
        out = calls(None, {"x": torch.full((2,), value)}, lambda tensors: (tensors["x"] + 1,))[0]
        assert torch.equal(out, torch.full((2,), value + 1))
    assert len(notes) == 1 and "reverse UNet" in notes[0] and "plain calls" in notes[0]
    assert calls.captures == 0


def test_the_least_recently_used_graph_goes_past_the_limit():
    calls = GraphedCalls(eager_replay, limit=2)
    for size in (1, 2, 1, 3):
        calls(None, {"x": torch.ones(size)}, lambda tensors: (tensors["x"],))
    assert [key[1][0][1] for key in calls.graphs] == [(1,), (3,)]


@pytest.mark.parametrize("method", ["swap", "p2p", "p2p-blend"])
@pytest.mark.slow
def test_edits_replayed_from_graphs_equal_eager_edits(model, method):
    p2p = None if method == "swap" else P2PSettings(blend_target=("circle",) if method == "p2p-blend" else ())
    settings = SamplerSettings()
    eager = pixels(edit_batch(model, jobs(p2p), settings=settings))
    model.set_execution(TorchExecution(cuda_graphs=True), anywhere=True)
    graphed = pixels(edit_batch(model, jobs(p2p), settings=settings))
    assert np.abs(graphed - eager).max() <= 1
    forward, reverse = model._fast["forward"], model._fast["reverse"]
    assert forward.captures == 1 and forward.replays == 4  # four forward steps, one signature
    assert reverse.replays == 4 and 1 <= reverse.captures <= 4
    captured = reverse.captures
    again = pixels(edit_batch(model, jobs(p2p), settings=settings))  # a second edit reuses the graphs
    assert np.abs(again - graphed).max() == 0
    assert reverse.captures == captured and forward.captures == 1
    assert model.execution_notes == []


def test_releasing_or_moving_a_unet_drops_its_graphs(model):
    model.set_execution(TorchExecution(cuda_graphs=True), anywhere=True)
    edit_batch(model, jobs(None, 1), settings=SamplerSettings())
    assert set(model._fast) == {"forward", "reverse"}
    assert "forward" in model.unet_folders  # the embedded model's UNets are read again from the fused cache
    model.release("forward")
    assert "forward" not in model._fast and "reverse" in model._fast
    model.to("cpu")
    assert model._fast == {}


@pytest.mark.slow
def test_compiled_unets_compile_once_per_shape_and_leave_p2p_steps_eager(model):
    eager = pixels(edit_batch(model, jobs(None), settings=SamplerSettings()))
    model.set_execution(TorchExecution(compile=True), compile_backend="eager", anywhere=True)
    compiled = pixels(edit_batch(model, jobs(None), settings=SamplerSettings()))
    assert np.abs(compiled - eager).max() <= 1
    pixels(edit_batch(model, jobs(P2PSettings()), settings=SamplerSettings()))
    firsts = [note for note in model.execution_notes if note.startswith("torch.compile")]
    # forward (batch 2), reverse (batch 2), and the P2P decode's uncontrolled target rows (batch 2 again: no new
    # compile); the controlled P2P steps (batch 4) run eagerly, so nothing compiles at batch 4
    assert len(firsts) == 2 and all("(2, 4, 16, 16)" in note for note in firsts), firsts
    assert "forward UNet" in firsts[0] and "reverse UNet" in firsts[1]


def test_graphs_and_compile_off_cuda_run_eagerly_with_a_note(model):
    model.set_execution(TorchExecution.from_mode("graphs"))
    assert model.reverse_denoiser.graphs is None and model.reverse_denoiser.compiled is None
    assert any("on cpu the UNets run eagerly" in note for note in model.execution_notes)
    with pytest.raises(ValueError, match="execution mode"):
        TorchExecution.from_mode("fast")


# --- small inputs on the device once, prompts encoded once ---------------------------------------------------


def test_device_copies_copy_each_object_and_value_once():
    copies = DeviceCopies(torch.device("cpu"), torch.float16)
    source = torch.ones(3)
    assert copies.tensor(source) is copies.tensor(source)
    assert copies.tensor(source).dtype == torch.float16
    made: list[int] = []

    def make() -> torch.Tensor:
        made.append(1)
        return torch.zeros(2)

    assert copies.value(("w", 4.0), make) is copies.value(("w", 4.0), make)
    copies.value(("w", 5.0), make)
    assert len(made) == 2


def test_a_p2p_plan_gives_one_control_object_per_step(model):
    from icdcli.diffusion.p2p.plan import P2PBatch, make_plan

    plan = make_plan(model.tokenizers[0], SOURCE, TARGET, settings=P2PSettings(), num_steps=4, latent_side=8)
    assert plan.step(0) is plan.step(0) and plan.step(0) is not plan.step(3)
    batch = P2PBatch([plan, make_plan(model.tokenizers[0], SOURCE, TARGET, settings=P2PSettings(), num_steps=4,
                                      latent_side=8)])  # fmt: skip
    assert batch.step(1) is batch.step(1)


@pytest.mark.parametrize("method", ["swap", "p2p"])
def test_every_prompt_of_a_batch_is_encoded_once(model, method, monkeypatch):
    calls: list[list[str]] = []
    encode = model.encode_prompt

    def counting(text):
        calls.append([text] if isinstance(text, str) else list(text))
        return encode(text)

    monkeypatch.setattr(model, "encode_prompt", counting)
    edit_batch(model, jobs(None if method == "swap" else P2PSettings()), settings=SamplerSettings())
    # the sources in one call (what an inversion encodes), the targets in another; none twice
    encoded = [prompt for call in calls for prompt in call]
    assert len(calls) <= 2 and sorted(encoded) == sorted(set(encoded)) and set(encoded) >= {SOURCE, TARGET}


# --- the VAE's precision, the memory rule ------------------------------------------------------------------


def test_vae_precision_by_family_and_device():
    assert vae_precision("sd15", "cpu") == "float32"
    assert vae_precision("sdxl", "mps", bf16=True) == "float32"
    assert vae_precision("sd15", "cuda") == "float16"
    assert vae_precision("sdxl", "cuda", bf16=True) == "bfloat16"
    assert vae_precision("sdxl", "cuda", bf16=False) == "float32"


def test_the_vae_stays_float32_on_the_cpu_and_runs_in_the_dtype_it_is_given(model):
    assert model.vae_dtype == torch.float32 and next(model.vae.parameters()).dtype == torch.float32
    reference = pixels(edit_batch(model, jobs(None, 1), settings=SamplerSettings()))
    model.to("cpu", vae_dtype=torch.bfloat16)
    assert next(model.vae.parameters()).dtype == torch.bfloat16
    halved = pixels(edit_batch(model, jobs(None, 1), settings=SamplerSettings()))
    assert np.abs(halved - reference).mean() < 4  # the same edit, within bf16's rounding


def test_a_cpu_bf16_run_decodes_in_bf16_and_encodes_in_fp32(model):
    from icdcli.models.runtime import default_vae_decoder_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_vae_decoder_dtype(torch.float32, torch.bfloat16, cpu) == torch.bfloat16
    assert default_vae_decoder_dtype(torch.float32, torch.float32, cpu) == torch.float32
    assert default_vae_decoder_dtype(torch.float16, torch.float16, cuda) == torch.float16
    reference = pixels(edit_batch(model, jobs(None, 1), settings=SamplerSettings()))
    model.to("cpu", torch.bfloat16)
    dtypes = {name: next(getattr(model.vae, name).parameters()).dtype for name in ("encoder", "decoder")}
    assert dtypes == {"encoder": torch.float32, "decoder": torch.bfloat16}
    assert model.vae_dtype == torch.float32 and model.vae_decoder_dtype == torch.bfloat16
    halved = pixels(edit_batch(model, jobs(None, 1), settings=SamplerSettings()))
    assert np.abs(halved - reference).mean() < 4  # the same edit, within bf16's rounding
    model.to("cpu", torch.bfloat16, vae_dtype=torch.float32)  # a VAE dtype given is the whole VAE's
    assert next(model.vae.decoder.parameters()).dtype == torch.float32 == model.vae_decoder_dtype


def test_memory_rule_reads_free_gpu_memory_on_cuda():
    gib = 2**30
    # SDXL's two fp16 UNets (10.3 GB) on a host with 32 GB of RAM: released by the RAM rule ...
    assert release_between_stages(int(10.3 * gib), total=32 * gib)
    # ... but kept on a GPU with 70 GB free, released on one with 16 GB free
    assert not release_between_stages(int(10.3 * gib), total=32 * gib, free_gpu=70 * gib)
    assert release_between_stages(int(10.3 * gib), total=512 * gib, free_gpu=16 * gib)
    assert release_between_stages(1, False, free_gpu=1) is False  # the user's choice wins
