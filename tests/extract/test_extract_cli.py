"""The real `python -m extract` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cache.store import read_features
from extract.__main__ import main
from extract.registry import available_encoders

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_encoders_options_and_examples(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in available_encoders())
    for text in ("--weights", "tiny", "hub", "FOLDER", "--num-workers", "accelerate launch"):
        assert text in help_text


def test_python_dash_m_extract_writes_the_feature_file(
    small_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "features" / "image.h5"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "extract", "--model", "blip2-qformer", "--weights", "tiny"]
    command += ["--manifest", str(small_manifest), "--out", str(out), "--num-workers", "2"]
    finished = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert "wrote 4 image vectors" in finished.stdout
    assert read_features(out).vectors.shape[0] == 4
    assert not out.with_name(out.name + ".partial").exists()
