"""Saved heads applied to new exams: `python -m fuse predict` on cached features, and
`python -m extract.predict` from one exam's image files and report to a decision."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_m4 import train_tiny_m4

from fuse import predict
from fuse.protocol import head_path
from fuse.schema import read_predictions

REPO = Path(__file__).parents[1]
HEAD_KINDS = ("head", "probe")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A small demo, its tiny-encoder features and an M4 protocol with saved heads."""
    folder = tmp_path_factory.mktemp("predict")
    run = train_tiny_m4(folder, 30, 8, trials=2, epochs=8, warmup_epochs=1)
    table = read_predictions(folder / "protocol", ("VCD", "GC"))
    return {**run, "table": table}


def cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *arguments], cwd=REPO, capture_output=True, text=True
    )


def rows_of(table: pd.DataFrame, kind: str, trial: int) -> pd.DataFrame:
    return table[(table["head"] == kind) & (table["trial"] == trial)].reset_index(drop=True)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_fuse_predict_reproduces_the_table_for_one_head_and_the_ensemble(trained, kind, capsys):
    head = head_path(trained["folder"] / "models", "M4", kind, 1, 0).with_suffix(".json")
    done = cli(
        "fuse", "predict", "--head", str(head), "--manifest", str(trained["manifest"]),
        "--features", *trained["features"], "--json", "true",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = rows_of(trained["table"], kind, 1)
    images = pd.DataFrame(result["images"])
    # every row, external ones with their site's stored centring
    np.testing.assert_allclose(images["prob_GC"], expected["prob_GC"], atol=1e-5)
    assert result["operating_point"]["threshold"] == pytest.approx(expected["threshold"][0])
    assert (
        images["decision"] == np.where(images["prob_GC"] >= expected["threshold"][0], "GC", "VCD")
    ).all()
    assert f"M4 {kind} (trial 1, fold 0)" == result["decided_by"]

    # In-process from here: the command line itself was tested above.
    result = predict.run(
        predict.PredictConfig(
            head=(str(head.parent),),
            kind=kind,
            manifest=str(trained["manifest"]),
            features=tuple(trained["features"]),
        )
    )
    assert result["decided_by"].startswith(f"ensemble of 2 M4 {kind}s")
    mean = (rows_of(trained["table"], kind, 0)["prob_GC"] + expected["prob_GC"]) / 2
    np.testing.assert_allclose(pd.DataFrame(result["images"])["prob_GC"], mean, atol=1e-5)
    exams = pd.DataFrame(result["exams"])
    assert len(exams) == trained["table"].groupby(["patient_id", "exam_id"]).ngroups
    printed = capsys.readouterr().out
    assert printed.startswith(f"decided by: ensemble of 2 M4 {kind}s")
    assert "per exam (mean of its images):" in printed


def test_one_exam_from_image_files_and_report_equals_the_table(trained):
    table = rows_of(trained["table"], "head", 0)
    exam = table[table["split"] == "external"].groupby(["patient_id", "exam_id"]).head(99)
    exam = exam[exam["exam_id"] == exam["exam_id"].iloc[0]]
    manifest = pd.read_csv(trained["manifest"], dtype=str, keep_default_na=False)
    report = manifest.loc[manifest["image_path"] == exam["image_path"].iloc[0], "report_text"]
    report_file = trained["folder"] / "report.txt"
    report_file.write_text(report.iloc[0], encoding="utf-8")
    images = [str(trained["manifest"].parent / path) for path in exam["image_path"]]
    head = head_path(trained["folder"] / "models", "M4", "head", 0, 0).with_suffix(".json")
    done = cli(
        "extract.predict", "--head", str(head), "--images", *images,
        "--report-file", str(report_file), "--site", exam["site"].iloc[0], "--json", "true",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    np.testing.assert_allclose(
        [image["prob_GC"] for image in result["images"]], exam["prob_GC"], atol=1e-4
    )
    (summary,) = result["exams"]
    assert summary["images"] == len(images)
    assert summary["prob_GC"] == pytest.approx(exam["prob_GC"].mean(), abs=1e-4)


def test_a_head_edited_to_other_weights_is_refused_in_one_line(trained, tmp_path):
    saved = head_path(trained["folder"] / "models", "M4", "probe", 0, 0)
    config = json.loads(saved.with_suffix(".json").read_text())
    config["sources"][1]["weights_fingerprint"] = "0" * 64
    edited = tmp_path / "edited"
    edited.with_suffix(".json").write_text(json.dumps(config))
    edited.with_suffix(".safetensors").write_bytes(saved.with_suffix(".safetensors").read_bytes())
    done = cli(
        "fuse", "predict", "--head", str(edited.with_suffix(".json")),
        "--manifest", str(trained["manifest"]), "--features", *trained["features"],
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: ") and "llama3" in line and "weights_fingerprint differ" in line
