"""What machine a bench ran on, for its results."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from pipeline.hardware import bf16_units, cpu_bf16_is_fast

UNIT_NAMES = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16, no AMX"}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo and its bf16 matrix units: AMX (several times
    faster than AVX512-BF16 alone), AVX512-BF16, or none (bf16 emulated, far slower than
    float32); else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                unit = bf16_units()
                units = UNIT_NAMES[unit] if unit else "no bf16 units: bf16 emulated"
                return f"{line.split(':', 1)[1].strip()} ({units})"
    return platform.processor() or platform.machine()


def cpu_threads() -> int:
    """The hardware threads this process may run on (its affinity, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def timed_precisions() -> tuple[str, ...]:
    """The torch dtypes worth timing here: bfloat16 only on a CPU with bf16 units (emulated,
    it is hundreds of times slower than float32 and nothing runs in it there)."""
    return ("float32", "bfloat16") if cpu_bf16_is_fast() else ("float32",)
