"""What a model's tokenizer makes of a prompt: a prompt none of whose words it knows guides nothing."""

from __future__ import annotations

from typing import Any


def known_tokens(tokenizer: Any, prompt: str) -> int:
    """How many tokens of `prompt` the tokenizer knows (special tokens and the unknown token not counted)."""
    ids = tokenizer(prompt, truncation=True).input_ids
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    unknown = getattr(tokenizer, "unk_token_id", None)
    return sum(1 for token in ids if token not in special and token != unknown)


def unknown_prompt_note(model: Any, prompt: str, flag: str) -> str | None:
    """A note when the model knows none of the prompt's words (emoji, another script, punctuation only)."""
    tokenizers = getattr(model, "tokenizers", None) or []
    if not tokenizers or not prompt.strip():
        return None
    try:
        known = known_tokens(tokenizers[0], prompt)
    except Exception:  # a tokenizer that cannot say: no note
        return None
    if known:
        return None
    shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
    return (
        f"{flag} {shown!r}: the model knows none of its words (all are unknown tokens), so it guides nothing; "
        "write it in words of the model's language"
    )
