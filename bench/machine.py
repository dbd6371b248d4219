"""What machine a bench ran on, for its results."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo and whether it has AMX (bf16 matrix products
    several times faster than AVX512-BF16 alone), else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        info = cpuinfo.read_text()
        for line in info.splitlines():
            if line.startswith("model name"):
                amx = "with" if "amx_bf16" in info else "without"
                return f"{line.split(':', 1)[1].strip()} ({amx} AMX)"
    return platform.processor() or platform.machine()


def cpu_threads() -> int:
    """The hardware threads this process may run on (its affinity, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
