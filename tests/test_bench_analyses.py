"""The analyses bench in its --smoke mode: every analysis timed, the CPU named, a verdict."""

import re
import subprocess
import sys
from pathlib import Path

from fuse.analyses import ANALYSES

REPO = Path(__file__).parents[1]


def test_analyses_bench_smoke_times_evaluate_and_every_analysis():
    result = subprocess.run(
        [sys.executable, "bench/analyses.py", "--smoke"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("cpu: ") and len(line) > len("cpu: , python ") for line in lines)
    steps = ("protocol_conditions_per_head", "protocol_attributions_per_head")
    for step in ("evaluate", *ANALYSES, *steps):
        assert any(re.fullmatch(rf"{step}: \d+\.\d s", line) for line in lines), step
    assert re.search(r"every step under 60 s: yes$", lines[-1])
