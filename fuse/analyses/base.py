"""What every analysis takes and returns, and the step most of them share: fit on a head's
validation rows, apply to its test and external rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from fuse.evaluate import pool_folds, scored_rows
from fuse.schema import EVALUATED_SETS, HEAD_KEYS

SET_TITLES = {"test": "internal test set", "external": "external test set"}


@dataclass(frozen=True)
class AnalysisSettings:
    """The report settings analyses read (see fuse.report.ReportConfig for their meaning)."""

    resamples: int = 1000
    seed: int = 0
    target_sensitivity: float = 0.95
    target_specificity: float = 0.95
    calibration: str = "temperature"
    calibration_bins: int = 10
    decision_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5)


@dataclass(frozen=True)
class AnalysisInputs:
    """The predictions table (every split, validation rows included) and its run records.

    `predictions` holds the observed rows; `conditions` the rows scored with an input
    replaced (fuse.counterfactual); `label_efficiency` the predictions table of a protocol
    run over label fractions, when the report was given one.
    """

    predictions: pd.DataFrame
    runs: Mapping[str, Any]
    classes: tuple[str, ...]
    settings: AnalysisSettings = AnalysisSettings()
    conditions: pd.DataFrame | None = None
    label_efficiency: pd.DataFrame | None = None


@dataclass
class AnalysisResult:
    """Tables (written to tables.md, tables.json and one CSV each) and figures (PNG).

    `notes` are sentences shown above the tables; `shown` names the tables put in tables.md
    (None: all), so a long table can go to JSON and CSV only.
    """

    title: str
    notes: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    shown: tuple[str, ...] | None = None


def refit_per_head(
    inputs: AnalysisInputs,
    apply: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame],
) -> pd.DataFrame:
    """Fold-pooled test and external rows after `apply(validation, evaluated)` per head.

    For every fitted head (schema.HEAD_KEYS), `apply` gets that head's validation rows and
    its test/external rows (both with `score`, `positive`, `threshold`) and returns the
    evaluated rows with new scores or thresholds. Nothing fitted sees a test row.
    """
    scored = scored_rows(inputs.predictions, inputs.classes)
    changed = []
    for _, rows in scored.groupby(list(HEAD_KEYS), sort=False):
        validation = rows[rows["split"] == "val"]
        evaluated = rows[rows["split"].isin(EVALUATED_SETS)]
        if len(evaluated):
            changed.append(apply(validation, evaluated))
    return pool_folds(pd.concat(changed, ignore_index=True))


def sets_of(rows: pd.DataFrame) -> list[str]:
    """The evaluated sets present in rows with a `split` column, in report order."""
    present = set(rows["split"])
    return [split for split in SET_TITLES if split in present]


def trial_counts(rows: pd.DataFrame) -> str:
    """'M4 5, M1 4': the number of trials of each model, from the rows themselves."""
    counts = rows[rows["head"] == "head"].groupby("model", sort=False)["trial"].nunique()
    return ", ".join(f"{model} {count}" for model, count in counts.items())
