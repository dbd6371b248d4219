import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.errors import UserError
from pipeline.manifest import load_manifest

CLASSES = ("VCD", "GC")


def write_manifest(folder: Path, rows: list[dict], images: bool = True) -> Path:
    if images:
        (folder / "images").mkdir(exist_ok=True)
        for row in rows:
            if "image_path" in row:
                (folder / row["image_path"]).write_bytes(b"png")
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def good_rows() -> list[dict]:
    return [
        {
            "image_path": f"images/{i}.png",
            "report_text": f"报告{i // 2}",
            "label": "GC",
            "patient_id": f"00{i // 2}",
        }
        for i in range(4)
    ]


def test_valid_manifest_gets_default_columns(tmp_path):
    table = load_manifest(write_manifest(tmp_path, good_rows()), CLASSES)
    assert list(table["patient_id"]) == ["000", "000", "001", "001"]  # ids stay text
    assert (table["split"] == "").all() and (table["site"] == "").all()
    # one exam per patient and report
    assert table["exam_id"].nunique() == 2
    assert table.loc[0, "exam_id"] == table.loc[1, "exam_id"]


def test_missing_column_names_it(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "label"} for row in good_rows()]
    with pytest.raises(UserError, match=r"missing column\(s\) label"):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_empty_report_names_column_and_line(tmp_path):
    rows = good_rows()
    rows[2]["report_text"] = "  "
    with pytest.raises(UserError, match=r"column 'report_text': empty value at line\(s\) 4$"):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_missing_image_is_reported_unless_images_are_not_needed(tmp_path):
    path = write_manifest(tmp_path, good_rows())
    (tmp_path / "images" / "3.png").unlink()
    with pytest.raises(UserError, match=r"'image_path': image file not found.* line\(s\) 5"):
        load_manifest(path, CLASSES)
    assert len(load_manifest(path, CLASSES, check_images=False)) == 4


def test_unknown_label(tmp_path):
    rows = good_rows()
    rows[0]["label"] = "cancer"
    with pytest.raises(UserError, match="'label': label not among the configured classes"):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_patient_in_two_splits(tmp_path):
    rows = good_rows()
    for row, split in zip(rows, ["train", "test", "val", "val"], strict=True):
        row["split"] = split
    with pytest.raises(UserError, match="more than one split at line"):
        load_manifest(write_manifest(tmp_path, rows), CLASSES)


def test_parquet_manifest(tmp_path):
    csv = write_manifest(tmp_path, good_rows())
    parquet = tmp_path / "manifest.parquet"
    pd.read_csv(csv, dtype=str).to_parquet(parquet)
    assert len(load_manifest(parquet, CLASSES)) == 4


def test_user_error_exits_2_with_one_line(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "patient_id"} for row in good_rows()]
    path = write_manifest(tmp_path, rows)
    code = (
        "from pipeline.errors import exit_on_user_error\n"
        "from pipeline.manifest import load_manifest\n"
        f"exit_on_user_error(lambda: load_manifest({str(path)!r}, ('VCD', 'GC')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: manifest {path}: missing column(s) patient_id; "
        "required columns are image_path, report_text, label, patient_id"
    ]
