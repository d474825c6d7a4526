"""The fields `icd serve` takes, checked by the one validation icd has for every number and text (the checks of
flags and spec rows): an API request is refused for exactly what a spec row or a flag would be refused for, with
the same message.

No web framework here: `ApiError` carries the HTTP status and the one-line message, `app.py` turns it into a
response. Field names are a spec row's (`src`, `tgt`, `guidance`, `tau`, `seed`, `blended_word`,
`replace_tail`) and, for what a row has no column for, the `icd edit` flag's with underscores (`method`,
`unguided_prompt`, `cross_replace`, `self_replace`, `p2p_mode`, `blend`, `blend_src`, `blend_tgt`,
`blend_threshold`, `blend_keep`, `amplify`, `amplify_new`, and `mask`: the region that may change, an image as
base64, as `--mask` takes it).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import parts

INVERT_FIELDS = ("image", "src", "seed")
"""`POST /invert`: the photo (a multipart file, or base64 in JSON), the source prompt and the seed of the noise
added before inversion (optional: the model's recipe)."""
EDIT_FIELDS = (
    "inversion", "tgt", "method", "guidance", "tau", "unguided_prompt", "cross_replace", "self_replace", "p2p_mode",
    "blend", "blend_src", "blend_tgt", "blended_word", "blend_threshold", "amplify", "amplify_new", "replace_tail",
    "blend_keep", "mask",
)  # fmt: skip
"""`POST /edit`: an inversion id and the target prompt (both required), and the decode's settings (each optional:
the model's recipe; no mask: the whole photo may change)."""
METHOD_CHOICES = ("auto", *parts.METHODS)
UNGUIDED_CHOICES = ("source", "target")


class ApiError(Exception):
    """A request that cannot be served: its HTTP status and a one-line message that says what to do."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class InvertFields:
    """A checked `POST /invert` (the image travels beside it)."""

    src: str
    seed: int | None = None


@dataclass(frozen=True)
class EditFields:
    """A checked `POST /edit`: None (and method `auto`) leave a value to the model's recipe."""

    inversion: str
    tgt: str
    method: str = "auto"
    guidance: float | None = None
    tau: float | None = None
    unguided: str = "source"
    p2p: Any = field(default_factory=lambda: parts.P2POptions())
    mask: bytes | None = field(default=None, repr=False)
    """The mask image's bytes (read where the edit runs); None: the whole photo may change."""

    def pipeline_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `ICDEditPipeline.edit` after the inversion and target prompt."""
        return {"method": self.method, "guidance": self.guidance, "tau": self.tau, "p2p": self.p2p,
                "unguided": self.unguided}  # fmt: skip


def check_known(given: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """422 naming the fields `where` does not take, and those it does."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        names = ", ".join(repr(shown(name)) for name in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise ApiError(422, f"{where}: unknown field{plural} {names}; fields: {', '.join(allowed)}")


def shown(value: str) -> str:
    """A value short enough for a one-line message."""
    return value if len(value) <= 40 else value[:37] + "..."


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def number(value: Any, name: str, label: str | None = None) -> Any:
    """A field's number checked as the flag of the number `name` (`icdcli.values`); None when it is blank."""
    if _blank(value):
        return None
    try:
        return parts.check_number(name, value)
    except parts.NumberError as error:
        prefix = f"{label}: " if label and label != name else ""
        raise ApiError(422, f"{prefix}{error}") from None


def text(value: Any, label: str, kind: str = "prompt") -> str | None:
    """A field's text held to the bound of its `kind` (`icdcli.texts`); None when it is absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(422, f"{label} must be text, not {shown(repr(value))}")
    try:
        return parts.check_text(kind, value, label)
    except parts.TextError as error:
        raise ApiError(422, str(error)) from None


def choice(value: Any, label: str, choices: tuple[str, ...], default: str) -> str:
    if _blank(value):
        return default
    if value not in choices:
        raise ApiError(422, f"{label} must be {', '.join(choices[:-1])} or {choices[-1]}, not {shown(repr(value))}")
    return str(value)


def prompt(value: Any, label: str, what: str) -> str:
    """A required prompt: present, not blank, within the prompt bound."""
    checked = text(value, label)
    if checked is None or not checked.strip():
        raise ApiError(422, f"{label} is needed: {what}")
    return checked


def words(value: Any, label: str) -> tuple[str, ...]:
    """Words as text separated by spaces, or a list of such texts (as `--blend` values: each may hold several)."""
    if _blank(value):
        return ()
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise ApiError(422, f"{label} must be words: text or a list of texts, not {shown(repr(value))}")
    found: list[str] = []
    for item in values:
        checked = text(item, f"{label} word", "word")
        found.extend((checked or "").split())
    return tuple(found)


def amplify(value: Any) -> tuple[tuple[str, float], ...]:
    """`amplify`: {"WORD": FACTOR}, a list of "WORD=FACTOR", or such pairs separated by spaces (`--amplify`)."""
    if _blank(value):
        return ()
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        items = value.split() if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ApiError(422, "amplify must be {\"WORD\": FACTOR}, a list of \"WORD=FACTOR\" or such text, "
                                f"not {shown(repr(value))}")  # fmt: skip
        pairs = []
        for item in items:
            word, sep, factor = item.partition("=")
            if not sep or not word.strip():
                raise ApiError(422, f"amplify {shown(repr(item))}: write WORD=FACTOR, e.g. red=2")
            pairs.append((word, factor))
    checked = []
    for word, factor in pairs:
        if _blank(factor):
            raise ApiError(422, f"amplify {shown(repr(word))}: give a factor from 0 to 100, e.g. red=2")
        checked.append((text(str(word).strip(), "amplify word", "word") or "", float(number(factor, "amplify"))))
    return tuple(checked)


def invert_fields(given: Mapping[str, Any]) -> InvertFields:
    """The source prompt and seed of a `POST /invert` (the image is checked where it is read)."""
    check_known(given, INVERT_FIELDS, "/invert")
    src = prompt(given.get("src"), "src", "it describes the photo (the source prompt)")
    seed = number(given.get("seed"), "seed")
    return InvertFields(src, None if seed is None else int(seed))


def edit_fields(given: Mapping[str, Any]) -> EditFields:
    """The settings of a `POST /edit`, checked as `icd edit`'s flags and a spec row's cells are."""
    check_known(given, EDIT_FIELDS, "/edit")
    inversion = given.get("inversion")
    if _blank(inversion) or not isinstance(inversion, str):
        raise ApiError(422, "inversion is needed: the id POST /invert returned")
    tgt = prompt(given.get("tgt"), "tgt", "it describes the result (the target prompt)")
    blend_source, blend_target = words(given.get("blend_src"), "blend_src"), words(given.get("blend_tgt"), "blend_tgt")
    blended = text(given.get("blended_word"), "blended_word", "word")
    if blended is not None and blended.strip():
        pair = blended.split()
        if len(pair) != 2:
            raise ApiError(422, "blended_word must be two words, the source's and the target's")
        if blend_source or blend_target:
            raise ApiError(422, "give blended_word or blend_src/blend_tgt, not both")
        blend_source, blend_target = (pair[0],), (pair[1],)
    tail = given.get("replace_tail")
    try:
        replace_tail = "aligned" if _blank(tail) else parts.check_replace_tail(str(tail).strip())
    except ValueError as error:
        raise ApiError(422, str(error)) from None
    threshold = number(given.get("blend_threshold"), "blend_threshold")
    keep = choice(given.get("blend_keep"), "blend_keep", parts.BLEND_KEEPS, "source")
    p2p = parts.P2POptions(
        cross_replace=_float(number(given.get("cross_replace"), "cross_replace")),
        self_replace=_float(number(given.get("self_replace"), "self_replace")),
        mode=None if _blank(given.get("p2p_mode")) else choice(given["p2p_mode"], "p2p_mode", parts.P2P_MODES, ""),
        amplify_new=_float(number(given.get("amplify_new"), "amplify", "amplify_new")),
        amplify=amplify(given.get("amplify")),
        blend=words(given.get("blend"), "blend"),
        blend_source=blend_source,
        blend_target=blend_target,
        blend_threshold=parts.BLEND_THRESHOLD if threshold is None else float(threshold),
        replace_tail=replace_tail,
        blend_keep=keep,
    )
    mask = given.get("mask")
    region = "a PNG of the photo's shape, white where it may change"
    return EditFields(
        mask=None if _blank(mask) else base64_image(mask, "mask", region),
        inversion=inversion.strip(),
        tgt=tgt,
        method=choice(given.get("method"), "method", METHOD_CHOICES, "auto"),
        guidance=_float(number(given.get("guidance"), "guidance")),
        tau=_float(number(given.get("tau"), "tau")),
        unguided=choice(given.get("unguided_prompt"), "unguided_prompt", UNGUIDED_CHOICES, "source"),
        p2p=p2p,
    )


def base64_image(value: Any, name: str, what: str) -> bytes:
    """An image sent in JSON as base64 (a `data:` URL is fine); 422 when absent, 400 when it is not base64."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, f"{name} is needed: {what}, as base64 (a data: URL is fine)")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name}: not base64; send the file's bytes as base64") from None


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
