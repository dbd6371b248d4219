"""The whole pipeline as a new user runs it: `dvc repro`, on a small demo."""

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fuse.schema import read_predictions

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
    params["fuse"].update({"epochs": 3, "warmup_epochs": 1, "trials": 2})
    params["fuse_report"].update({"bootstrap_resamples": 100})
    params["label_efficiency"].update(
        {"epochs": 3, "warmup_epochs": 1, "trials": 2, "label_fractions": [0.25, 1.0]}
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)

    result = subprocess.run(["dvc", "repro"], cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for stage in stages:
        assert f"Running stage '{stage}'" in result.stdout
    reports = tmp_path / "reports"
    manifest = pd.read_csv(tmp_path / "data" / "demo" / "manifest.csv", dtype=str)
    predictions = read_predictions(reports / "protocol", ("VCD", "GC"))
    models = params["fuse"]["models"]
    assert len(models) == 11  # M1-M4, the five baselines, M4-clinical and M4-exam
    assert len(predictions) == len(manifest) * len(models) * 2 * 2  # models x heads x trials
    for model in models:
        metrics = json.loads((reports / "metrics" / f"{model}.json").read_text())
        assert 0.0 <= metrics["test_auc"] <= 1.0 and 0.0 <= metrics["external_auc"] <= 1.0
    assert "Table 4" in (reports / "tables.md").read_text()
    for plot in ("roc_internal.png", "roc_external.png", "training_curves.png"):
        assert (reports / plot).is_file()
    for table in (
        "levels_summary",
        "comparisons_auc",
        "calibration_ece",
        "operating_points_points",
        "contribution_leaning",
        "contribution_occlusion",
        "text_vs_vision_contradicting_report",
        "text_vs_vision_missing_report",
        "label_efficiency_curve",
    ):
        assert (reports / "analyses" / f"{table}.csv").is_file(), table
    assert (reports / "plots" / "label_efficiency_curve.png").is_file()
    for figure in ("calibration_reliability", "decision_curve", "contribution", "text_vs_vision"):
        for split in ("test", "external"):
            assert (reports / "plots" / f"{figure}_{split}.png").is_file(), (figure, split)
    explained = json.loads((reports / "explain" / "explain.json").read_text(encoding="utf-8"))
    assert explained["gallery"] and [row["set"] for row in explained["pointing_game"]] == [
        "test",
        "external",
    ]
    assert 'data-headline="M4/test/image/auc"' in (reports / "index.html").read_text()
    shown = subprocess.run(["dvc", "metrics", "show"], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0 and "M4.json" in shown.stdout, shown.stdout + shown.stderr
    again = subprocess.run(["dvc", "repro"], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "Running stage" not in again.stdout  # all cached
