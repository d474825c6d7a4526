"""A minimal ICC v2 display profile (matrix and gamma curves), written byte for byte: real wide-gamut profiles
(Display P3, Adobe RGB) are not redistributable test data, and Pillow can only create sRGB, Lab and XYZ ones."""

from __future__ import annotations

import struct

# Display P3's primaries and white (D65), adapted to the ICC's D50 connection space (as Apple's profile gives them)
DISPLAY_P3_D50 = {
    "rXYZ": (0.5151, 0.2412, -0.0011),
    "gXYZ": (0.2919, 0.6922, 0.0419),
    "bXYZ": (0.1571, 0.0666, 0.7841),
}
D50 = (0.9642, 1.0, 0.8249)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(values: tuple[float, float, float]) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(_s15(v) for v in values)


def _gamma(gamma: float) -> bytes:
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)


def _description(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(8) + bytes(3) + bytes(67)


def matrix_profile(name: str, colorants: dict[str, tuple[float, float, float]], gamma: float) -> bytes:
    """An RGB display profile: `colorants` (rXYZ, gXYZ, bXYZ at D50) and one gamma curve for the three channels."""
    tags = [(b"desc", _description(name)), (b"wtpt", _xyz(D50))]
    tags += [(key.encode(), _xyz(value)) for key, value in colorants.items()]
    tags += [(key, _gamma(gamma)) for key in (b"rTRC", b"gTRC", b"bTRC")]
    offset = 128 + 4 + 12 * len(tags)
    table, data = [], b""
    for signature, body in tags:
        body += bytes(-len(body) % 4)
        table.append(signature + struct.pack(">II", offset + len(data), len(body)))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8 + 4) + b"".join(_s15(v) for v in D50) + bytes(4 + 16 + 28)
    )  # fmt: skip
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + b"".join(table) + data


def display_p3(gamma: float = 2.2) -> bytes:
    return matrix_profile("Display P3 (test)", DISPLAY_P3_D50, gamma)
