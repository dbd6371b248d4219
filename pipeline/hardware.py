"""What this CPU multiplies fast: bfloat16 only where it has bf16 matrix units.

On x86, bfloat16 matrix products run in hardware with AVX512-BF16 or AMX; without them
PyTorch emulates them, and on a 2-core AVX2 machine a bf16 matrix product ran at 0.26
GFLOP/s against 52 in float32 (README, "Defaults, and why"). Choosing bfloat16 by default
everywhere would make such a machine two orders of magnitude slower, so defaults that
say "auto" ask here.
"""

from __future__ import annotations

import functools
from pathlib import Path

BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags, fastest first


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of this machine's first CPU (Linux /proc/cpuinfo; else empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return frozenset()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def bf16_units() -> str | None:
    """The CPU's bf16 matrix unit (amx_bf16 or avx512_bf16), or None: bf16 is emulated."""
    flags = cpu_flags()
    return next((unit for unit in BF16_UNITS if unit in flags), None)


def cpu_bf16_is_fast() -> bool:
    """Whether bfloat16 matrix products beat float32 on this CPU: an x86 CPU with bf16
    units. Where that cannot be read (no /proc/cpuinfo), float32, which is never the
    emulated slow path."""
    return bf16_units() is not None
