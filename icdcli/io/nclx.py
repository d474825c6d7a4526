"""Photos whose colour space is stated by code points (an `nclx` colour box, ITU-T H.273) rather than an ICC profile:
HEIF photos of many phones. pillow-heif reads the box into `info["nclx_profile"]` with the primaries' chromaticities;
the pixels are converted to sRGB here (the models were trained on sRGB): the stated transfer undone, the primaries
mapped through CIE XYZ (Bradford adaptation where the white points differ), clipped to the sRGB gamut, sRGB's transfer
applied. Photos in BT.709/sRGB primaries are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Chromaticities = tuple[float, float, float, float, float, float, float, float]
"""x, y of red, green, blue and white."""

SRGB_PRIMARIES: Chromaticities = (0.64, 0.33, 0.30, 0.60, 0.15, 0.06, 0.3127, 0.3290)
SAME_AS_SRGB = frozenset({1, 2})
"""H.273 colour primaries used as they are: BT.709 (sRGB's) and unspecified."""
HDR_TRANSFERS = {16: "PQ", 18: "HLG"}

_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])


def _srgb_decode(values: np.ndarray) -> np.ndarray:
    return np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)


def _srgb_encode(values: np.ndarray) -> np.ndarray:
    return np.where(values <= 0.0031308, values * 12.92, 1.055 * np.power(values, 1 / 2.4) - 0.055)


def _power(gamma: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda values: np.power(values, gamma)


TRANSFER_DECODERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    13: _srgb_decode,  # sRGB (IEC 61966-2-1), what phones write
    1: _power(2.4), 6: _power(2.4), 14: _power(2.4), 15: _power(2.4),  # BT.709 family, as displays show it (BT.1886)
    4: _power(2.2), 5: _power(2.8), 8: lambda values: values, 2: _srgb_decode,  # 2: unspecified
}  # fmt: skip
"""H.273 transfer characteristics -> encoded [0, 1] to linear light."""


def rgb_to_xyz(primaries: Chromaticities) -> np.ndarray:
    """The 3x3 matrix from linear RGB in `primaries` to CIE XYZ (white at Y = 1)."""
    xr, yr, xg, yg, xb, yb, xw, yw = primaries
    columns = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in ((xr, yr), (xg, yg), (xb, yb))]).T
    white = np.array([xw / yw, 1.0, (1 - xw - yw) / yw])
    return columns * np.linalg.solve(columns, white)


def _white_xyz(x: float, y: float) -> np.ndarray:
    return np.array([x / y, 1.0, (1 - x - y) / y])


def adaptation(source_white: tuple[float, float], target_white: tuple[float, float]) -> np.ndarray:
    """Bradford chromatic adaptation (XYZ to XYZ) from one white point to another."""
    cone_source = _BRADFORD @ _white_xyz(*source_white)
    cone_target = _BRADFORD @ _white_xyz(*target_white)
    return np.linalg.inv(_BRADFORD) @ np.diag(cone_target / cone_source) @ _BRADFORD


def to_srgb_matrix(primaries: Chromaticities) -> np.ndarray:
    """Linear RGB in `primaries` -> linear sRGB."""
    adapt = adaptation(primaries[6:8], SRGB_PRIMARIES[6:8])
    return np.linalg.inv(rgb_to_xyz(SRGB_PRIMARIES)) @ adapt @ rgb_to_xyz(primaries)


def chromaticities(nclx: dict[str, Any]) -> Chromaticities | None:
    """The primaries' and white's chromaticities pillow-heif read with the box, or None when they are missing."""
    keys = [f"color_primary_{name}_{axis}" for name in ("red", "green", "blue", "white") for axis in "xy"]
    values = [nclx.get(key) for key in keys]
    if any(not isinstance(value, (int, float)) for value in values):
        return None
    xr, yr, xg, yg, xb, yb, xw, yw = (float(value) for value in values)  # type: ignore[arg-type]
    return (xr, yr, xg, yg, xb, yb, xw, yw) if min(yr, yg, yb, yw) > 0 else None


def nclx_problem(nclx: dict[str, Any]) -> str | None:
    """Why pixels under this box cannot be converted (then they are taken as sRGB), or None."""
    transfer = nclx.get("transfer_characteristics")
    if transfer in HDR_TRANSFERS:
        return f"an HDR ({HDR_TRANSFERS[transfer]}) photo, which icd does not tone-map; save an SDR copy to edit it"
    if transfer not in TRANSFER_DECODERS:
        return f"transfer characteristics {transfer} are not known to icd"
    if chromaticities(nclx) is None:
        return "its colour primaries' chromaticities are missing"
    return None


def needs_conversion(nclx: dict[str, Any]) -> bool:
    """Whether the box states primaries other than sRGB's."""
    return nclx.get("color_primaries") not in SAME_AS_SRGB


def nclx_to_srgb(rgb: np.ndarray, nclx: dict[str, Any]) -> np.ndarray:
    """8-bit RGB pixels (H x W x 3) encoded as `nclx` states -> 8-bit sRGB (out-of-gamut colours clipped). The box
    must have no `nclx_problem`."""
    primaries = chromaticities(nclx)
    assert primaries is not None and nclx_problem(nclx) is None, "a box that cannot be converted"
    linear = TRANSFER_DECODERS[nclx["transfer_characteristics"]](rgb.astype(np.float64) / 255.0)
    mapped = np.clip(linear @ to_srgb_matrix(primaries).T, 0.0, 1.0)
    return np.clip(np.rint(_srgb_encode(mapped) * 255.0), 0, 255).astype(np.uint8)
