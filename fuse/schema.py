"""The predictions table and its run records: file names, columns, keys, and their readers.

The table is the contract between training and everything downstream. One row per pair
and per fitted head; every row carries what a reader needs to judge it on its own: the
class probabilities, the label, the split, the validation threshold of the head that
scored it, and where it comes from (patient, exam, site, model, head, trial, fold).
Tables, plots and analyses import this module, never the protocol, and group by
`HEAD_KEYS` rather than spelling the keys out, so a new axis is one entry here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError

PREDICTIONS_FILE = "predictions.parquet"
RUNS_FILE = "runs.json"
CURVES_FILE = "training_curves.csv"

ROW_COLUMNS = ("image_path", "patient_id", "exam_id", "site")  # copied from the manifest
HEAD_KEYS = ("model", "head", "trial", "fold")  # one fitted head (or probe)
HEAD_KINDS = ("head", "probe")
EVALUATED_SETS = ("test", "external")
LEVELS = {
    "image": ("row",),  # one image-report pair
    "exam": ("patient_id", "exam_id"),  # one examination: one report, its images
    "patient": ("patient_id",),
}
RUN_SECTIONS = ("note", "settings", "models", "learning_rate_search", "data", "runs")
# Rows scored as they are carry condition OBSERVED; the modality analyses' rows (an input
# replaced, fuse.counterfactual) carry their condition and the row whose vector they took.
CONDITION_COLUMN, SOURCE_ROW_COLUMN = "condition", "source_row"
OBSERVED = "observed"
# Each row's attention weight in its exam, from an exam-level head; NaN for every other
# head and condition. Written always, not required of a table (older tables still read).
ATTENTION_COLUMN = "attention"


def attribution_column(modality: str) -> str:
    """The column holding an input's share of the positive log-odds (gradient x input)."""
    return f"attribution_{modality}"


def probability_column(name: str) -> str:
    """The column holding the probability of class `name`."""
    return f"prob_{name}"


def positive_column(classes: Sequence[str]) -> str:
    """The column holding the positive (last) class's probability."""
    return probability_column(classes[-1])


def prediction_rows(
    rows: pd.DataFrame,
    splits: Sequence[str],
    *,
    model: str,
    head: str,
    trial: int,
    fold: int,
    threshold: float,
    probabilities: np.ndarray,
    classes: Sequence[str],
    fraction: float = 1.0,
    condition: str = OBSERVED,
    source_rows: np.ndarray | None = None,
    attributions: Mapping[str, np.ndarray] | None = None,
    attention: np.ndarray | None = None,
) -> pd.DataFrame:
    """The table's rows for one fitted head, from plain arguments.

    Args:
        rows: the manifest rows scored, with the columns of ROW_COLUMNS and `label`; their
            index is the `row` column (the pair's position in the protocol's table).
        splits: each row's split in this head's trial.
        model, head, trial, fold: which head scored them (head: "head" or "probe").
        threshold: the head's cut on the positive probability, chosen on validation.
        probabilities: [rows, classes].
        classes: class names, negative first.
        fraction: the share of the trial's training patients the head was trained on.
        condition: OBSERVED, or the input replacement the rows were scored under.
        source_rows: the row whose vector each row received under `condition` (-1: none).
        attributions: each input modality's share of the positive log-odds per row.
        attention: [rows] each row's attention weight in its exam; None: NaN.
    """
    frame = rows.loc[:, list(ROW_COLUMNS)].reset_index(drop=True)
    frame.insert(0, "row", rows.index.to_numpy())
    frame["label"] = rows["label"].to_numpy()
    frame["split"] = np.asarray(splits)
    frame["model"] = model
    frame["head"] = head
    frame["trial"] = trial
    frame["fold"] = fold
    frame["threshold"] = float(threshold)
    frame["fraction"] = float(fraction)
    for position, name in enumerate(classes):
        frame[probability_column(name)] = probabilities[:, position].astype(np.float32)
    frame[CONDITION_COLUMN] = condition
    frame[SOURCE_ROW_COLUMN] = (
        frame["row"].to_numpy() if source_rows is None else np.asarray(source_rows)
    )
    for modality, shares in (attributions or {}).items():
        frame[attribution_column(modality)] = np.asarray(shares, dtype=np.float32)
    frame[ATTENTION_COLUMN] = (
        np.full(len(frame), np.nan) if attention is None else np.asarray(attention)
    ).astype(np.float32)
    return frame


def required_columns(classes: Sequence[str]) -> tuple[str, ...]:
    """Every column a predictions table for `classes` must have."""
    return (
        "row",
        *ROW_COLUMNS,
        "label",
        "split",
        *HEAD_KEYS,
        "threshold",
        *(probability_column(name) for name in classes),
    )


def _damaged(path: Path, problem: str) -> UserError:
    return UserError(
        f"{path}: {problem}; rerun `python -m fuse protocol` to write it again "
        "(under DVC: `dvc repro fuse`)"
    )


def read_runs(folder: str | Path) -> dict[str, Any]:
    """The run records of a protocol folder.

    Raises:
        UserError: the file is missing, not JSON, or lacks a section.
    """
    path = Path(folder) / RUNS_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `python -m fuse protocol` first")
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(path, f"is not readable JSON ({error})") from None
    missing = [section for section in RUN_SECTIONS if section not in runs]
    if not isinstance(runs, dict) or missing or not runs.get("runs"):
        raise _damaged(path, f"lacks {missing or ['runs']}")
    return runs


def read_predictions(
    folder: str | Path, classes: Sequence[str], conditions: bool = False
) -> pd.DataFrame:
    """The predictions table of a protocol folder, checked against the schema.

    Args:
        conditions: also return the rows scored with an input replaced; by default only
            the observed rows, which every table but the modality analyses reads.

    Raises:
        UserError: the file is missing, damaged (not Parquet, truncated), empty, or lacks
            a column.
    """
    path = Path(folder) / PREDICTIONS_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `python -m fuse protocol` first")
    try:
        table = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several types for a damaged file
        raise _damaged(path, f"is not a readable Parquet file ({type(error).__name__})") from None
    if table.empty:
        raise _damaged(path, "has no rows")
    missing = [column for column in required_columns(classes) if column not in table]
    if missing:
        raise _damaged(path, f"lacks column(s) {missing}")
    if CONDITION_COLUMN not in table:  # written before conditions existed: all observed
        table[CONDITION_COLUMN] = OBSERVED
    if conditions:
        return table
    return table[table[CONDITION_COLUMN] == OBSERVED].reset_index(drop=True)


def read_curves(folder: str | Path) -> pd.DataFrame:
    """The per-epoch training curves of a protocol folder.

    Raises:
        UserError: the file is missing or not a readable CSV.
    """
    path = Path(folder) / CURVES_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `python -m fuse protocol` first")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise _damaged(path, f"is not a readable CSV file ({type(error).__name__})") from None


def classes_of(runs: Mapping[str, Any]) -> tuple[str, ...]:
    """The class names of a run, negative first."""
    return tuple(runs["settings"]["classes"])
