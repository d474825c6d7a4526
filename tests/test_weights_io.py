"""Streamed safetensors files: what the safetensors library and diffusers read back, bit for bit."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from icdcli.models.weights_io import save_unet, write_safetensors


def test_streamed_file_reads_back_exactly_with_its_metadata(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(3, 5, generator=generator),
        "b.half": torch.randn(7, generator=generator).half(),
        "c.bf16": torch.randn(2, 3, 4, generator=generator).bfloat16(),
        "d.ids": torch.arange(5, dtype=torch.int64),
        "e.strided": torch.randn(4, 6, generator=generator).t(),  # not contiguous
        "f.empty": torch.zeros(0, 3),
    }
    path = tmp_path / "w.safetensors"
    write_safetensors(tensors, path, metadata={"format": "pt"})
    loaded = load_file(str(path))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_a_saved_unet_loads_with_diffusers_unchanged(tmp_path, merged_model):
    from diffusers import UNet2DConditionModel

    unet = merged_model.reverse_unet
    save_unet(unet, tmp_path / "unet")
    again = UNet2DConditionModel.from_pretrained(tmp_path / "unet", use_safetensors=True)
    assert again.config.time_cond_proj_dim == unet.config.time_cond_proj_dim
    state = unet.state_dict()
    assert all(torch.equal(value, state[name]) for name, value in again.state_dict().items())


def test_a_half_unet_folder_loads_in_half_without_a_widened_copy(tmp_path, merged_model):
    import copy

    from icdcli.models.components import load_unet as _load_unet
    from icdcli.models.components import stored_dtype

    half = copy.deepcopy(merged_model.reverse_unet).half()
    save_unet(half, tmp_path / "unet")
    assert stored_dtype(tmp_path / "unet") == torch.float16
    assert {p.dtype for p in _load_unet(tmp_path / "unet").parameters()} == {torch.float16}
    assert stored_dtype(tmp_path / "nothing-here") is None
