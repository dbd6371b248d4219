"""Benchmarks run in their --smoke mode: they must work, whatever the numbers on this machine."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_fuse_cpu_bench_smoke_prints_timings_floor_protocol_and_ratio():
    result = subprocess.run(
        [sys.executable, "bench/fuse_cpu.py", "--smoke"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("reference loop") for line in lines)
    assert any(line.startswith("fuse (") for line in lines)
    assert any(line.startswith("floor:") for line in lines)
    protocol = next(line for line in lines if line.startswith("whole protocol"))
    assert re.search(r"heads \d+ s, probes \d+ s\).*its peak RSS \d+\.\d+ GB$", protocol)
    assert any(line.startswith("peak RSS") for line in lines)
    assert re.search(r"ratio: \d+(\.\d+)?$", lines[-1])
