"""Low-memory edits: each UNet is freed once its stage is over, read again when next needed, and the edit's result
does not change."""

from __future__ import annotations

import weakref
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from icdcli.diffusion.recipe import P2PSettings, SamplerSettings
from icdcli.editing.edits import edit
from icdcli.models.memory import AUTO_FRACTION, release_between_stages
from icdcli.models.runtime import load_merged, set_memory_policy

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def _image() -> Image.Image:
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[..., 2] = 200
    pixels[8:24, 8:24, 0] = 220
    return Image.fromarray(pixels)


def _watched_decode(decode, unets, alive: list[bool], latents):
    alive.append(any(unet() is not None for unet in unets))
    return decode(latents)


def _edits(model, p2p: P2PSettings | None) -> np.ndarray:
    settings = SamplerSettings("icd", seed=3)
    return np.asarray(
        edit(model, _image(), SOURCE, TARGET, guidance=2.0, tau=0.7, settings=settings, p2p=p2p), dtype=np.int16
    )


def test_the_rule_frees_between_stages_only_for_large_unets_unless_told():
    total = 8 * 10**9
    assert not release_between_stages(int(AUTO_FRACTION * total) - 1, total=total)
    assert release_between_stages(int(AUTO_FRACTION * total) + 1, total=total)
    assert release_between_stages(1, True, total=total)
    assert not release_between_stages(10**12, False, total=total)


@pytest.mark.parametrize("p2p", [None, P2PSettings(cross_replace=0.5, self_replace=0.5, blend=("circle",))])
@pytest.mark.slow
def test_a_low_memory_edit_frees_each_unet_and_gives_the_same_pixels(merged_dir, p2p):
    torch.manual_seed(0)
    kept = set_memory_policy(load_merged(merged_dir).to("cpu", torch.float32), low_memory=False)
    freed = set_memory_policy(load_merged(merged_dir).to("cpu", torch.float32), low_memory=True)
    assert not kept.low_memory and freed.low_memory
    expected = _edits(kept, p2p)
    assert kept._unets["forward"] is not None and kept._unets["reverse"] is not None
    for _ in range(2):  # the second edit reads the freed UNets again
        unets = [weakref.ref(freed.forward_unet), weakref.ref(freed.reverse_unet)]
        alive_at_vae_decode: list[bool] = []
        freed.decode_latents = partial(_watched_decode, freed.decode_latents, unets, alive_at_vae_decode)
        try:
            assert np.array_equal(_edits(freed, p2p), expected)
        finally:
            del freed.decode_latents
        assert alive_at_vae_decode == [False]  # nothing held on to a freed UNet through the VAE decode
        assert freed._unets["forward"] is None and freed._unets["reverse"] is None


def test_a_released_unet_comes_back_on_the_models_device_and_dtype(merged_dir):
    model = load_merged(merged_dir).to("cpu", torch.bfloat16)
    model.release("forward")
    assert model._unets["forward"] is None
    assert next(model.forward_unet.parameters()).dtype == torch.bfloat16
    assert not model.forward_unet.training and not next(model.forward_unet.parameters()).requires_grad


def test_a_unet_without_a_folder_is_kept(merged_model):
    from icdcli.models.runtime import ICDModel

    m = merged_model
    model = ICDModel(m.info, m.vae, m.text_encoders, m.tokenizers, m.forward_unet, m.reverse_unet, source=m.source)
    model.release("forward")  # fused in memory only: nothing to read it back from
    assert model._unets["forward"] is m.forward_unet


@pytest.mark.slow
def test_onnxruntime_low_memory_closes_sessions_and_keeps_one_reverse_graph_open(merged_dir):
    from icdcli.backends.accelerated import accelerate
    from icdcli.engines.onnxruntime import OrtGraph

    p2p = P2PSettings(cross_replace=0.5, self_replace=0.25)  # control ends early: the plain reverse graph runs after
    kept = accelerate(set_memory_policy(load_merged(merged_dir), low_memory=False), "onnxruntime")
    expected = _edits(kept, p2p)
    freed = accelerate(set_memory_policy(load_merged(merged_dir), low_memory=True), "onnxruntime")
    open_at_once: list[set[str]] = []
    original = OrtGraph.__call__

    def watched(self, feeds):
        result = original(self, feeds)
        runners = freed.parts.runners
        open_at_once.append({name for name, runner in runners.items() if getattr(runner, "_session", None)})
        return result

    OrtGraph.__call__ = watched
    try:
        assert np.array_equal(_edits(freed, p2p), expected)
    finally:
        OrtGraph.__call__ = original
    reverse_graphs = [{name for name in names if name.startswith("reverse")} for names in open_at_once]
    assert {"reverse_unet"} in reverse_graphs and {"reverse_unet_p2p"} in reverse_graphs  # both ran, one at a time
    assert all(len(names) <= 1 for names in reverse_graphs)
    assert not any(name.startswith(("forward", "reverse")) for name in open_at_once[-1])  # freed before the VAE
    unets = {name: runner for name, runner in freed.parts.runners.items() if name.startswith(("forward", "reverse"))}
    assert unets and all(runner._session is None for runner in unets.values())


def test_a_low_memory_model_converts_each_unet_when_it_is_read_not_at_to(merged_dir):
    model = set_memory_policy(load_merged(merged_dir), low_memory=True, dtype=torch.bfloat16)
    model.to("cpu", torch.bfloat16)
    assert model._unets["forward"] is None and model._unets["reverse"] is None
    assert next(model.reverse_unet.parameters()).dtype == torch.bfloat16
    assert model._unets["forward"] is None  # only the one read
