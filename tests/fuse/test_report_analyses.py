"""The report on a hand-written protocol folder: trial counts from the table, damaged files."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from synthetic_predictions import head_rows, runs_record

from fuse import report
from fuse.analyses import ANALYSES
from fuse.schema import CURVES_FILE, PREDICTIONS_FILE, RUNS_FILE
from pipeline.errors import UserError


def _protocol_folder(folder, trials_of):
    rng = np.random.default_rng(0)
    splits = np.repeat(["train", "val", "test", "external"], [20, 20, 20, 20])
    patients = [f"P{i // 2}" for i in range(80)]
    labels = np.where(np.arange(80) // 2 % 2 == 1, "GC", "VCD")
    frames = [
        head_rows(
            model,
            trial,
            np.clip((labels == "GC") * 0.3 + rng.random(80) * 0.7, 0, 1),
            labels,
            splits,
            patients,
            head=head,
        )
        for model, trials in trials_of.items()
        for trial in range(trials)
        for head in ("head", "probe")
    ]
    folder.mkdir()
    pd.concat(frames, ignore_index=True).to_parquet(folder / PREDICTIONS_FILE)
    (folder / RUNS_FILE).write_text(json.dumps(runs_record(list(trials_of))))
    pd.DataFrame(
        [
            {"model": m, "trial": 0, "epoch": e, "train_loss": 1.0, "val_loss": 1.0, "val_auc": 0.5}
            for m in trials_of
            for e in (1, 2)
        ]
    ).to_csv(folder / CURVES_FILE, index=False)
    return folder


def test_each_model_says_its_own_number_of_trials(tmp_path):
    protocol = _protocol_folder(tmp_path / "p", {"M4": 2, "M1": 1})  # M1 lost a trial
    config = report.ReportConfig(
        protocol=str(protocol), out=str(tmp_path / "r"), bootstrap_resamples=20
    )
    report.run(config)
    text = (tmp_path / "r" / "tables.md").read_text()
    assert "trained heads: M4 2, M1 1" in text
    assert "nan" not in text.lower()
    table4 = text.split("## Table 4")[1].split("##")[0]
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in table4.splitlines()
        if line.startswith("| M")
    }
    assert rows["M4"][1] == "2" and rows["M1"][1] == "1"
    assert re.search(r"\d\.\d{3} \(–\)", rows["M1"][2])  # one trial: no SD
    # no modality conditions and no label-efficiency run in this table: those say why
    skipped = ("contribution", "text_vs_vision", "label_efficiency")
    ran = [name for name in ANALYSES if name not in skipped]
    assert f"Analyses run: {', '.join(ran)}." in text
    for name in ran:
        assert f"analyses/{name}_" in text, name
    for name in skipped:
        assert f"- {name}: Not run" in text, name


def test_a_damaged_predictions_table_is_one_user_error(tmp_path):
    protocol = _protocol_folder(tmp_path / "p", {"M4": 1})
    (protocol / PREDICTIONS_FILE).write_bytes(b"PAR1 truncated")
    config = report.ReportConfig(protocol=str(protocol), out=str(tmp_path / "r"))
    with pytest.raises(UserError, match="is not a readable Parquet file"):
        report.run(config)
    with pytest.raises(UserError, match="calibration 'bogus' is not one of"):
        report.run(
            report.ReportConfig(
                protocol=str(protocol), out=str(tmp_path / "r"), calibration="bogus"
            )
        )


def test_report_help_lists_the_analysis_settings():
    shown = subprocess.run(
        [sys.executable, "-m", "fuse", "report", "--help"],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
    )
    assert shown.returncode == 0, shown.stderr
    for flag in ("--target-sensitivity", "--calibration", "--decision-thresholds"):
        assert flag in shown.stdout
