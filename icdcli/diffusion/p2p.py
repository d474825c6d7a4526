"""Prompt-to-Prompt (P2P) attention control for few-step samplers.

A P2P edit decodes two branches from the same encoded latent: the source prompt (unguided) and the
target prompt (under dynamic guidance). In every attention layer it touches, the target branch's
attention probabilities are rewritten from the source branch's:

- cross-attention, within the cross-replace steps: the source map carried over to the target's
  tokens (`replace`: word for word; `refine`: along a token alignment, new words keep their own
  maps), optionally amplified per word (reweight);
- self-attention on maps of at most 32x32 queries, within the self-replace steps: the source map.

Local blend then keeps the target branch equal to the source outside the blend words' region.

Everything a layer reads at one step is a tensor in `StepControl`, so the same processor runs in
PyTorch and traces into an exported graph whose inputs are those tensors (see `icdcli.export`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from icdcli.diffusion.denoiser import Conditioning, ControlledDenoiser, Guidance, row_guidance, take_rows
from icdcli.diffusion.recipe import ALIGNED_TAIL, BLEND_THRESHOLD, RELEASE_TAIL, check_replace_tail

SELF_REPLACE_MAX_QUERIES = 32 * 32
REPLACE, REFINE = "replace", "refine"


class P2PError(ValueError):
    """A Prompt-to-Prompt request that cannot be carried out as asked (the message says why)."""


@dataclass(frozen=True)
class P2PSettings:
    """What the user asks of a P2P edit.

    `cross_replace` and `self_replace` are fractions of the decoding steps. Local blend keeps the
    source outside the region of its words: `blend` are looked up in both prompts, `blend_source`
    in the source prompt only and `blend_target` in the target only (the release's per-prompt form,
    PIE-Bench's `blended_word`). `amplify` multiplies the target's attention to chosen words,
    `amplify_new` to every word new in the target (stopwords excepted). `mode` is `auto` (replace
    when the prompts have equal word counts, else refine), `replace` or `refine`. With
    `strict_blend`, a per-prompt blend word missing from its prompt is an error; without, it adds
    no region (what the release does). `replace_tail` is the rule of a replace edit's tokens after the last
    changed word: `aligned` (icd's: each reads its own counterpart) or `release` (the release's shifted
    positions, for exact replays of its results; see `replacement_mapper` and docs/p2p.md).

    The defaults are the library's (P2P's own 0.8 and 0.4); an edit's come from its model's recipe through
    `icdcli.diffusion.recipe.P2POptions.resolve`. `to_record` is what an output keeps (read back by
    `P2POptions.from_record`).
    """

    cross_replace: float = 0.8
    self_replace: float = 0.4
    blend: tuple[str, ...] = ()
    amplify: tuple[tuple[str, float], ...] = ()
    mode: str = "auto"
    blend_threshold: float = BLEND_THRESHOLD
    blend_source: tuple[str, ...] = ()
    blend_target: tuple[str, ...] = ()
    amplify_new: float = 1.0
    strict_blend: bool = True
    replace_tail: str = ALIGNED_TAIL

    def __post_init__(self) -> None:
        for name in ("cross_replace", "self_replace", "blend_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise P2PError(f"{name.replace('_', '-')} must be a fraction in [0, 1], got {value}")
        factors = [self.amplify_new, *(factor for _, factor in self.amplify)]
        if not all(0.0 <= factor < 1e6 for factor in factors):
            raise P2PError(f"amplify factors must be finite and >= 0, got {factors}")
        if self.mode not in ("auto", REPLACE, REFINE):
            raise P2PError(f"P2P mode must be auto, replace or refine, got {self.mode!r}")
        try:
            check_replace_tail(self.replace_tail)
        except ValueError as error:
            raise P2PError(str(error)) from None

    @property
    def blends(self) -> bool:
        return bool(self.blend or self.blend_source or self.blend_target)

    def to_record(self) -> dict[str, Any]:
        """The settings as JSON values (what an output's record keeps). `replace_tail` is kept only when it is the
        release's: records of icd's default rule stay as they were before the choice existed (resume skips them)."""
        tail = {"replace_tail": self.replace_tail} if self.replace_tail != ALIGNED_TAIL else {}
        return {
            "cross_replace": self.cross_replace,
            "self_replace": self.self_replace,
            "mode": self.mode,
            "blend": list(self.blend),
            "blend_source": list(self.blend_source),
            "blend_target": list(self.blend_target),
            "blend_threshold": self.blend_threshold,
            "amplify": {word: factor for word, factor in self.amplify},
            "amplify_new": self.amplify_new,
            **tail,
        }


# --- the step schedule ---------------------------------------------------------------------------


def cross_replace_steps(num_steps: int, fraction: float) -> list[bool]:
    """Steps whose cross-attention is replaced: [0, int((num_steps + 1) * fraction)).

    P2P keeps a table of num_steps + 1 rows of per-word weights and reads row i at step i, so with
    4 steps a fraction covers int(5 * fraction) of them (0.8 -> all 4, 0.4 -> the first 2).
    """
    active = int((num_steps + 1) * fraction)
    return [step < active for step in range(num_steps)]


def self_replace_steps(num_steps: int, fraction: float) -> list[bool]:
    """Steps whose self-attention is replaced: [0, int(num_steps * fraction))."""
    active = int(num_steps * fraction)
    return [step < active for step in range(num_steps)]


# --- words and tokens ----------------------------------------------------------------------------
#
# The token mapping follows the release's P2P controller: words are the prompt's whitespace-separated
# words, matched exactly (case and punctuation count); refine aligns the two token sequences globally
# and maps the target's padding position for position; replace maps changed words by their token
# blocks. The one deliberate difference is the tail of a replace edit (see `replacement_mapper`).

ENGLISH_STOPWORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he
    him his himself she she's her hers herself it it's its itself they them their theirs themselves what which
    who whom this that that'll these those am is are was were be been being have has had having do does did
    doing a an the and but if or because as until while of at by for with about against between into through
    during before after above below to from up down in out on off over under again further then once here there
    when where why how all any both each few more most other some such no nor not only own same so than too very
    s t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn
    didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn
    needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split()
)
"""NLTK's English stopword list, which the release leaves out of the words it amplifies."""


def prompt_words(prompt: str) -> list[str]:
    return prompt.split()


def _word_char_spans(prompt: str) -> list[tuple[int, int]]:
    return [match.span() for match in re.finditer(r"\S+", prompt)]


def _encode(tokenizer: Any, text: str, **kwargs: Any) -> Any:
    return tokenizer(text, max_length=tokenizer.model_max_length, truncation=True, **kwargs)


def word_token_positions(tokenizer: Any, prompt: str) -> list[list[int]]:
    """For each word of `prompt`, its token positions in the encoded sequence (begin-of-text at 0).

    Fast tokenizers place tokens by their character offsets, so a word split into several sub-word
    tokens gets all of them and tokens never drift from their words. Slow tokenizers (no offsets)
    count each word's tokens tokenized alone. Words past the text encoder's length get no positions.
    """
    spans = _word_char_spans(prompt)
    positions: list[list[int]] = [[] for _ in spans]
    if getattr(tokenizer, "is_fast", False):
        encoded = _encode(tokenizer, prompt, return_offsets_mapping=True, return_special_tokens_mask=True)
        word = 0
        for index, ((start, end), special) in enumerate(
            zip(encoded["offset_mapping"], encoded["special_tokens_mask"], strict=True)
        ):
            if special or end <= start:
                continue
            while word < len(spans) and spans[word][1] <= start:
                word += 1
            if word < len(spans) and spans[word][0] < end:
                positions[word].append(index)
        return positions
    ids = _encode(tokenizer, prompt).input_ids
    last = len(ids) - 1 if ids and ids[-1] == tokenizer.eos_token_id else len(ids)
    start = 1 if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else 0
    for word, (a, b) in enumerate(spans):
        count = len(tokenizer(prompt[a:b], add_special_tokens=False).input_ids)
        positions[word] = [p for p in range(start, start + count) if p < last]
        start += count
    return positions


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids with begin- and end-of-text, without padding (cut at the encoder's length)."""
    return list(_encode(tokenizer, prompt).input_ids)


def replacement_mapper(
    source_words: Sequence[str],
    target_words: Sequence[str],
    *,
    source_positions: Sequence[Sequence[int]],
    target_positions: Sequence[Sequence[int]],
    length: int,
    shift_tail: bool = False,
) -> torch.Tensor:
    """(length, length) matrix M with target map = source map @ M, word for word (P2P's replace).

    The release's rules: unchanged words, and changed words of equal token counts, map token to
    token; a changed word of n source tokens onto m target tokens gives every target token the sum of
    the source tokens' maps times 1/m. Begin-of-text maps to itself.

    After the last changed word the release continues on the diagonal of the *target* position
    (`shift_tail=True`), so when the changed words' token counts differ, every later word, the
    end-of-text and the padding take the map of a token that many positions away. icd keeps the
    tail aligned instead (each later token takes its own counterpart's map): see docs/p2p.md for the
    measurement behind that choice. Edits reach the release's rule through `P2PSettings.replace_tail`.
    """
    if len(source_words) != len(target_words):
        raise P2PError(
            f"replace needs prompts with equal word counts ({len(source_words)} vs {len(target_words)}): use refine"
        )
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0
    i = j = 1
    changed = [k for k, (a, b) in enumerate(zip(source_words, target_words, strict=True)) if a != b]
    last_changed = changed[-1] if changed else -1
    for k, (source_tokens, target_tokens) in enumerate(zip(source_positions, target_positions, strict=True)):
        if not source_tokens or not target_tokens:
            break  # cut off by the text encoder's length
        if shift_tail and k > last_changed:
            break
        if len(source_tokens) == len(target_tokens):
            for a, b in zip(source_tokens, target_tokens, strict=True):
                mapper[a, b] = 1.0
        else:
            for b in target_tokens:
                mapper[list(source_tokens), b] = 1.0 / len(target_tokens)
        i, j = source_tokens[-1] + 1, target_tokens[-1] + 1
    if shift_tail:
        while i < length and j < length:
            mapper[j, j] = 1.0
            i, j = i + 1, j + 1
        return mapper
    for offset in range(length - j):
        mapper[min(i + offset, length - 1), j + offset] = 1.0
    return mapper


def align_tokens(source: Sequence[int], target: Sequence[int]) -> list[int]:
    """For each target position, the source position aligned to it, or -1 for a token new in the target.

    Global (Needleman-Wunsch) alignment scoring a match 1, a mismatch -1 and a gap 0, as the
    release's refinement does, with its tie-break: where several moves reach the best score, the
    target token counts as new first, then the source token as deleted, and only then as a match.
    """
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]  # 1: target token new, 2: source token deleted, 3: diagonal
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
        for j in range(1, m + 1):
            new = score[i][j - 1]
            deleted = score[i - 1][j]
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            best = max(new, deleted, diagonal)
            score[i][j] = best
            move[i][j] = 1 if best == new else 2 if best == deleted else 3
    aligned = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return aligned


def refinement_mapper(
    source_ids: Sequence[int], target_ids: Sequence[int], *, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas) for refine: aligned target tokens take their source token's map (alpha 1),
    tokens new in the target keep their own (alpha 0). `*_ids` are the token sequences up to and
    including end-of-text. Each target padding position takes the map of the source position with
    the same index (the release's rule; when the source is longer, those are its last words).
    """
    aligned = align_tokens(source_ids, target_ids)
    mapper = torch.zeros(length, length)
    alphas = torch.ones(length)
    for j, i in enumerate(aligned[:length]):
        if i < 0:
            alphas[j] = 0.0
            mapper[j, j] = 1.0  # unused (alpha 0); keeps every column a distribution
        else:
            mapper[i, j] = 1.0
    for j in range(len(target_ids), length):
        mapper[j, j] = 1.0
    return mapper, alphas


def word_indicator(tokenizer: Any, prompt: str, words: Sequence[str], *, positions: list[list[int]] | None = None):
    """(length,) 1 at the tokens of every occurrence of `words` in `prompt` (exact word match), 0 elsewhere.

    `positions` are `word_token_positions(tokenizer, prompt)` when the caller has them already.
    """
    found = torch.zeros(tokenizer.model_max_length)
    wanted = set(words)
    positions = word_token_positions(tokenizer, prompt) if positions is None else positions
    for word, tokens in zip(prompt_words(prompt), positions, strict=True):
        if word in wanted:
            found[tokens] = 1.0
    return found


def new_words(source: str, target: str) -> list[str]:
    """Target words that are not words of the source, English stopwords left out (what the release amplifies)."""
    present = set(prompt_words(source))
    return [w for w in prompt_words(target) if w not in present and w not in ENGLISH_STOPWORDS]


def reweight_vector(
    tokenizer: Any,
    source: str,
    target: str,
    *,
    amplify: Sequence[tuple[str, float]],
    amplify_new: float = 1.0,
    positions: list[list[int]] | None = None,
) -> torch.Tensor:
    """(length,) attention multipliers of the target prompt's tokens.

    `amplify_new` multiplies every word new in the target (see `new_words`), as the release's
    recipe does; explicit `amplify` pairs set a word's factor and must name a word of the target.
    `positions`: the target's `word_token_positions`, when the caller has them.
    """
    weights = torch.ones(tokenizer.model_max_length)
    positions = word_token_positions(tokenizer, target) if positions is None else positions
    if amplify_new != 1.0:
        weights[word_indicator(tokenizer, target, new_words(source, target), positions=positions).bool()] = amplify_new
    for word, factor in amplify:
        found = word_indicator(tokenizer, target, [word], positions=positions).bool()
        if not found.any():
            raise P2PError(
                f"--amplify word {word!r} is not a word of the target prompt {target!r} "
                f"(words match exactly: {', '.join(prompt_words(target))})"
            )
        weights[found] = factor
    return weights


# --- the per-edit plan and the per-step control --------------------------------------------------


@dataclass(frozen=True, eq=False)
class StepControl:
    """What the attention processors read at one step (tensors: they are graph inputs when exported).

    `cross_alpha` (L,): weight of the edited cross-attention map per target token (0 outside the
    cross-replace steps); `refine` (L,): 1 where the target token has a source token; `mapper`
    (L, L); `reweight` (L,); `self_replace` (1,): 1 within the self-replace steps. Cross-attention
    maps of `blend_queries` queries are the ones local blend reads: a controlled step returns them
    (see `icdcli.diffusion.denoiser.ControlledEps`).

    `cross_active` and `self_active` say (in Python, for PyTorch) whether the step edits cross- or
    self-attention at all; layers a step leaves alone then keep the fused SDPA kernel. An exported
    graph cannot branch on them: it leaves both True and computes every touched layer explicitly,
    which gives the same result with the flags' tensors at 0.

    Frozen: a control is an input of its step, never written to; compared by identity (it holds tensors).
    """

    cross_alpha: torch.Tensor
    refine: torch.Tensor
    mapper: torch.Tensor
    reweight: torch.Tensor
    self_replace: torch.Tensor
    blend_queries: int | None = None
    self_max_queries: int = SELF_REPLACE_MAX_QUERIES
    cross_active: bool = True
    self_active: bool = True

    def to(self, device: torch.device | str, dtype: torch.dtype) -> StepControl:
        return replace(
            self,
            cross_alpha=self.cross_alpha.to(device, dtype),
            refine=self.refine.to(device, dtype),
            mapper=self.mapper.to(device, dtype),
            reweight=self.reweight.to(device, dtype),
            self_replace=self.self_replace.to(device, dtype),
        )


class ControlPlan(Protocol):
    """The attention control of a whole P2P decode: one edit's `P2PPlan`, or a `P2PBatch` of several."""

    def step(self, index: int) -> StepControl:
        """The control of step `index`."""
        ...

    def reads_source(self, index: int) -> bool:
        """Whether step `index` or a later one reads the source rows (attention control or local blend)."""
        ...

    def add_maps(self, maps: Sequence[torch.Tensor]) -> None:
        """Accumulate the blend-resolution cross-attention maps one controlled step returned."""
        ...

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """Local blend of the rows (source 1, target 1, ...) after a step, from the maps so far."""
        ...


@dataclass
class P2PPlan:
    """A whole P2P edit's control: per-step flags, token mapping, reweighting and local blend."""

    mode: str
    mapper: torch.Tensor
    refine: torch.Tensor
    reweight: torch.Tensor
    cross_steps: list[bool]
    self_steps: list[bool]
    blend_tokens: torch.Tensor | None  # (2, L): the blend words' tokens in the source and target prompts
    blend_size: int
    blend_threshold: float = BLEND_THRESHOLD
    map_sum: torch.Tensor | None = None
    _controls: dict[int, StepControl] = field(default_factory=dict, init=False, repr=False, compare=False)

    def step(self, index: int) -> StepControl:
        """The control of step `index`: one object per step for the whole edit (a device holds one copy of it)."""
        if index not in self._controls:
            self._controls[index] = self._make_step(index)
        return self._controls[index]

    def _make_step(self, index: int) -> StepControl:
        length = self.mapper.shape[0]
        cross = torch.full((length,), 1.0 if self.cross_steps[index] else 0.0)
        return StepControl(
            cross_alpha=cross,
            refine=self.refine,
            mapper=self.mapper,
            reweight=self.reweight,
            self_replace=torch.tensor([1.0 if self.self_steps[index] else 0.0]),
            blend_queries=self.blend_size**2 if self.blend_tokens is not None else None,
            cross_active=self.cross_steps[index],
            self_active=self.self_steps[index],
        )

    def reads_source(self, index: int) -> bool:
        """Whether step `index` or a later one reads the source branch: attention control or local blend."""
        return self.blend_tokens is not None or any(self.cross_steps[index:]) or any(self.self_steps[index:])

    def add_maps(self, maps: Sequence[torch.Tensor]) -> None:
        """Accumulate one step's blend-resolution cross-attention maps, (2, Q, L) each."""
        if not maps:
            return
        step_sum = torch.stack([m.float() for m in maps]).sum(0)
        self.map_sum = step_sum if self.map_sum is None else self.map_sum + step_sum.to(self.map_sum.device)

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """Local blend of the two branches (source row 0, target row 1) from the maps so far."""
        if self.blend_tokens is None or self.map_sum is None:
            return x
        latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        if self.blend_tokens.device != self.map_sum.device:  # moved once per edit, not at every step
            self.blend_tokens = self.blend_tokens.to(self.map_sum.device)
        mask = blend_mask(
            self.map_sum, self.blend_tokens, size=self.blend_size, latent_hw=latent_hw, threshold=self.blend_threshold
        )
        return local_blend(x, mask.to(x.device, x.dtype))


@dataclass
class P2PBatch:
    """The plans of several P2P edits decoded as one batch: rows (source 1, target 1, source 2, target 2, ...).

    Each step stacks the plans' controls along a pair axis; the maps a step collects are split back per
    plan, and local blend runs per pair, so an edit's control never depends on the others in its batch.
    """

    plans: list[P2PPlan]
    _controls: dict[int, StepControl] = field(default_factory=dict, init=False, repr=False, compare=False)

    def step(self, index: int) -> StepControl:
        if len(self.plans) == 1:
            return self.plans[0].step(index)
        if index not in self._controls:
            self._controls[index] = stack_controls([plan.step(index) for plan in self.plans])
        return self._controls[index]

    def reads_source(self, index: int) -> bool:
        return any(plan.reads_source(index) for plan in self.plans)

    def add_maps(self, maps: Sequence[torch.Tensor]) -> None:
        """Accumulate one step's maps, (2P, Q, L) each, into each plan's (2, Q, L) share."""
        for pair, plan in enumerate(self.plans):
            plan.add_maps([m[2 * pair : 2 * pair + 2] for m in maps])

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.plans) == 1:
            return self.plans[0].blend(x)
        return torch.cat([plan.blend(x[2 * pair : 2 * pair + 2]) for pair, plan in enumerate(self.plans)])


def stack_controls(controls: list[StepControl]) -> StepControl:
    """One control for several pairs: each tensor stacked along a leading pair axis (see `edit_probabilities`).

    A layer runs explicitly when any pair needs it; pairs outside their steps get alpha 0 there, which
    leaves their target rows as they are.
    """
    blend = {c.blend_queries for c in controls if c.blend_queries is not None}
    if len(blend) > 1:
        raise ValueError(f"P2P edits of one batch must share a latent size (blend queries {sorted(blend)})")

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([getattr(c, name) for c in controls])

    return StepControl(
        cross_alpha=stacked("cross_alpha"),
        refine=stacked("refine"),
        mapper=stacked("mapper"),
        reweight=stacked("reweight"),
        self_replace=stacked("self_replace"),
        blend_queries=next(iter(blend), None),
        self_max_queries=controls[0].self_max_queries,
        cross_active=any(c.cross_active for c in controls),
        self_active=any(c.self_active for c in controls),
    )


def blend_mask(
    map_sum: torch.Tensor, tokens: torch.Tensor, *, size: int, latent_hw: tuple[int, int], threshold: float
) -> torch.Tensor:
    """(1, 1, H, W) 0/1 mask: where either branch attends to its blend words above `threshold`.

    Each branch's word maps are summed, max-pooled 3x3, resized to the latents, divided by their
    maximum and thresholded; the mask is the union of the two branches'.
    """
    maps = (map_sum.float() * tokens.to(map_sum.device)[:, None, :].float()).sum(-1)
    maps = maps.reshape(maps.shape[0], 1, size, size)
    maps = F.max_pool2d(maps, 3, stride=1, padding=1)
    maps = F.interpolate(maps, size=latent_hw)
    maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    return (maps > threshold).any(dim=0, keepdim=True).float()


def local_blend(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the target branch (row 1) equal to the source (row 0) outside `mask`."""
    source, target = x[0:1], x[1:2]
    return torch.cat([source, source + mask * (target - source)])


def blend_resolution(latent_side: int) -> int:
    """Side of the cross-attention maps local blend reads: latent / 4 (16 for SD1.5 at 512 px, as the release's
    16x16 maps), but not below 16 where the UNet has such maps: below 16 a map cannot outline a shape at P2P's
    threshold after its 3x3 max-pool (docs/default-model.md, "Why the maps are flat"). Always a side the UNet's
    attention runs at (the latent side halved 0-2 times): the smallest of those of at least that, else the latents'
    own (8x8 latents read 8; 16x16 read 16; 32 read 16; 48, whose quarter 12 is below 16, read 24)."""
    wanted = max(16, latent_side // 4)
    for halvings in (2, 1):
        side, rest = divmod(latent_side, 2**halvings)
        if rest == 0 and side >= wanted:
            return side
    return latent_side


def resolve_mode(settings: P2PSettings, source: str, target: str) -> str:
    equal = len(prompt_words(source)) == len(prompt_words(target))
    if settings.mode == REPLACE and not equal:
        raise P2PError(
            f"replace needs prompts with equal word counts ({len(prompt_words(source))} vs "
            f"{len(prompt_words(target))}): use --p2p-mode refine or auto"
        )
    if settings.mode == "auto":
        return REPLACE if equal else REFINE
    return settings.mode


def _blend_tokens(tokenizer: Any, source: str, target: str, settings: P2PSettings) -> torch.Tensor | None:
    """(2, L) the blend words' tokens in the source and target prompts, or None without local blend."""
    if not settings.blends:
        return None
    absent = [w for w in settings.blend if w not in prompt_words(source) and w not in prompt_words(target)]
    if absent:
        raise P2PError(f"--blend word {absent[0]!r} is in neither prompt ({source!r}, {target!r}); words match exactly")
    for flag, words, prompt in (
        ("--blend-src", settings.blend_source, source),
        ("--blend-tgt", settings.blend_target, target),
    ):
        missing = [w for w in words if w not in prompt_words(prompt)]
        if missing and settings.strict_blend:
            raise P2PError(
                f"{flag} word {missing[0]!r} is not a word of {prompt!r} (words match exactly: "
                f"{', '.join(prompt_words(prompt))})"
            )
        if missing:
            logging.getLogger("icd").warning(
                "local blend word %r is not a word of %r: it adds no region there", missing[0], prompt
            )
    tokens = torch.stack(
        [
            word_indicator(tokenizer, source, settings.blend + settings.blend_source),
            word_indicator(tokenizer, target, settings.blend + settings.blend_target),
        ]
    )
    if not tokens.any():
        logging.getLogger("icd").warning("local blend found none of its words: the edit keeps the source image")
    return tokens


def make_plan(
    tokenizer: Any, source: str, target: str, *, settings: P2PSettings, num_steps: int, latent_side: int
) -> P2PPlan:
    """The control of one P2P edit from `source` to `target` prompt over `num_steps` decoding steps.

    Args:
        tokenizer: The text encoder's tokenizer (its token positions index the attention maps).
        source: The source prompt.
        target: The target prompt.
        settings: The P2P settings (mode, replace fractions, blend words, reweighting).
        num_steps: The decoding steps the control spans.
        latent_side: The latent side the local blend's mask is sized from.
    """
    length = tokenizer.model_max_length
    mode = resolve_mode(settings, source, target)
    target_positions = word_token_positions(tokenizer, target)
    if mode == REPLACE:
        mapper = replacement_mapper(
            prompt_words(source),
            prompt_words(target),
            source_positions=word_token_positions(tokenizer, source),
            target_positions=target_positions,
            length=length,
            shift_tail=settings.replace_tail == RELEASE_TAIL,
        )
        refine = torch.ones(length)
    else:
        mapper, refine = refinement_mapper(
            prompt_token_ids(tokenizer, source), prompt_token_ids(tokenizer, target), length=length
        )
    return P2PPlan(
        mode=mode,
        mapper=mapper,
        refine=refine,
        reweight=reweight_vector(
            tokenizer,
            source,
            target,
            amplify=settings.amplify,
            amplify_new=settings.amplify_new,
            positions=target_positions,
        ),
        cross_steps=cross_replace_steps(num_steps, settings.cross_replace),
        self_steps=self_replace_steps(num_steps, settings.self_replace),
        blend_tokens=_blend_tokens(tokenizer, source, target, settings),
        blend_size=blend_resolution(latent_side),
        blend_threshold=settings.blend_threshold,
    )


# --- the attention processor ---------------------------------------------------------------------


def control_pairs(control: StepControl) -> int:
    """How many (source, target) pairs a control edits: its tensors carry a leading pair axis when more than one.

    No `int()`: while an export traces the P2P graph, the size stays a traced value, so the graph keeps a
    dynamic pair axis."""
    return 1 if control.mapper.ndim == 2 else control.mapper.shape[0]


def pair_rows(probs: torch.Tensor, pairs: int) -> torch.Tensor:
    """The last 2P rows of a batch: the P (source, target) pairs after real CFG's unconditional rows.

    Taken as the last of the batch's equal groups of 2P rows (a reshape, not a slice at B - 2P), so the
    shapes of an exported graph stay inferable for any number of pairs."""
    return probs.reshape(-1, 2 * pairs, *probs.shape[1:])[-1]


def edit_probabilities(probs: torch.Tensor, *, is_cross: bool, control: StepControl) -> torch.Tensor:
    """Rewrite each target row's attention probabilities from its source row's.

    `probs` is (B, heads, Q, K) whose last 2P rows are P (source, target) pairs, interleaved (real
    classifier-free guidance puts its unconditional rows first, B = 4P; P2P leaves them alone). The control's
    tensors are one pair's ((L,), (L, L), (1,)) or carry a leading pair axis ((P, L), (P, L, L), (P, 1)).
    """
    pairs = control_pairs(control)
    groups = probs.reshape(-1, pairs, 2, *probs.shape[1:])  # (B / 2P, P, 2, heads, Q, K)
    source, target = groups[-1, :, 0], groups[-1, :, 1]  # (P, heads, Q, K)

    def per_pair(tensor: torch.Tensor) -> torch.Tensor:  # (P, 1, 1, last) to broadcast over heads and queries
        return tensor.reshape(pairs, 1, 1, tensor.shape[-1])

    if is_cross:
        mapped = torch.einsum("phqk,pkl->phql", source, control.mapper.reshape(pairs, *control.mapper.shape[-2:]))
        refine = per_pair(control.refine)
        edited = (refine * mapped + (1 - refine) * target) * per_pair(control.reweight)
        alpha = per_pair(control.cross_alpha)
        new_target = alpha * edited + (1 - alpha) * target
    elif probs.shape[2] <= control.self_max_queries:
        flag = per_pair(control.self_replace)
        new_target = flag * source + (1 - flag) * target
    else:
        return probs
    rewritten = torch.stack([source, new_target], dim=1)  # (P, 2, heads, Q, K)
    return torch.cat([groups[:-1], rewritten[None]]).reshape(probs.shape)


def edited_values(
    target_values: torch.Tensor, *, is_cross: bool, control: StepControl
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target rows' values split by the probabilities they meet: `edit_probabilities`' new target row times
    `target_values` equals `source_probs @ via_source + target_probs @ via_target`.

    Every P2P edit is linear in the probabilities with weights per key token, so the weights can move onto the
    values (P, heads, K, d), which are far smaller than the probabilities (P, heads, Q, K). Cross-attention: the
    mapped source map reaches token l through `mapper` with weight alpha*refine*reweight, the target's own map with
    alpha*(1 - refine)*reweight + 1 - alpha. Self-attention: the flag's share goes through the source map."""
    pairs = control_pairs(control)
    if not is_cross:
        flag = control.self_replace.reshape(pairs, 1, 1, 1)
        return flag * target_values, (1 - flag) * target_values

    def per_key(tensor: torch.Tensor) -> torch.Tensor:  # (P, 1, K, 1): a weight per key token, over heads and d
        return tensor.reshape(pairs, 1, tensor.shape[-1], 1)

    alpha, refine, reweight = per_key(control.cross_alpha), per_key(control.refine), per_key(control.reweight)
    mapper = control.mapper.reshape(pairs, *control.mapper.shape[-2:])
    via_source = torch.einsum("pkl,phld->phkd", mapper, alpha * refine * reweight * target_values)
    return via_source, (alpha * (1 - refine) * reweight + (1 - alpha)) * target_values


def controlled_attention(
    probs: torch.Tensor, values: torch.Tensor, *, is_cross: bool, control: StepControl
) -> torch.Tensor:
    """`edit_probabilities(probs) @ values`, without building the edited probabilities.

    `probs` (B, heads, Q, K), `values` (B, heads, K, d) -> (B, heads, Q, d). Each row's probabilities are read
    once, by one batched matmul against its values widened to 2d: a source row's values beside its target's
    `via_source`, a target row's zeros beside its `via_target`; the target's output is the sum of the two right
    halves (see `edited_values`). Building the rewritten probabilities took several passes over the layer's largest
    tensors; with `attention_probabilities` this took the exported P2P graph from 1.76 to 1.63 ms per row at 64
    pairs on a 2-core CPU (the plain reverse UNet: 1.46), and it never copies SD1.5's (pairs, heads, 1024, 1024)."""
    if not is_cross and probs.shape[2] > control.self_max_queries:
        return probs @ values
    pairs = control_pairs(control)
    heads, queries, keys = probs.shape[1:]
    width = values.shape[-1]
    grouped = values.reshape(-1, pairs, 2, heads, keys, width)  # (B / 2P, P, 2, heads, K, d)
    source, target = grouped[-1, :, 0], grouped[-1, :, 1]
    via_source, via_target = edited_values(target, is_cross=is_cross, control=control)
    last = torch.stack([torch.cat([source, via_source], -1), torch.cat([torch.zeros_like(target), via_target], -1)], 1)
    widened = torch.cat([torch.cat([grouped[:-1], torch.zeros_like(grouped[:-1])], -1), last[None]])
    out = probs.reshape(-1, pairs, 2, heads, queries, keys) @ widened  # (B / 2P, P, 2, heads, Q, 2d)
    own, edited = out[..., :width], out[..., width:]
    last_out = torch.stack([own[-1, :, 0], edited[-1].sum(1)], 1)
    return torch.cat([own[:-1], last_out[None]]).reshape(-1, heads, queries, width)


def attention_probabilities(
    attn: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """diffusers' `Attention.get_attention_scores`, less its placeholder: without a mask it hands `baddbmm` an
    uninitialised tensor with beta=0, which an ONNX export turns into a tensor of the scores' size filled,
    multiplied by 0 and added, three passes over the layer's largest tensor on every call."""
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    if attention_mask is None:
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
    else:
        scores = torch.baddbmm(attention_mask, query, key.transpose(-1, -2), beta=1, alpha=attn.scale)
    if attn.upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(dtype)


def _touches(control: StepControl, is_cross: bool, queries: int) -> bool:
    """Whether this step rewrites (or records) the attention of a layer with `queries` queries."""
    if is_cross:
        return control.cross_active or control.blend_queries == queries
    return control.self_active and queries <= control.self_max_queries


class P2PAttnProcessor:
    """Attention with explicit probabilities that P2P can rewrite; without control it is SDPA.

    Registered on every attention layer through `install_p2p_processors`; the layer's position (cross or
    self) is known from its inputs. A UNet call passes `control` and a list `blend_maps` through
    `cross_attention_kwargs`; the cross-attention maps local blend reads (`control.blend_queries` queries,
    averaged over heads, the pairs' rows) are added to that list, which the caller owns and returns.
    """

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.fused = AttnProcessor2_0()

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        control: StepControl | None = None,
        blend_maps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        is_cross = encoder_hidden_states is not None
        queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        if control is None or not _touches(control, is_cross, queries):
            return self.fused(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        probs = attention_probabilities(attn, query, key, attention_mask)
        probs = probs.reshape(batch, attn.heads, *probs.shape[1:])
        if is_cross and control.blend_queries == queries and blend_maps is not None:
            # the maps of the edited rows, averaged over heads: the edit is linear, so edit the average
            averaged = edit_probabilities(probs.mean(1, keepdim=True), is_cross=True, control=control)
            blend_maps.append(pair_rows(averaged, control_pairs(control))[:, 0])
        values = value.reshape(batch, attn.heads, *value.shape[1:])
        hidden_states = controlled_attention(probs.to(value.dtype), values, is_cross=is_cross, control=control)
        hidden_states = hidden_states.reshape(batch * attn.heads, *hidden_states.shape[2:])
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_p2p_processors(unet: Any) -> None:
    """Give every attention layer of `unet` a `P2PAttnProcessor` (SDPA until a control is passed).

    Called by whoever runs attention control on `unet` (through `ControlledDenoiser.install_control`, or the
    exporter of the P2P graph); a controlled call never installs them itself."""
    if has_p2p_processors(unet):
        return
    unet.set_attn_processor({name: P2PAttnProcessor() for name in unet.attn_processors})
    unet._icd_p2p_installed = True


def has_p2p_processors(unet: Any) -> bool:
    return bool(getattr(unet, "_icd_p2p_installed", False))


# --- the sampler's view: a denoiser wrapper and a step hook ------------------------------------------------


class P2PDenoiser:
    """A P2P decode as a plain denoiser over the rows (source 1, target 1, source 2, ...), so the one sampler loop
    that runs every other decode runs it too (`icdcli.diffusion.sampler.p2p_decode`), with `after_step` as its step
    hook.

    Each step the plan says whether anything still reads the source rows. While it does, the wrapped network runs
    every row under the step's control and the maps it returns go to the plan; `after_step` then applies local
    blend. From the first step after which nothing reads them, the network runs the target rows alone, without
    control (each row depends only on itself then: half the rows), the source rows' noise prediction is left at 0
    and `after_step` keeps the source rows where they were, so the source rows returned stop at that step.

    Args:
        network: what runs the UNet, with or without control.
        plan: the attention control of the decode.
        timesteps: the timestep each step evaluates at, in order (they name the step a call belongs to).
    """

    def __init__(self, network: ControlledDenoiser, plan: ControlPlan, timesteps: Sequence[int]):
        self.network, self.plan = network, plan
        self.steps = {t: index for index, t in enumerate(timesteps)}
        if len(self.steps) != len(timesteps):
            raise ValueError(f"P2P steps need distinct timesteps, got {list(timesteps)}")

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning, guidance: Guidance = 1.0) -> torch.Tensor:
        index = self.steps[t]
        if self.plan.reads_source(index):
            step = self.network.controlled(x, t, cond, guidance, self.plan.step(index))
            self.plan.add_maps(step.maps)
            return step.eps
        targets = slice(1, None, 2)
        rows = row_guidance(guidance, x.shape[0])[targets] if isinstance(guidance, torch.Tensor) else guidance
        eps = self.network(x[targets], t, take_rows(cond, targets, x.shape[0]), rows)
        return torch.stack([torch.zeros_like(eps), eps], dim=1).reshape(x.shape)

    def after_step(self, index: int, before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        """The latents step `index + 1` starts from: local blend while the source rows are read, else the source
        rows as they were before the step and the target rows as it left them."""
        if self.plan.reads_source(index):
            return self.plan.blend(after)
        return torch.stack([before[0::2], after[1::2]], dim=1).reshape(after.shape)
