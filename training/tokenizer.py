"""A word-level tokenizer for small caption languages, saved and loaded like any HF tokenizer."""

from __future__ import annotations

from collections.abc import Iterable

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"


def build_word_tokenizer(words: Iterable[str], max_length: int = 16):
    """A `PreTrainedTokenizerFast` over `words`: lower-cased, split on whitespace and punctuation.

    Ids: 0 pad, 1 bos, 2 unk, 3 eos (not 2: CLIP text models read eos id 2 as
    "pool at the largest id"), then the words in sorted order. Sequences are wrapped in
    bos/eos and padded to `max_length`, as CLIP tokenizers are.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, UNK: 2, EOS: 3}
    for word in sorted({w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
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
