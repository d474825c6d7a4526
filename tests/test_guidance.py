import pytest
import torch

from icdcli.diffusion.denoiser import Conditioning, PromptEmbedding, UNetDenoiser, guidance_scale_embedding


def test_guidance_embedding_equals_diffusers_lcm():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([1.0, 2.5, 8.0, 20.0])
    lcm = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=512)
    torch.testing.assert_close(guidance_scale_embedding(w, 512), lcm)
    # w = 1 (no guidance) embeds (w - 1) * 1000 = 0: sin half zero, cos half one
    zero = guidance_scale_embedding(torch.tensor([1.0]))
    assert torch.equal(zero[0, :256], torch.zeros(256)) and torch.equal(zero[0, 256:], torch.ones(256))


class BatchRecorder:
    def __init__(self, unet):
        self.batches = []
        self.timestep_conds = []
        unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])
        self.timestep_conds.append(kwargs.get("timestep_cond"))


def _cond(batch=1, dim=32, tokens=12):
    generator = torch.Generator().manual_seed(3)
    return Conditioning(
        PromptEmbedding(torch.randn(batch, tokens, dim, generator=generator)),
        PromptEmbedding(torch.randn(batch, tokens, dim, generator=generator)),
    )


def test_distilled_unet_runs_batch_one_with_guidance_embedding():
    from tiny import make_teacher

    unet = make_teacher("sd15", guidance_distilled=True)
    recorder = BatchRecorder(unet)
    x = torch.randn(1, 4, 8, 8)
    eps = UNetDenoiser(unet)(x, 500, _cond(), guidance=8.0)
    assert eps.shape == x.shape and recorder.batches == [1]
    torch.testing.assert_close(recorder.timestep_conds[0], guidance_scale_embedding(torch.tensor([8.0])))
    other = UNetDenoiser(unet)(x, 500, _cond(), guidance=2.0)
    assert not torch.allclose(eps, other), "the guidance embedding must change the prediction"


def test_plain_unet_runs_real_cfg_only_on_guided_steps():
    from tiny import make_teacher

    unet = make_teacher("sd15", guidance_distilled=False)
    recorder = BatchRecorder(unet)
    denoiser = UNetDenoiser(unet)
    cond = _cond()
    x = torch.randn(1, 4, 8, 8)
    unguided = denoiser(x, 500, cond, guidance=1.0)
    guided = denoiser(x, 500, cond, guidance=7.5)
    assert recorder.batches == [1, 2]
    eps_uncond = denoiser(x, 500, cond.with_prompt(cond.negative), guidance=1.0)
    torch.testing.assert_close(guided, eps_uncond + 7.5 * (unguided - eps_uncond), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        denoiser(x, 500, Conditioning(cond.prompt), guidance=3.0)


def test_sdxl_unet_takes_pooled_text_and_time_ids():
    from tiny import make_teacher

    unet = make_teacher("sdxl", guidance_distilled=True)
    cond = Conditioning(
        PromptEmbedding(torch.randn(1, 12, 64), torch.randn(1, 32)), time_ids=torch.tensor([[16.0, 16, 0, 0, 16, 16]])
    )
    x = torch.randn(2, 4, 8, 8)
    eps = UNetDenoiser(unet)(x, 259, cond, guidance=8.0)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    with pytest.raises(ValueError, match="time_ids"):
        UNetDenoiser(unet)(x, 259, Conditioning(cond.prompt), guidance=8.0)
