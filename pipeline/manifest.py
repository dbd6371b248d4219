"""The manifest: one row per image-report pair, and its validation.

A manifest is a CSV (UTF-8, comma-separated) or Parquet file. Image paths are relative to
the manifest's folder (or absolute) and must lie inside the image root: the manifest's
folder unless the caller names another. Validation runs before any encoder loads and
reports the first problem it finds as one UserError naming the file, the column and the
first offending rows.

Integrity rules: one image (by content when the images are checked, else by path) belongs
to one patient, so it cannot be in two splits; a patient has one label, unless labels are
per examination (`labels_per_exam`), when each exam has one.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError
from pipeline.identifiers import unify_identifiers
from pipeline.keys import file_key, text_key

REQUIRED_COLUMNS = ("image_path", "report_text", "label", "patient_id")
OPTIONAL_COLUMNS = ("exam_id", "split", "site")
SPLITS = ("train", "val", "test", "external")
# The file line each row starts on: a quoted report may span lines, so rows are not lines.
LINE_COLUMN = "manifest_line"
_ROWS_SHOWN = 5
# Separators spreadsheets write instead of commas (';' where the comma is the decimal mark).
_OTHER_DELIMITERS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest with every column as text (ids like 007 stay intact),
    each id in one spelling (pipeline.identifiers) and each row's file line in LINE_COLUMN."""
    table = _read_file(Path(path))
    unify_identifiers(table, table[LINE_COLUMN])
    return table


def _read_file(path: Path) -> pd.DataFrame:
    if path.is_dir():
        raise UserError(f"manifest {path} is a folder; give the manifest file in it")
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    if path.suffix.lower() == ".parquet":
        table = pd.read_parquet(path).astype("string").fillna("")
        table[LINE_COLUMN] = table.index + 2  # as a CSV's lines: the header is line 1
        return table
    if path.suffix.lower() != ".csv":
        raise UserError(f"manifest {path}: expected a .csv or .parquet file")
    data = path.read_bytes()
    if not data:
        raise UserError(f"manifest {path} is empty (0 bytes); expected a header line and rows")
    try:
        text = data.decode("utf-8")  # pandas drops the BOM of Excel's "CSV UTF-8"
    except UnicodeDecodeError as error:
        raise UserError(_not_utf8(path, data, error)) from None
    try:
        table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as error:
        detail = " ".join(str(error).split())  # pandas ends it with a newline
        raise UserError(f"manifest {path} is not a well-formed CSV file: {detail}") from None
    records = list(_records_with_lines(text))
    header = [name.lstrip("\ufeff") for name in records[0][1]] if records else []
    repeated = [name for name, count in Counter(header).items() if count > 1]
    if repeated:
        raise UserError(
            f"manifest {path}: column(s) {', '.join(map(repr, repeated))} appear more than "
            "once in the header (line 1); keep one of each"
        )
    lines = [line for line, _ in records[1:]]
    # pandas and the csv module agree on well-formed files; if not, rows it is
    table[LINE_COLUMN] = lines if len(lines) == len(table) else table.index + 2
    return table


def _records_with_lines(text: str):
    """(the line a CSV record starts on, its fields), blank lines left out as pandas does."""
    reader = csv.reader(io.StringIO(text))
    end = 0
    for record in reader:
        if record:
            yield end + 1, record
        end = reader.line_num


def _not_utf8(path: Path, data: bytes, error: UnicodeDecodeError) -> str:
    line = data[: error.start].count(b"\n") + 1
    decoded = data.decode("utf-8", errors="replace")  # one U+FFFD per bad sequence
    bad = decoded.count("\ufffd")
    good_non_ascii = sum(1 for char in decoded if ord(char) > 0x7F) - bad
    # A UTF-8 file with a damaged spot: re-encoding the whole of it from another encoding
    # would garble every other non-ASCII character (every Chinese report).
    if good_non_ascii > 10 * bad:
        return (
            f"manifest {path} is UTF-8 except for {bad} byte sequence(s) that are not "
            f"(first: byte 0x{data[error.start]:02x} at offset {error.start}, line {line}): "
            "retype the text there and save as UTF-8; do not convert the whole file (it "
            "would garble the rest)"
        )
    # Chinese Windows (and Excel there) saves GBK, where each Chinese character is two
    # bytes above 0x7f; Western text in Latin-1 has accented letters one byte at a time.
    non_ascii_runs = re.findall(rb"[\x80-\xff]+", data)
    encoding = "gb18030" if all(len(run) % 2 == 0 for run in non_ascii_runs) else "latin1"
    return (
        f"manifest {path} is not UTF-8 (byte 0x{data[error.start]:02x} at offset "
        f"{error.start}, line {line}); it reads as {encoding}: re-save it as UTF-8, e.g. "
        f"iconv -f {encoding} -t utf-8 {path} > manifest-utf8.csv"
    )


