"""The protocol spread over two CPU processes (torchrun) writes what one process writes."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from fuse.processes import Processes
from fuse.schema import PREDICTIONS_FILE, RUNS_FILE

REPO = Path(__file__).parents[2]


def _protocol(launcher: list[str], files: dict[str, Path], out: Path) -> None:
    command = [
        *launcher,
        "-m",
        "fuse",
        "protocol",
        "--manifest",
        str(files["manifest"]),
        "--features",
        str(files["image"]),
        str(files["text"]),
        "--models",
        "M4",
        "M1",
        "M2",
        "--trials",
        "3",
        "--epochs",
        "4",
        "--learning-rates",
        "1e-3",
        "3e-3",
        "--out",
        str(out / "protocol"),
        "--heads",
        str(out / "models"),
    ]
    # One thread each way: the two runs then do the same arithmetic in the same order.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_write_the_table_one_process_writes(synthetic_cache, tmp_path):
    _protocol([sys.executable], synthetic_cache, tmp_path / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    _protocol([*torchrun, "--nproc-per-node", "2"], synthetic_cache, tmp_path / "two")

    one, two = (tmp_path / name / "protocol" for name in ("one", "two"))
    pd.testing.assert_frame_equal(
        pd.read_parquet(one / PREDICTIONS_FILE), pd.read_parquet(two / PREDICTIONS_FILE)
    )
    runs_one, runs_two = (json.loads((folder / RUNS_FILE).read_text()) for folder in (one, two))
    for runs in (runs_one, runs_two):
        for record in runs["runs"]:
            record.pop("seconds")
    assert runs_one["runs"] == runs_two["runs"] and len(runs_one["runs"]) == 3 * 3 * 2
    assert runs_one["learning_rate_search"] == runs_two["learning_rate_search"]
    assert set(runs_one["learning_rate_search"]) == {"M4", "M1", "M2"}
    assert (one / "training_curves.csv").read_text() == (two / "training_curves.csv").read_text()
    saved_one = sorted((tmp_path / "one" / "models").rglob("*.safetensors"))
    saved_two = sorted((tmp_path / "two" / "models").rglob("*.safetensors"))
    assert [path.name for path in saved_one] == [path.name for path in saved_two]
    assert len(saved_one) == 3 * 2  # M4's head and probe of every trial
    for first, second in zip(saved_one, saved_two, strict=True):
        # safetensors writes its metadata in hash-map order, so compare what it holds
        tensors_one, tensors_two = load_file(first), load_file(second)
        assert list(tensors_one) == list(tensors_two)
        for name, tensor in tensors_one.items():
            assert torch.equal(tensor, tensors_two[name]), (first.name, name)
        assert first.with_suffix(".json").read_text() == second.with_suffix(".json").read_text()


def test_one_process_takes_every_job_in_order_and_counts_them():
    progress = tqdm(total=5, file=io.StringIO())
    assert list(Processes().claim(list("abcde"), progress)) == list(enumerate("abcde"))
    assert progress.n == 5
