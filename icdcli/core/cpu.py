"""What the CPU can run, read from the operating system without importing any engine."""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""Linux's names for the instructions CPU engines run bf16 matrix work with (OpenVINO's CPU plugin lists BF16 then)."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The first processor's flags, or None where the system does not say (not Linux)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return None


def cpu_has_bf16(flags: frozenset[str] | None = None) -> bool | None:
    """Whether the CPU has bf16 matrix instructions; None where its flags cannot be read."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else bool(flags & BF16_FLAGS)
