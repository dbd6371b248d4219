"""Several processes for real: `accelerate launch` with two CPU processes splits the
batches, each process writes its own parts, and the file equals a one-process run's."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.store import read_features
from extract.run import ExtractConfig, run
from pipeline.fault_hook import ENVIRONMENT_VARIABLE

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES = 4  # unique images of the manifest; batch size 1: four batches, two per process


@pytest.fixture
def manifest(small_table: pd.DataFrame, write_manifest: Callable[[pd.DataFrame], Path]) -> Path:
    return write_manifest(small_table.iloc[:5])


def _free_port() -> int:
    # Not accelerate's default 29500: other test runs on this machine may be using it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(
    launcher: list[str], manifest: Path, out: Path, kill_at: str = ""
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), "-m", "extract"]
    command += ["--model", "blip2-qformer", "--weights", "tiny", "--device", "cpu"]
    command += ["--manifest", str(manifest), "--out", str(out), "--batch-size", "1"]
    command += ["--num-workers", "0"]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), ENVIRONMENT_VARIABLE: kill_at}
    return subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


def _reference(manifest: Path, out: Path) -> ExtractConfig:
    return ExtractConfig(
        model="blip2-qformer",
        manifest=str(manifest),
        out=str(out),
        device="cpu",
        batch_size=1,
        num_workers=0,
    )


TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2"]


def test_two_processes_split_the_work_and_write_the_one_process_file(
    manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "two.h5"
    finished = _launch(TWO_CPU_PROCESSES, manifest, out)
    assert finished.returncode == 0, finished.stderr
    features = read_features(out)
    assert features.provenance["run"]["num_processes"] == 2
    assert features.provenance["run"]["encoded_per_process"] == [2, 2]
    assert "encoded 4 (2 + 2 by 2 process(es))" in finished.stdout

    single = read_features(run(_reference(manifest, tmp_path / "one.h5")))
    assert single.provenance["run"]["encoded_per_process"] == [IMAGES]
    assert features.keys == single.keys
    np.testing.assert_array_equal(features.vectors, single.vectors)
    assert features.sources == single.sources
    differs = {"created_utc", "run", "extract_config"}
    assert {k: v for k, v in features.provenance.items() if k not in differs} == {
        k: v for k, v in single.provenance.items() if k not in differs
    }
    assert sorted(path.name for path in tmp_path.glob("two.h5*")) == ["two.h5"]


def test_two_processes_resume_from_their_parts(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "two.h5"
    # Each process is killed writing its second part: one part each survives.
    killed = _launch(TWO_CPU_PROCESSES, manifest, out, kill_at="part-write:2")
    assert killed.returncode != 0
    assert len(list((tmp_path / "two.h5.parts").glob("*.h5"))) == 2

    finished = _launch(TWO_CPU_PROCESSES, manifest, out)
    assert finished.returncode == 0, finished.stderr
    record = read_features(out).provenance["run"]
    assert (record["encoded_per_process"], record["reused_from_parts"]) == ([1, 1], 2)


def test_accelerate_s_cpu_launcher_asked_for_two_processes_is_refused(
    manifest: Path, tmp_path: Path
) -> None:
    # accelerate launch --cpu starts one process whatever --num_processes says.
    finished = _launch(["--cpu", "--num_processes", "2"], manifest, tmp_path / "f.h5")
    assert finished.returncode != 0
    assert "error: accelerate launch --cpu starts one process" in finished.stderr
    assert "--multi_gpu --num_processes N" in finished.stderr
    assert not (tmp_path / "f.h5").exists()
