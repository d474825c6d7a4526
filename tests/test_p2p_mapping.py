"""P2P token mapping against tables written from the release's controller rules.

The release maps tokens with `seq_aligner` (refine: a global alignment with its own tie-break and
padding rule; replace: word token blocks walked left to right) and finds words by exact match. The
tables below were worked out from those rules for a small sub-word tokenizer whose merges split
`dalmatian`, `sofa` and `watercolor` into several tokens, as CLIP's BPE splits rarer words.
"""

from __future__ import annotations

import json

import pytest
import torch

from icdcli.diffusion.p2p.plan import cross_replace_steps, make_plan, self_replace_steps
from icdcli.diffusion.p2p.tokens import (
    align_tokens,
    new_words,
    prompt_token_ids,
    prompt_words,
    refinement_mapper,
    replacement_mapper,
    reweight_vector,
    word_indicator,
    word_token_positions,
)
from icdcli.diffusion.recipe import P2PError, P2PSettings
from icdcli.training.tokenizer import build_subword_tokenizer

LENGTH = 16
WORDS = "a cat dog on the mat red blue painting of sketch circle background big".split()
SPLITS = {"dalmatian": ["dal", "mat", "ian"], "sofa": ["so", "fa"], "watercolor": ["water", "col", "or"]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_subword_tokenizer(WORDS, SPLITS, max_length=LENGTH)


def _columns(mapper: torch.Tensor, alphas: torch.Tensor | None = None) -> list[int]:
    """Target position -> the one source position it reads (-1: a new token)."""
    out = []
    for j in range(mapper.shape[1]):
        if alphas is not None and alphas[j] == 0:
            out.append(-1)
            continue
        rows = mapper[:, j].nonzero().flatten().tolist()
        assert len(rows) == 1, f"target {j} reads {rows}"
        out.append(rows[0])
    return out


def _replace(tokenizer, source: str, target: str, shift_tail: bool = False) -> torch.Tensor:
    return replacement_mapper(
        prompt_words(source),
        prompt_words(target),
        source_positions=word_token_positions(tokenizer, source),
        target_positions=word_token_positions(tokenizer, target),
        length=LENGTH,
        shift_tail=shift_tail,
    )


def _refine(tokenizer, source: str, target: str) -> list[int]:
    mapper, alphas = refinement_mapper(
        prompt_token_ids(tokenizer, source), prompt_token_ids(tokenizer, target), length=LENGTH
    )
    return _columns(mapper, alphas)


# --- words to tokens ------------------------------------------------------------------------------


def test_word_positions_come_from_offsets_for_sub_word_tokens(tokenizer):
    assert word_token_positions(tokenizer, "a watercolor painting of a dalmatian") == [
        [1],
        [2, 3, 4],
        [5],
        [6],
        [7],
        [8, 9, 10],
    ]
    assert word_token_positions(tokenizer, "a cat on a sofa") == [[1], [2], [3], [4], [5, 6]]
    # punctuation is a token of its own but stays with its word; extra spaces change nothing
    assert word_token_positions(tokenizer, "a  cat,  on") == [[1], [2, 3], [4]]


def test_words_match_exactly(tokenizer):
    prompt = "a dalmatian on the mat"
    assert word_indicator(tokenizer, prompt, ["dalmatian"]).nonzero().flatten().tolist() == [2, 3, 4]
    assert word_indicator(tokenizer, prompt, ["mat"]).nonzero().flatten().tolist() == [
        7
    ]  # not the piece inside dalmatian
    assert not word_indicator(tokenizer, prompt, ["Dalmatian"]).any()
    assert not word_indicator(tokenizer, "a cat.", ["cat"]).any()


# --- refine ------------------------------------------------------------------------------------


def test_refine_maps_target_padding_to_the_same_source_position(tokenizer):
    # source: bos a cat eos (4 tokens); target: bos a big dal mat ian on the mat eos (10 tokens)
    assert _refine(tokenizer, "a cat", "a big dalmatian on the mat") == [0, 1, -1, -1, -1, -1, -1, -1, -1, 3] + list(
        range(10, LENGTH)
    )
    # a shorter target: its padding reads the source's own tokens at those positions (the release's rule)
    assert _refine(tokenizer, "a big dalmatian on the mat", "a cat") == [0, 1, -1, 9] + list(range(4, LENGTH))


def test_refine_tie_break_prefers_a_new_target_token(tokenizer):
    assert _refine(tokenizer, "a red circle", "a red red circle") == [0, 1, 2, -1, 3, 4] + list(range(6, LENGTH))
    source, target = "a red circle on a blue background", "a sketch painting of a red circle on a blue background"
    # the target's first "a" takes the source's "a"; the second "a" (before "red") counts as new
    assert _refine(tokenizer, source, target) == [0, 1, -1, -1, -1, -1, 2, 3, 4, 5, 6, 7, 8] + list(range(13, LENGTH))
    assert _refine(tokenizer, "a cat on the mat", "a cat on the mat on the mat") == [
        0,
        1,
        2,
        3,
        4,
        5,
        -1,
        -1,
        -1,
        6,
    ] + list(range(10, LENGTH))
    assert align_tokens([1, 5, 6, 3], [1, 5, 5, 6, 3]) == [0, 1, -1, 2, 3]
    assert align_tokens([1, 5, 6, 3], [1, 5, 6, 3]) == [0, 1, 2, 3]


# --- replace -----------------------------------------------------------------------------------


def test_replace_maps_changed_words_by_the_release_rules(tokenizer):
    # "cat" (1 token) -> "dalmatian" (3): each dalmatian token reads cat's map times 1/3
    mapper = _replace(tokenizer, "a cat on the mat", "a dalmatian on the mat")
    assert mapper[0, 0] == 1 and mapper[1, 1] == 1
    assert torch.allclose(mapper[2, 2:5], torch.full((3,), 1 / 3)) and mapper[:, 2:5].sum() == pytest.approx(1.0)
    # "dalmatian" (3) -> "cat" (1): cat reads the sum of the three maps (times 1/1)
    back = _replace(tokenizer, "a dalmatian on the mat", "a cat on the mat")
    assert back[2:5, 2].tolist() == [1.0, 1.0, 1.0]
    # "sofa" (2) -> "dalmatian" (3): both sofa tokens feed each dalmatian token with 1/3
    spread = _replace(tokenizer, "a sofa on the mat", "a dalmatian on the mat")
    assert torch.allclose(spread[2:4, 2:5], torch.full((2, 3), 1 / 3))
    # equal token counts map token to token, unchanged words included
    equal = _replace(tokenizer, "a cat on a sofa", "a dog on a sofa")
    assert _columns(equal) == list(range(LENGTH))
    pieces = _replace(tokenizer, "a sofa on the mat", "a watercolor on the mat")  # 2 -> 3 pieces
    assert _columns(_replace(tokenizer, "a watercolor on the mat", "a dalmatian on the mat"))[:9] == [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
    ]
    assert pieces[2:4, 2:5].sum() == pytest.approx(2.0)


def test_replace_tail_aligned_here_shifted_in_the_release(tokenizer):
    source, target = "a cat on the mat", "a dalmatian on the mat"
    # source: bos a cat on the mat eos; target: bos a dal mat ian on the mat eos
    aligned = _replace(tokenizer, source, target)
    assert [int(aligned[:, j].argmax()) for j in range(5, LENGTH)] == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    released = _replace(tokenizer, source, target, shift_tail=True)
    # the release continues on the target's own positions: target "on" (5) reads source "mat" (5)
    assert [int(released[:, j].argmax()) for j in range(5, LENGTH)] == list(range(5, LENGTH))
    # when the source is longer the release's walk ends early and leaves the last positions unmapped
    shorter = _replace(tokenizer, "a dalmatian on the mat", source, shift_tail=True)
    assert shorter[:, LENGTH - 2 :].sum() == 0 and shorter[:, : LENGTH - 2].sum(0).min() > 0
    with pytest.raises(P2PError, match="equal word counts"):
        _replace(tokenizer, "a cat", "a big cat")


def test_an_edit_reaches_the_releases_tail_only_when_asked_and_records_it(tokenizer):
    from icdcli.diffusion.recipe import P2POptions, release_recipe

    source, target = "a cat on the mat", "a dalmatian on the mat"

    def plan(settings):
        return make_plan(tokenizer, source, target, settings=settings, num_steps=4, latent_side=16)

    default, release = plan(P2PSettings()), plan(P2PSettings(replace_tail="release"))
    assert torch.equal(default.mapper, _replace(tokenizer, source, target))
    assert torch.equal(release.mapper, _replace(tokenizer, source, target, shift_tail=True))
    assert not torch.equal(default.mapper, release.mapper)  # 3 target tokens for "cat": the tails differ
    same = "a dog on the mat"  # equal token counts: the two rules are one
    assert torch.equal(
        make_plan(tokenizer, source, same, settings=P2PSettings(), num_steps=4, latent_side=16).mapper,
        make_plan(tokenizer, source, same, settings=P2PSettings(replace_tail="release"), num_steps=4,
                  latent_side=16).mapper,
    )  # fmt: skip
    with pytest.raises(P2PError, match="replace_tail must be aligned or release"):
        P2PSettings(replace_tail="icd")
    # records: the release's rule is named, icd's default leaves the record as it was; both read back
    assert "replace_tail" not in P2PSettings().to_record()
    recorded = P2PSettings(replace_tail="release").to_record()
    assert recorded["replace_tail"] == "release"
    recipe = release_recipe("sd15", (259, 519, 779, 999))
    assert P2POptions.from_record(recorded).resolve(recipe).replace_tail == "release"
    assert P2POptions.from_record(P2PSettings().to_record()).resolve(recipe).replace_tail == "aligned"
    with pytest.raises(ValueError, match="replace_tail must be aligned or release"):
        P2POptions.from_record({**recorded, "replace_tail": "shifted"})


# --- reweight and blend ------------------------------------------------------------------------


def test_new_words_and_their_amplification(tokenizer):
    assert new_words("a cat on the mat", "a big dalmatian on the mat") == ["big", "dalmatian"]
    assert new_words("a cat", "the cat of a dog") == ["dog"]  # stopwords left out
    weights = reweight_vector(tokenizer, "a cat on the mat", "a big dalmatian on the mat", amplify=(), amplify_new=4.0)
    assert weights.tolist()[:7] == [1, 1, 4, 4, 4, 4, 1]
    explicit = reweight_vector(tokenizer, "a cat", "a big dalmatian", amplify=(("big", 2.0),), amplify_new=4.0)
    assert explicit.tolist()[:6] == [1, 1, 2, 4, 4, 4]
    with pytest.raises(P2PError, match="not a word of the target"):
        reweight_vector(tokenizer, "a cat", "a dog", amplify=(("Dog", 2.0),))


def test_blend_words_per_prompt(tokenizer):
    settings = P2PSettings(blend_source=("cat",), blend_target=("dalmatian",))
    plan = make_plan(
        tokenizer, "a cat on the mat", "a dalmatian on the mat", settings=settings, num_steps=4, latent_side=16
    )
    assert plan.blend_tokens[0].nonzero().flatten().tolist() == [2]
    assert plan.blend_tokens[1].nonzero().flatten().tolist() == [2, 3, 4]
    either = make_plan(
        tokenizer,
        "a cat on the mat",
        "a dog on the mat",
        settings=P2PSettings(blend=("cat", "dog")),
        num_steps=4,
        latent_side=16,
    )
    assert either.blend_tokens.nonzero().tolist() == [[0, 2], [1, 2]]
    with pytest.raises(P2PError, match="--blend-tgt word 'puppy'"):
        make_plan(
            tokenizer,
            "a cat",
            "a dog",
            settings=P2PSettings(blend_source=("cat",), blend_target=("puppy",)),
            num_steps=4,
            latent_side=16,
        )
    lenient = P2PSettings(blend_source=("cat",), blend_target=("puppy",), strict_blend=False)
    assert (
        make_plan(tokenizer, "a cat", "a dog", settings=lenient, num_steps=4, latent_side=16).blend_tokens[1].sum() == 0
    )  # adds no region
    with pytest.raises(P2PError, match="neither prompt"):
        make_plan(tokenizer, "a cat", "a dog", settings=P2PSettings(blend=("Cat",)), num_steps=4, latent_side=16)


# --- the step rule -------------------------------------------------------------------------------

# Written from the release's controller: its cross-attention table has num_steps + 1 rows with rows
# [0, int(fraction * (num_steps + 1))) replacing, read at row `step`; self-attention replaces at
# steps [int(num_steps * 0), int(num_steps * fraction)); local blend starts after the first step
# (start_blend = int(0.0 * num_steps) = 0, and its counter is incremented before the comparison).
STEP_TABLE = [
    # steps, cross, self, cross-replacing steps, self-replacing steps
    (4, 0.3, 0.6, [0], [0, 1]),
    (4, 0.4, 0.4, [0, 1], [0]),
    (4, 0.8, 0.4, [0, 1, 2, 3], [0]),
    (4, 0.2, 0.2, [0], []),
    (4, 0.1, 0.25, [], [0]),
    (4, 1.0, 1.0, [0, 1, 2, 3], [0, 1, 2, 3]),
    (3, 0.3, 0.6, [0], [0]),
    (3, 0.5, 0.7, [0, 1], [0, 1]),
    (3, 0.8, 0.4, [0, 1, 2], [0]),
    (3, 0.2, 0.34, [], [0]),
]


@pytest.mark.parametrize(("steps", "cross", "self_", "cross_steps", "self_steps"), STEP_TABLE)
def test_step_rule_matches_the_release_table(steps, cross, self_, cross_steps, self_steps):
    assert [i for i, on in enumerate(cross_replace_steps(steps, cross)) if on] == cross_steps
    assert [i for i, on in enumerate(self_replace_steps(steps, self_)) if on] == self_steps


def test_spec_rows_give_per_prompt_blend_words(tmp_path):
    from click.testing import CliRunner

    from icdcli.cli.main import main
    from icdcli.io.images import read_record
    from icdcli.models.sources import DEFAULT_MODEL_DIR

    example = DEFAULT_MODEL_DIR.parent.parent / "examples" / "red-circle.png"
    source = "a red circle on a blue background"
    rows = [
        {"image": str(example), "src": source, "tgt": "a red square on a blue background", "output": "ok.png",
         "blended_word": "circle square"},
        {"image": str(example), "src": source, "tgt": "a red square on a blue background", "output": "bad.png",
         "blended_word": "circle"},
        {"image": str(example), "src": source, "tgt": "a red square on a blue background", "output": "absent.png",
         "blended_word": "circle triangle"},
    ]  # fmt: skip
    spec = tmp_path / "spec.jsonl"
    spec.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    result = CliRunner().invoke(main, ["edit", "--spec", str(spec), "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 1, result.output
    record = read_record(tmp_path / "out" / "ok.png")
    assert (record["p2p"]["blend_source"], record["p2p"]["blend_target"]) == (["circle"], ["square"])
    assert "blended_word must be two words" in result.output and "--blend-tgt word 'triangle'" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.png"]
