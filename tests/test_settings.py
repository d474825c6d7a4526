"""Edit settings, one type per concern: the request laid over a model's recipe in one place, the sampler's
settings and the P2P record read back into the same settings."""

from types import SimpleNamespace

import pytest

from icdcli.core.values import NumberError
from icdcli.diffusion.recipe import EditRecipe, EditRequest, P2POptions, P2PSettings, SamplerSettings, release_recipe

INFO = SimpleNamespace(edit=release_recipe("sd15", (259, 519, 779, 999)), generate_guidance=8.0, num_steps=4)


def test_an_empty_request_is_the_recipe():
    edit = EditRequest().resolve(INFO)
    recipe = INFO.edit
    assert (edit.method, edit.guidance, edit.tau, edit.seed) == (recipe.method, recipe.guidance, recipe.tau, 30)
    assert edit.p2p == P2PSettings(cross_replace=0.3, self_replace=0.6, amplify_new=4.0)
    assert edit.sampling == SamplerSettings("icd", 50, 30)
    assert edit.record(INFO.num_steps) == {"method": "p2p", "sampler": "icd", "steps": 4, "guidance": 20.0,
                                           "tau": 0.8, "seed": 30}  # fmt: skip


def test_given_values_win_and_ddim_defaults_to_generation_guidance_without_dynamic_guidance():
    request = EditRequest(method="swap", seed=7, sampler="ddim", ddim_steps=12)
    edit = request.resolve(INFO)
    assert (edit.method, edit.guidance, edit.tau, edit.p2p) == ("swap", 8.0, 1.0, None)
    assert edit.sampling == SamplerSettings("ddim", 12, 7) and edit.sampling.steps(INFO.num_steps) == 12
    row = request.overridden(guidance=3.0, tau=None, seed=None).resolve(INFO)
    assert (row.guidance, row.tau, row.seed) == (3.0, 1.0, 7)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="method"):
        EditRequest(method="teleport")
    with pytest.raises(ValueError, match="sampler"):
        EditRequest(sampler="euler")


def test_a_p2p_record_reads_back_into_the_same_settings():
    given = P2POptions(cross_replace=0.5, mode="refine", amplify=(("red", 2.0),), blend_target=("circle",),
                       blend_threshold=0.4)  # fmt: skip
    settings = given.resolve(EditRecipe())
    again = P2POptions.from_record(settings.to_record())
    assert again.resolve(EditRecipe(cross_replace=0.9, self_replace=0.1, amplify=1.0)) == settings
    for bad in ({"cross_replace": 2}, {"amplify": {"red": "nan"}}, {"blend_threshold": None}):
        with pytest.raises(NumberError):
            P2POptions.from_record({**settings.to_record(), **bad})
