"""Small CLIP-like tokenizers, saved and loaded like any HF tokenizer: a word-level one for caption
languages, and a sub-word one for testing token mappings offline."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"


def build_word_tokenizer(words: Iterable[str], max_length: int = 16):
    """A `PreTrainedTokenizerFast` over `words`: lower-cased, split on whitespace and punctuation.

    Ids: 0 pad, 1 bos, 2 unk, 3 eos (not 2: CLIP text models read eos id 2 as
    "pool at the largest id"), then the words in sorted order. Sequences are wrapped in
    bos/eos and padded to `max_length`, as CLIP tokenizers are.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {PAD: 0, BOS: 1, UNK: 2, EOS: 3}
    for word in sorted({w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    return clip_like(Tokenizer(WordLevel(vocab, unk_token=UNK)), vocab, max_length=max_length)


def clip_like(backend: Any, vocab: dict[str, int], *, max_length: int) -> Any:
    """Wrap a `tokenizers` model as CLIP's tokenizers behave: lower-cased, words split on whitespace and
    punctuation, begin/end-of-text around each sequence, padding to `max_length`."""
    from tokenizers import normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )


def build_subword_tokenizer(words: Iterable[str], splits: dict[str, list[str]], *, max_length: int = 77):
    """A CLIP-like byte-pair tokenizer where each of `words` is one token and each word of `splits`
    is cut into the given pieces (`{"dalmatian": ["dal", "mat", "ian"]}`).

    CLIP's own vocabulary cannot be shipped or downloaded here; this one has the same mechanics
    (lower-casing, words split on whitespace and punctuation, `</w>` ending each word's last piece,
    begin/end-of-text around the sequence), so sub-word token mappings can be tested offline.
    """
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import BPE

    suffix = "</w>"
    vocab = {PAD: 0, BOS: 1, UNK: 2, EOS: 3}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    def build(piece: str, last: bool) -> None:
        symbols = list(piece[:-1]) + [piece[-1] + suffix] if last else list(piece)
        for symbol in symbols:
            add(symbol)
        current = symbols[0]
        for symbol in symbols[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            add(current)

    pieces = {word.lower(): [word.lower()] for word in words}
    pieces.update({word.lower(): [p.lower() for p in parts] for word, parts in splits.items()})
    for word, parts in pieces.items():
        if "".join(parts) != word:
            raise ValueError(f"the pieces {parts} do not spell {word!r}")
        for index, part in enumerate(parts):
            build(part, index == len(parts) - 1)
    backend = Tokenizer(BPE(vocab, merges, unk_token=UNK, end_of_word_suffix=suffix))
    backend.decoder = decoders.BPEDecoder(suffix=suffix)
    tokenizer = clip_like(backend, vocab, max_length=max_length)
    for word, parts in pieces.items():
        got = tokenizer.tokenize(word)
        if len(got) != len(parts):
            raise ValueError(f"{word!r} tokenizes as {got}, not as the {len(parts)} pieces asked for")
    return tokenizer
