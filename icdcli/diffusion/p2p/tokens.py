"""Words and tokens: a prompt's words, their token positions, and the token mappers of replace and refine.

The token mapping follows the release's P2P controller: words are the prompt's whitespace-separated
words, matched exactly (case and punctuation count); refine aligns the two token sequences globally
and maps the target's padding position for position; replace maps changed words by their token
blocks. The one deliberate difference is the tail of a replace edit (see `replacement_mapper`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from icdcli.diffusion.recipe import P2PError

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
    measurement behind that choice. Edits reach the release's rule through
    `icdcli.diffusion.recipe.P2PSettings.replace_tail`.
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
