"""The one check of every piece of text icd takes, whatever gives it: a flag, a spec row, a `--jobs -` line or
a recorded edit.

Each kind of text has one bound here (`TEXTS`), documented in the README ("Limits"):

- prompts (`--src`, `--tgt`, `--prompt`, generate's PROMPT, a row's `src`/`tgt`): at most 1,000 characters. The
  text encoders read 77 tokens (SD) or fewer (the embedded model: 16), about 300 characters of English; a longer
  prompt changes nothing in the image but is stored twice in every output (its `icd` record and `parameters`).
- words (`--blend`, `--blend-src`, `--blend-tgt`, `--amplify WORD=`, a row's `blended_word`): 200 characters.
- paths (IMAGE, `-o`, `--spec`, `--from`, a row's `image`/`output`): 4,096 characters, the longest path Linux
  takes.
- a `--jobs -` line, and a spec row: 64 KiB (`LINE_BYTES`).

Prompts and words hold no control characters (U+0000-U+001F, U+007F-U+009F: NUL, tab, newline, escape ...): PNG
text chunks cannot hold NUL, and a newline would end the prompt's line of the `parameters` chunk that image
browsers read. Paths hold no NUL, which no file system takes.

`check_text` returns the text or raises `TextError` (a ValueError) with a one-line message naming the field, the
rule and what to do. No click here: the command line turns the error into its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

LINE_BYTES = 64 * 1024  # a --jobs - line or a spec row: far more than any row's fields allowed below


class TextError(ValueError):
    """A piece of text that is too long or holds characters it may not; the message says which rule."""


@dataclass(frozen=True)
class TextRule:
    """The longest a kind of text may be (in characters), and whether control characters are refused."""

    limit: int
    controls: bool  # True: any control character is refused; False: only NUL (paths)
    what: str


TEXTS: dict[str, TextRule] = {
    "prompt": TextRule(1000, True, "a prompt"),
    "word": TextRule(200, True, "a word"),
    "name": TextRule(200, True, "a model name"),
    "path": TextRule(4096, False, "a path"),
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMES = {"\x00": "NUL", "\t": "a tab", "\n": "a newline", "\r": "a carriage return", "\x1b": "an escape"}


def _control_name(character: str) -> str:
    return _NAMES.get(character, f"control character U+{ord(character):04X}")


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(kind: str, value: Any, label: str) -> Any:
    """`value` when it keeps the rule of `kind` (None and non-text values pass: their own checks say what they
    are); TextError naming `label` (the flag or field) otherwise."""
    if not isinstance(value, str):
        return value
    rule = TEXTS[kind]
    if len(value) > rule.limit:
        raise TextError(
            f"{label} is {len(value):,} characters long; {rule.what} may have at most {rule.limit:,} (icd's text "
            f"limits{'; the text encoder reads about 77 tokens' if kind == 'prompt' else ''}): shorten it"
        )
    found = _CONTROL.search(value) if rule.controls else ("\x00" if "\x00" in value else None)
    if found is not None:
        character = found if isinstance(found, str) else found.group()
        if rule.controls:
            raise TextError(
                f"{label} holds {_control_name(character)}; {rule.what} may hold no control characters "
                "(U+0000-U+001F, U+007F-U+009F), which PNG text chunks and image browsers cannot keep: remove it"
            )
        raise TextError(f"{label} holds a NUL character, which no path can: remove it")
    surrogate = _SURROGATE.search(value) if rule.controls else None
    if surrogate is not None:  # bytes that were not UTF-8 (a shell's other encoding), or half of a UTF-16 pair
        raise TextError(
            f"{label} holds U+{ord(surrogate.group()):04X}, which is not a character: bytes that are not UTF-8 text, "
            "or half of a UTF-16 pair; give it as UTF-8 text"
        )
    return value


def check_texts(kind: str, values: Any, label: str) -> Any:
    """`check_text` over each of several values (a tuple of --blend words, say)."""
    for value in values or ():
        check_text(kind, value, label)
    return values


def shown(value: str, limit: int = 40) -> str:
    """A piece of text short enough for a one-line message (its start, then an ellipsis)."""
    return value if len(value) <= limit else value[: limit - 3] + "..."