def _missing_columns(path: Path, table: pd.DataFrame, missing: list[str]) -> str:
    message = (
        f"manifest {path}: missing column(s) {', '.join(missing)}; "
        f"required columns are {', '.join(REQUIRED_COLUMNS)}"
    )
    if len(table.columns) == 1:
        header = str(table.columns[0])
        for delimiter, name in _OTHER_DELIMITERS.items():
            if delimiter in header:
                return (
                    f"{message}. Its header is one column, {header!r}: the columns look "
                    f"separated by {name}; save it comma-separated"
                )
    return message


def first_lines(mask: pd.Series, lines: pd.Series) -> str:
    """The file lines of the first rows where `mask` holds, and how many more there are.

    Args:
        mask: one bool per row of a manifest table.
        lines: that table's LINE_COLUMN.
    """
    rows = [str(lines[index]) for index in mask[mask].index[:_ROWS_SHOWN]]
    more = "" if mask.sum() <= _ROWS_SHOWN else f" (and {int(mask.sum()) - _ROWS_SHOWN} more)"
    return ", ".join(rows) + more


def refuse_rows(
    path: Path, table: pd.DataFrame, column: str, mask: pd.Series, problem: str
) -> None:
    """Raise a UserError naming `column`, `problem` and the lines of the rows in `mask`."""
    if mask.any():
        raise UserError(
            f"manifest {path}, column '{column}': {problem} at line(s) "
            f"{first_lines(mask, table[LINE_COLUMN])}"
        )


def load_manifest(
    path: str | Path,
    classes: Sequence[str],
    check_images: bool = True,
    image_root: str | Path | None = None,
    labels_per_exam: bool = False,
    allow_missing_images: bool = False,
    allow_empty_reports: bool = False,
    labels_required: bool = True,
) -> pd.DataFrame:
    """Read and validate a manifest.

    Args:
        path: the CSV or Parquet file.
        classes: the allowed labels, negative class first.
        check_images: also check that every image lies inside `image_root`, exists, and
            that no image content is under two patients (extraction reads the images;
            training on cached features does not, and then images are compared by path).
        image_root: the folder every image must lie in; None: the manifest's folder.
        labels_per_exam: a patient's exams may have different labels (say, a benign
            lesion at one visit and a carcinoma at the next); each exam still has one.
            Exams are told apart by `exam_id` (by default one per patient and report).
        allow_missing_images: with check_images, leave image files that do not exist to
            extraction's screening, which skips and records them, instead of refusing.
        allow_empty_reports: leave empty and whitespace-only reports to extraction's
            screening (which skips and records them) and to training (which leaves their
            pairs out) instead of refusing.
        labels_required: false for data to extract or to predict, whose labels may be
            unknown: the label column may be absent or blank (read as ""); a label that is
            given must still be one of `classes`.

    Returns:
        The table with every optional column present: `exam_id` defaults to one exam per
        patient and report, `split` and `site` to "".

    Raises:
        UserError: an empty, non-UTF-8 or malformed file, a missing column, an empty
            value, an unknown label, an image outside the image root or missing, an
            unknown split name, a patient in two splits, one image under two patients,
            or a patient (exam) with two labels.
    """
    path = Path(path)
    table = _read_file(path)
    if not labels_required and "label" not in table.columns:
        table["label"] = ""
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise UserError(_missing_columns(path, table.drop(columns=LINE_COLUMN), missing))
    if table.empty:
        raise UserError(f"manifest {path} has a header but no rows")
    notes = unify_identifiers(table, table[LINE_COLUMN])
    table, repeated = _without_repeated_rows(table)
    for note in [*notes, *repeated]:
        print(f"warning: manifest {path}, {note}", file=sys.stderr)
    for column in REQUIRED_COLUMNS:
        table[column] = table[column].astype(str)
        optional = (column == "report_text" and allow_empty_reports) or (
            column == "label" and not labels_required
        )
        if not optional:
            refuse_rows(path, table, column, table[column].str.strip() == "", "empty value")
    if not labels_required:
        table.loc[table["label"].str.strip() == "", "label"] = ""
    unknown_label = ~table["label"].isin([*classes, *([""] if not labels_required else [])])
    found = ", ".join(repr(label) for label in table.loc[unknown_label, "label"].unique()[:3])
    refuse_rows(
        path,
        table,
        "label",
        unknown_label,
        f"label {found} not among the configured classes {list(classes)}",
    )
    for column in OPTIONAL_COLUMNS:
        table[column] = table[column].astype(str).str.strip() if column in table else ""
    if (table["exam_id"] == "").any():
        # One report describes one examination, so patient + report identifies the exam.
        report_ids = table["report_text"].map(lambda text: text_key(text)[:12])
        default_exam = table["patient_id"] + "/" + report_ids
        table["exam_id"] = table["exam_id"].where(table["exam_id"] != "", default_exam)
    refuse_rows(
        path, table, "split", ~table["split"].isin(("", *SPLITS)), f"split not one of {SPLITS}"
    )
    _check_one_split_per_patient(path, table)
    # exam ids may be numbered per patient (1, 2, ...), so an exam is patient + exam id
    exams = table["patient_id"] + "/" + table["exam_id"]
    refuse_conflicts(path, table, "label", exams, "an exam has two labels")
    if not labels_per_exam:
        refuse_conflicts(
            path,
            table,
            "label",
            table["patient_id"],
            "a patient has two labels (if a patient's exams may differ, allow labels per exam)",
        )
    if check_images:
        root = _root(path, image_root)
        outside = ~table["image_path"].map(lambda image: _inside(_locate(path, image), root))
        refuse_rows(
            path,
            table,
            "image_path",
            outside,
            f"image outside the image root {root} (name a root that holds it)",
        )
        folder = path.parent
        absent = ~table["image_path"].map(lambda image: _locate(path, image).is_file())
        if not allow_missing_images:
            refuse_rows(
                path,
                table,
                "image_path",
                absent,
                f"image file not found (paths are relative to {folder})",
            )
        identity = table["image_path"].map(lambda image: _content(_locate(path, image)))
        what = "the same image content"
    else:
        identity, what = table["image_path"].map(os.path.normpath), "the same image path"
    # One image under two patients would let a test patient's image train the head.
    refuse_conflicts(path, table, "patient_id", identity, f"{what} is under two patients")
    return table


