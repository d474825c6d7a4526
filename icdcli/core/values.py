"""The one check of every number icd takes, whatever gives it: a flag, a spec row or a recorded edit.

Each number has one range here. `check_number` returns the value as its kind or raises `NumberError`
with a message that names the number, its range and the value given; the command line's parameter type
(`icdcli.cli.options.NumberType`) is the same check, so a bad flag is a usage error. Every JSON icd prints goes
through `strict_json`: no NaN or Infinity, which JSON does not have.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from icdcli.core.errors import ICDUsageError

SEED_MAX = 2**63 - 1


class NumberError(ICDUsageError, ValueError):
    """A number that is not of its kind or out of its range; the message says which and what is allowed."""


@dataclass(frozen=True)
class Bounds:
    """The kind (float or int) and inclusive range of one number."""

    kind: type
    low: float
    high: float

    def describe(self) -> str:
        what = "a finite number" if self.kind is float else "an integer"
        return f"{what} from {_plain(self.low)} to {_plain(self.high)}"


def _plain(number: float) -> str:
    if number == SEED_MAX:
        return "2**63-1"
    return str(int(number)) if float(number).is_integer() else str(number)


NUMBERS: dict[str, Bounds] = {
    "guidance": Bounds(float, 0.0, 100.0),
    "tau": Bounds(float, 0.0, 1.0),
    "cross_replace": Bounds(float, 0.0, 1.0),
    "self_replace": Bounds(float, 0.0, 1.0),
    "blend_threshold": Bounds(float, 0.0, 1.0),
    "amplify": Bounds(float, 0.0, 100.0),
    "seed": Bounds(int, 0, SEED_MAX),
    "ddim_steps": Bounds(int, 1, 1000),
    "steps": Bounds(int, 1, 1000),
    "width": Bounds(int, 8, 16384),
    "height": Bounds(int, 8, 16384),
    "minutes": Bounds(float, 0.1, 10080.0),
    "edit_guidance": Bounds(float, 1.0, 100.0),
    "quality": Bounds(int, 1, 100),
}


def _as_int(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    text = str(value).strip().replace("_", "")
    if not text.isascii():  # Python reads other scripts' digits too; a number here is written in ASCII
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:  # "1e3", "7.0": integral values written as floats
        number = float(text)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() and abs(number) < 2**64 else None


def _as_float(value: Any) -> float | None:
    if isinstance(value, str) and not value.isascii():
        return None
    try:
        return float(value if isinstance(value, (int, float)) else str(value).strip())
    except (TypeError, ValueError, OverflowError):
        return None


def check_number(name: str, value: Any) -> int | float:
    """`value` (a number or its text) as the kind of number `name`, inside its range; NumberError otherwise."""
    bounds = NUMBERS[name]
    label = name.replace("_", "-")
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise NumberError(f"{label} must be {bounds.describe()}, not {value!r}")
    number = _as_int(value) if bounds.kind is int else _as_float(value)
    if number is None or (isinstance(number, float) and not math.isfinite(number)):
        raise NumberError(f"{label} must be {bounds.describe()}, not {_shown(value)}")
    if not bounds.low <= number <= bounds.high:
        raise NumberError(f"{label} must be {bounds.describe()}, not {_shown(value)}")
    return number


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float inside it (NaN, +-inf) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def strict_json(value: Any, **options: Any) -> str:
    """JSON text that any parser reads: non-finite floats become null."""
    return json.dumps(finite_or_none(value), allow_nan=False, **options)
