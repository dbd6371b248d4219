"""The manifest: one row per image-report pair, and its validation.

A manifest is a CSV or Parquet file. Image paths are relative to the manifest's folder.
Validation runs before any encoder loads and reports the first problem it finds as one
UserError naming the file, the column and the first offending rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError
from pipeline.keys import text_key

REQUIRED_COLUMNS = ("image_path", "report_text", "label", "patient_id")
OPTIONAL_COLUMNS = ("exam_id", "split", "site")
SPLITS = ("train", "val", "test", "external")
_ROWS_SHOWN = 5


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest with every column as text (ids like 007 stay intact)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    if path.suffix.lower() == ".parquet":
        return pd.read_parquet(path).astype("string").fillna("")
    if path.suffix.lower() != ".csv":
        raise UserError(f"manifest {path}: expected a .csv or .parquet file")
    return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")


def _first_rows(mask: pd.Series) -> str:
    # +2: one for the header line, one because people count rows from 1.
    rows = [str(index + 2) for index in mask[mask].index[:_ROWS_SHOWN]]
    more = "" if mask.sum() <= _ROWS_SHOWN else f" (and {int(mask.sum()) - _ROWS_SHOWN} more)"
    return ", ".join(rows) + more


def _fail(path: Path, column: str, mask: pd.Series, problem: str) -> None:
    if mask.any():
        raise UserError(
            f"manifest {path}, column '{column}': {problem} at line(s) {_first_rows(mask)}"
        )


def load_manifest(
    path: str | Path, classes: Sequence[str], check_images: bool = True
) -> pd.DataFrame:
    """Read and validate a manifest.

    Args:
        path: the CSV or Parquet file.
        classes: the allowed labels, negative class first.
        check_images: also check that every image file exists (extraction needs the
            images; training on cached features does not).

    Returns:
        The table with every optional column present: `exam_id` defaults to one exam per
        patient and report, `split` and `site` to "".

    Raises:
        UserError: a missing column, an empty value, an unknown label, a missing image,
            an unknown split name or a patient in two splits.
    """
    path = Path(path)
    table = read_table(path)
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise UserError(
            f"manifest {path}: missing column(s) {', '.join(missing)}; "
            f"required columns are {', '.join(REQUIRED_COLUMNS)}"
        )
    if table.empty:
        raise UserError(f"manifest {path} has no rows")
    for column in REQUIRED_COLUMNS:
        table[column] = table[column].astype(str)
        _fail(path, column, table[column].str.strip() == "", "empty value")
    unknown_label = ~table["label"].isin(list(classes))
    _fail(
        path,
        "label",
        unknown_label,
        f"label not among the configured classes {list(classes)}",
    )
    for column in OPTIONAL_COLUMNS:
        table[column] = table[column].astype(str).str.strip() if column in table else ""
    if (table["exam_id"] == "").any():
        # One report describes one examination, so patient + report identifies the exam.
        report_ids = table["report_text"].map(lambda text: text_key(text)[:12])
        default_exam = table["patient_id"] + "/" + report_ids
        table["exam_id"] = table["exam_id"].where(table["exam_id"] != "", default_exam)
    _fail(path, "split", ~table["split"].isin(("", *SPLITS)), f"split not one of {SPLITS}")
    _check_one_split_per_patient(path, table)
    if check_images:
        folder = path.parent
        absent = ~table["image_path"].map(lambda relative: (folder / relative).is_file())
        _fail(path, "image_path", absent, f"image file not found (paths are relative to {folder})")
    return table


def _check_one_split_per_patient(path: Path, table: pd.DataFrame) -> None:
    given = table[table["split"] != ""]
    splits_per_patient = given.groupby("patient_id")["split"].nunique()
    crossing = set(splits_per_patient[splits_per_patient > 1].index)
    _fail(
        path,
        "split",
        table["patient_id"].isin(crossing),
        "a patient appears in more than one split",
    )
    has_blank = table.groupby("patient_id")["split"].agg(lambda splits: (splits == "").any())
    has_given = table.groupby("patient_id")["split"].agg(lambda splits: (splits != "").any())
    half_given = has_blank & has_given
    _fail(
        path,
        "split",
        table["patient_id"].isin(set(half_given[half_given].index)),
        "a patient has some rows with a split and some without",
    )


def image_file(manifest_path: str | Path, relative_path: str) -> Path:
    """Where an image named in a manifest lives on disk."""
    return Path(manifest_path).parent / relative_path