def _check_one_split_per_patient(path: Path, table: pd.DataFrame) -> None:
    given = table[table["split"] != ""]
    splits_per_patient = given.groupby("patient_id")["split"].nunique()
    crossing = set(splits_per_patient[splits_per_patient > 1].index)
    refuse_rows(
        path,
        table,
        "split",
        table["patient_id"].isin(crossing),
        "a patient appears in more than one split",
    )
    has_blank = table.groupby("patient_id")["split"].agg(lambda splits: (splits == "").any())
    has_given = table.groupby("patient_id")["split"].agg(lambda splits: (splits != "").any())
    half_given = has_blank & has_given
    refuse_rows(
        path,
        table,
        "split",
        table["patient_id"].isin(set(half_given[half_given].index)),
        "a patient has some rows with a split and some without",
    )


def refuse_conflicts(
    path: Path, table: pd.DataFrame, column: str, groups: pd.Series, problem: str
) -> None:
    """Raise naming the first two rows of the first group that holds two values of `column`."""
    values_per_group = table.groupby(groups)[column].nunique()
    conflicting = values_per_group[values_per_group > 1].index
    if conflicting.empty:
        return
    rows = table[groups == conflicting[0]]
    first = rows.index[0]
    second = rows.index[rows[column] != rows.loc[first, column]][0]

    def described(index: int) -> str:
        row = table.loc[index]
        split = f", split {row['split']}" if row["split"] else ""
        return f"line {row[LINE_COLUMN]} (patient {row['patient_id']}, label {row['label']}{split})"

    others = len(conflicting) - 1
    raise UserError(
        f"manifest {path}, column '{column}': {problem}: {described(first)} and "
        f"{described(second)}" + (f" ({others} more like it)" if others else "")
    )


def _without_repeated_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The table without rows that repeat an earlier row in every column (a pair counted
    twice would weigh twice in training and in every metric), and a note if there were."""
    repeated = table.drop(columns=LINE_COLUMN).duplicated()
    if not repeated.any():
        return table, []
    note = (
        f"{int(repeated.sum())} row(s) repeat an earlier row exactly, at line(s) "
        f"{first_lines(repeated, table[LINE_COLUMN])}: each pair is counted once"
    )
    return table[~repeated].reset_index(drop=True), [note]


def _content(image: Path) -> str:
    # Empty files all hash alike but are not one image: extraction skips them as bad input,
    # like missing and unreadable ones, so these are told apart by path.
    try:
        if image.is_file() and image.stat().st_size:
            return file_key(image)
    except OSError:  # unreadable (permissions, a symlink loop): screening names it
        pass
    return os.path.normpath(image)


def _root(manifest_path: Path, image_root: str | Path | None) -> Path:
    return Path(os.path.abspath(image_root if image_root is not None else manifest_path.parent))


def _locate(manifest_path: Path, image: str) -> Path:
    # abspath normalises '..' as written; symlinks are followed when reading, not judged.
    return Path(os.path.abspath(manifest_path.parent / image))


def _inside(location: Path, root: Path) -> bool:
    return location.is_relative_to(root)


def image_file(
    manifest_path: str | Path, relative_path: str, image_root: str | Path | None = None
) -> Path:
    """Where an image named in a manifest lives on disk.

    Args:
        manifest_path: the manifest; relative image paths start from its folder.
        relative_path: the manifest's `image_path` (relative or absolute).
        image_root: the folder the image must lie in; None: the manifest's folder.

    Raises:
        UserError: the image lies outside the image root (as `../x.png` does by default).
    """
    manifest_path = Path(manifest_path)
    location, root = _locate(manifest_path, relative_path), _root(manifest_path, image_root)
    if not _inside(location, root):
        raise UserError(
            f"manifest {manifest_path}: image {relative_path} is outside the image root "
            f"{root}; name a root that holds it (e.g. --image-root)"
        )
    return location
