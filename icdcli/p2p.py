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

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SELF_REPLACE_MAX_QUERIES = 32 * 32
BLEND_THRESHOLD = 0.3
REPLACE, REFINE = "replace", "refine"


class P2PError(ValueError):
    """A Prompt-to-Prompt request that cannot be carried out as asked (the message says why)."""


@dataclass(frozen=True)
class P2PSettings:
    """What the user asks of a P2P edit.

    `cross_replace` and `self_replace` are fractions of the decoding steps; `blend` are words whose
    region may change (looked up in both prompts); `amplify` multiplies the target's attention to
    words. `mode` is `auto` (replace when the prompts have equal word counts, else refine),
    `replace` or `refine`.
    """

    cross_replace: float = 0.8
    self_replace: float = 0.4
    blend: tuple[str, ...] = ()
    amplify: tuple[tuple[str, float], ...] = ()
    mode: str = "auto"
    blend_threshold: float = BLEND_THRESHOLD

    def __post_init__(self) -> None:
        for name in ("cross_replace", "self_replace"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise P2PError(f"{name.replace('_', '-')} must be a fraction of the steps in [0, 1], got {value}")
        if self.mode not in ("auto", REPLACE, REFINE):
            raise P2PError(f"P2P mode must be auto, replace or refine, got {self.mode!r}")


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


def prompt_words(prompt: str) -> list[str]:
    return prompt.split()


def _word_key(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower())


def word_token_spans(tokenizer: Any, prompt: str) -> list[tuple[int, int]]:
    """Token positions [start, end) of each word of `prompt` in its padded token sequence.

    Words are the prompt split on whitespace, each tokenized alone; the sequence starts with one
    begin-of-text token, as CLIP tokenizers write it. Words past the tokenizer's length get empty spans.
    """
    length = tokenizer.model_max_length
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
    start = 1 if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id else 0
    spans = []
    for word in prompt_words(prompt):
        count = len(tokenizer(word, add_special_tokens=False).input_ids)
        end = min(start + count, length - 1)
        spans.append((min(start, end), end))
        start += count
    return spans


def _tail(spans: list[tuple[int, int]]) -> int:
    """First position after the words: end-of-text, then padding."""
    return spans[-1][1] if spans else 1


def replacement_mapper(
    source_spans: list[tuple[int, int]], target_spans: list[tuple[int, int]], length: int
) -> torch.Tensor:
    """(length, length) matrix M with target map = source map @ M, word for word.

    Equal token counts map token to token; a word of n source tokens onto m target tokens gives
    each target token the mean of the source word's tokens. Begin-of-text and the tail (end-of-text,
    padding) map position to position.
    """
    if len(source_spans) != len(target_spans):
        raise P2PError(
            f"replace needs prompts with equal word counts ({len(source_spans)} vs {len(target_spans)}): use refine"
        )
    mapper = torch.zeros(length, length)
    mapper[0, 0] = 1.0
    for (a, b), (c, d) in zip(source_spans, target_spans, strict=True):
        if b > a and d > c:
            mapper[a:b, c:d] = 1.0 / (b - a)
    source_tail, target_tail = _tail(source_spans), _tail(target_spans)
    for offset in range(length - max(source_tail, target_tail)):
        mapper[source_tail + offset, target_tail + offset] = 1.0
    return mapper


def align_tokens(source: Sequence[int], target: Sequence[int]) -> list[int]:
    """For each target position, the source position aligned to it, or -1 for an inserted token.

    Global (Needleman-Wunsch) alignment scoring a match 1, a mismatch -1 and a gap 0, as P2P's
    refinement does; ties prefer the diagonal, so equal sequences align position to position.
    """
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(diagonal, score[i - 1][j], score[i][j - 1])
    aligned = [-1] * m
    i, j = n, m
    while i > 0 and j > 0:
        match = 1 if source[i - 1] == target[j - 1] else -1
        if score[i][j] == score[i - 1][j - 1] + match and match == 1:
            aligned[j - 1] = i - 1
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1
        else:  # a mismatch on the diagonal: the target token is new
            i, j = i - 1, j - 1
    return aligned


def refinement_mapper(
    source_ids: Sequence[int], target_ids: Sequence[int], length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper, alphas) for refine: aligned target tokens take their source token's map (alpha 1),
    tokens new in the target keep their own (alpha 0). `*_ids` are the token sequences up to and
    including end-of-text; the padding after them maps position to position.
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
    for offset in range(length - max(len(source_ids), len(target_ids))):
        mapper[len(source_ids) + offset, len(target_ids) + offset] = 1.0
    return mapper, alphas


def _find_word(spans: list[tuple[int, int]], words: list[str], word: str) -> list[int]:
    key = _word_key(word)
    return [p for (a, b), w in zip(spans, words, strict=True) if _word_key(w) == key for p in range(a, b)]


def token_indicator(tokenizer: Any, prompt: str, words: Sequence[str]) -> torch.Tensor:
    """(length,) 1 at the tokens of `words` in `prompt`, 0 elsewhere."""
    spans, found = word_token_spans(tokenizer, prompt), torch.zeros(tokenizer.model_max_length)
    for word in words:
        for position in _find_word(spans, prompt_words(prompt), word):
            found[position] = 1.0
    return found


def reweight_vector(tokenizer: Any, prompt: str, amplify: Sequence[tuple[str, float]]) -> torch.Tensor:
    """(length,) attention multipliers of the target prompt's tokens: 1, or the word's factor."""
    spans, weights = word_token_spans(tokenizer, prompt), torch.ones(tokenizer.model_max_length)
    for word, factor in amplify:
        positions = _find_word(spans, prompt_words(prompt), word)
        if not positions:
            raise P2PError(f"--amplify word {word!r} is not in the target prompt {prompt!r}")
        weights[positions] = factor
    return weights


# --- the per-edit plan and the per-step control --------------------------------------------------


@dataclass
class StepControl:
    """What the attention processors read at one step (tensors: they are graph inputs when exported).

    `cross_alpha` (L,): weight of the edited cross-attention map per target token (0 outside the
    cross-replace steps); `refine` (L,): 1 where the target token has a source token; `mapper`
    (L, L); `reweight` (L,); `self_replace` (1,): 1 within the self-replace steps. Cross-attention
    maps of `blend_queries` queries are averaged over heads and appended to `maps`.

    `cross_active` and `self_active` say (in Python, for PyTorch) whether the step edits cross- or
    self-attention at all; layers a step leaves alone then keep the fused SDPA kernel. An exported
    graph cannot branch on them: it leaves both True and computes every touched layer explicitly,
    which gives the same result with the flags' tensors at 0.
    """

    cross_alpha: torch.Tensor
    refine: torch.Tensor
    mapper: torch.Tensor
    reweight: torch.Tensor
    self_replace: torch.Tensor
    blend_queries: int | None = None
    self_max_queries: int = SELF_REPLACE_MAX_QUERIES
    maps: list[torch.Tensor] = field(default_factory=list)
    cross_active: bool = True
    self_active: bool = True

    def to(self, device: torch.device | str, dtype: torch.dtype) -> StepControl:
        moved = {
            name: getattr(self, name).to(device, dtype)
            for name in ("cross_alpha", "refine", "mapper", "reweight", "self_replace")
        }
        return StepControl(
            **moved,
            blend_queries=self.blend_queries,
            self_max_queries=self.self_max_queries,
            maps=self.maps,
            cross_active=self.cross_active,
            self_active=self.self_active,
        )


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

    def step(self, index: int) -> StepControl:
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

    def add_maps(self, maps: list[torch.Tensor]) -> None:
        """Accumulate one step's blend-resolution cross-attention maps, (2, Q, L) each."""
        if not maps:
            return
        step_sum = torch.stack([m.float() for m in maps]).sum(0)
        self.map_sum = step_sum if self.map_sum is None else self.map_sum + step_sum.to(self.map_sum.device)

    def blend(self, x: torch.Tensor) -> torch.Tensor:
        """Local blend of the two branches (source row 0, target row 1) from the maps so far."""
        if self.blend_tokens is None or self.map_sum is None:
            return x
        mask = blend_mask(self.map_sum, self.blend_tokens, self.blend_size, tuple(x.shape[-2:]), self.blend_threshold)
        return local_blend(x, mask.to(x.device, x.dtype))


def blend_mask(
    map_sum: torch.Tensor, tokens: torch.Tensor, size: int, latent_hw: tuple[int, int], threshold: float
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
    """Side of the cross-attention maps local blend reads: 16 for SD1.5 at 512 px (latent / 4),
    never below 8 (small models) nor above the latents."""
    return min(latent_side, max(8, latent_side // 4))


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


def make_plan(
    tokenizer: Any, source: str, target: str, settings: P2PSettings, num_steps: int, latent_side: int
) -> P2PPlan:
    """The control of one P2P edit from `source` to `target` prompt over `num_steps` decoding steps."""
    length = tokenizer.model_max_length
    mode = resolve_mode(settings, source, target)
    source_spans, target_spans = word_token_spans(tokenizer, source), word_token_spans(tokenizer, target)
    if mode == REPLACE:
        mapper, refine = replacement_mapper(source_spans, target_spans, length), torch.ones(length)
    else:
        source_ids, target_ids = (tokenizer(p, max_length=length, truncation=True).input_ids for p in (source, target))
        mapper, refine = refinement_mapper(source_ids, target_ids, length)
    blend_tokens = None
    if settings.blend:
        absent = [
            w
            for w in settings.blend
            if not token_indicator(tokenizer, source, [w]).any() and not token_indicator(tokenizer, target, [w]).any()
        ]
        if absent:
            raise P2PError(f"--blend word {absent[0]!r} is in neither prompt ({source!r}, {target!r})")
        blend_tokens = torch.stack(
            [token_indicator(tokenizer, source, settings.blend), token_indicator(tokenizer, target, settings.blend)]
        )
    return P2PPlan(
        mode=mode,
        mapper=mapper,
        refine=refine,
        reweight=reweight_vector(tokenizer, target, settings.amplify),
        cross_steps=cross_replace_steps(num_steps, settings.cross_replace),
        self_steps=self_replace_steps(num_steps, settings.self_replace),
        blend_tokens=blend_tokens,
        blend_size=blend_resolution(latent_side),
        blend_threshold=settings.blend_threshold,
    )


# --- the attention processor ---------------------------------------------------------------------


def edit_probabilities(probs: torch.Tensor, is_cross: bool, control: StepControl) -> torch.Tensor:
    """Rewrite the target row's attention probabilities from the source row's.

    `probs` is (B, heads, Q, K) with the source branch in row B-2 and the target in row B-1 (real
    classifier-free guidance puts its unconditional rows first; P2P leaves them alone).
    """
    source, target = probs[-2], probs[-1]
    if is_cross:
        mapped = torch.einsum("hqk,kl->hql", source, control.mapper)
        edited = (control.refine * mapped + (1 - control.refine) * target) * control.reweight
        new_target = control.cross_alpha * edited + (1 - control.cross_alpha) * target
    elif probs.shape[2] <= control.self_max_queries:
        new_target = control.self_replace * source + (1 - control.self_replace) * target
    else:
        return probs
    return torch.cat([probs[:-1], new_target[None]])


def _touches(control: StepControl, is_cross: bool, queries: int) -> bool:
    """Whether this step rewrites (or records) the attention of a layer with `queries` queries."""
    if is_cross:
        return control.cross_active or control.blend_queries == queries
    return control.self_active and queries <= control.self_max_queries


class P2PAttnProcessor:
    """Attention with explicit probabilities that P2P can rewrite; without control it is SDPA.

    Registered on every attention layer P2P touches through `set_attn_processor`; the layer's
    position (cross or self) is known from its inputs.
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
        probs = attn.get_attention_scores(query, key, attention_mask)
        probs = probs.reshape(batch, attn.heads, *probs.shape[1:])
        probs = edit_probabilities(probs, is_cross, control)
        if is_cross and control.blend_queries == queries:
            control.maps.append(probs[-2:].mean(1))
        hidden_states = torch.bmm(probs.reshape(batch * attn.heads, *probs.shape[2:]).to(value.dtype), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_p2p_processors(unet: Any) -> None:
    """Give every attention layer of `unet` a `P2PAttnProcessor` (SDPA until a control is passed)."""
    if getattr(unet, "_icd_p2p_installed", False):
        return
    unet.set_attn_processor({name: P2PAttnProcessor() for name in unet.attn_processors})
    unet._icd_p2p_installed = True
