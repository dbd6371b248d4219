"""The whole pipeline as a new user runs it: `dvc repro`, on a small demo."""

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).parents[1]
SMALL_DEMO = {"patients": 40, "external_patients": 8, "images_per_report": 3}


@pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is installed by the [dev] extra")
def test_dvc_repro_runs_every_stage_and_writes_metrics(tmp_path):
    for item in ("pipeline", "cache", "extract", "fuse", "dvc.yaml"):
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / item)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["demo"].update(SMALL_DEMO)
    params["fuse"].update({"epochs": 3, "warmup_epochs": 1})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)

    result = subprocess.run(["dvc", "repro"], cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    for stage in ("demo", "extract_image", "extract_text", "fuse"):
        assert f"Running stage '{stage}'" in result.stdout
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    manifest = pd.read_csv(tmp_path / "data" / "demo" / "manifest.csv", dtype=str)
    for variant in ("fusion", "image", "report"):
        assert 0.0 <= metrics[variant]["test"]["auc"] <= 1.0
        assert metrics[variant]["external"]["n"] == (manifest["split"] == "external").sum()
    assert (tmp_path / "reports" / "roc.png").is_file()
    again = subprocess.run(["dvc", "repro"], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "Running stage" not in again.stdout  # all cached
