"""Benchmarks run in their --smoke mode: they must work, whatever the numbers on this machine."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

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


def test_dvc_repro_bench_smoke_times_the_demo_stage_and_names_the_cpu():
    result = subprocess.run(
        [
            sys.executable,
            "bench/dvc_repro.py",
            "--smoke",
            "--set",
            "demo.images_per_report=4",
            "--keep",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kept = Path(re.search(r"^kept (.+)$", result.stdout, re.MULTILINE).group(1))
    try:
        # the stage ran on the copy's params.yaml: the smoke demo's size, the --set on top
        ran = yaml.safe_load((kept / "vlmf" / "data" / "demo" / "demo_config.yaml").read_text())
    finally:
        shutil.rmtree(kept)
    assert (ran["patients"], ran["external_patients"], ran["images_per_report"]) == (8, 2, 4)
    lines = result.stdout.strip().splitlines()
    assert any(re.fullmatch(r"\[ *\d+\.\d s\] Running stage 'demo':", line) for line in lines)
    assert any(re.fullmatch(r"stage demo: \d+\.\d s", line) for line in lines)
    assert re.search(r"^cpu: .+, \d+ threads, python ", result.stdout, re.MULTILINE)
    assert re.fullmatch(r"total: \d+\.\d s \(dvc repro; 1 stage\(s\) ran\)", lines[-1])


def test_trials_together_bench_smoke_compares_one_trial_with_stacked_trials():
    result = subprocess.run(
        [sys.executable, "bench/trials_together.py", "--smoke"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"cpu: .+, 1 thread, precision (bf16|fp32)", lines[0])
    assert re.fullmatch(r"fuse train_head: \d+\.\d\d ms per step .+", lines[1])
    assert re.fullmatch(r"plain PyTorch, 1 trial: \d+\.\d\d ms per step", lines[2])
    assert re.fullmatch(
        r"plain PyTorch, 5 trials stacked: \d+\.\d\d ms per step of one trial", lines[3]
    )
    assert re.fullmatch(
        r"training the trials together (pays|does not pay): \d+\.\d\dx .+", lines[4]
    )
