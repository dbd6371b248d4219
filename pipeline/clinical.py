"""Clinical variables: optional manifest columns declared numeric or categorical, their
check, and the encoding a head fits on its training rows.

A manifest may carry columns such as age, sex or smoking beside the required ones. They
are used only where declared (`clinical_numeric`, `clinical_categorical`); then every
declared column must be in the manifest, a numeric one must hold numbers, and a blank cell
is a missing value, handled as `clinical_missing` says.

The encoding, one block of columns per variable, is fitted on training rows only (each
image-report row counts, as for the feature standardisation):
- numeric: the value standardised with the training rows' mean and SD (an SD of 0 counts
  as 1), a missing value first replaced by the training rows' median (or mean), then a
  0/1 missing indicator;
- categorical: one 0/1 column per level seen in the training rows (values compared with
  outer whitespace removed, case kept), then a 0/1 missing indicator. A level the training
  rows never had sets none of the columns (neither a level nor missing): that all-zero
  block is its own pattern, and `unseen_levels` names such values so predict can warn.
The encoding is plain data (to_dict/from_dict), saved with the head that fitted it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import setting
from pipeline.errors import UserError
from pipeline.manifest import LINE_COLUMN, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, first_lines

MISSING_POLICIES = {
    "median": "a missing numeric value becomes the training rows' median, a missing category "
    "no level; each variable also gets a missing indicator",
    "mean": "as median, with the training rows' mean",
    "refuse": "a blank clinical value is refused by the manifest check",
}


@dataclass(frozen=True)
class ClinicalSettings:
    """Which manifest columns are clinical variables, and what a blank value means."""

    clinical_numeric: tuple[str, ...] = setting(
        (),
        "manifest columns holding numbers (e.g. age), a third input of the models that take "
        "clinical variables (M4-clinical); a blank cell is missing; empty: none",
    )
    clinical_categorical: tuple[str, ...] = setting(
        (),
        "manifest columns holding categories (e.g. sex smoking), one-hot with the training "
        "rows' levels; empty: none",
    )
    clinical_missing: str = setting(
        "median",
        "; ".join(f"{name}: {meaning}" for name, meaning in MISSING_POLICIES.items()),
        choices=tuple(MISSING_POLICIES),
    )


@dataclass(frozen=True)
class ClinicalColumns:
    """The declaration: which columns, of which kind, and the missing-value policy."""

    numeric: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    missing: str = "median"

    @classmethod
    def from_settings(cls, settings: ClinicalSettings) -> ClinicalColumns:
        """The declaration that `settings` makes."""
        return cls(
            tuple(settings.clinical_numeric),
            tuple(settings.clinical_categorical),
            settings.clinical_missing,
        )

    @property
    def columns(self) -> tuple[str, ...]:
        """Every declared column, numeric first."""
        return (*self.numeric, *self.categorical)


def _blank(values: pd.Series) -> pd.Series:
    return values.astype(str).str.strip() == ""


def _numbers(values: pd.Series) -> pd.Series:
    """Each value as a float; NaN where blank or not a number."""
    return pd.to_numeric(values.astype(str).str.strip(), errors="coerce").astype(float)


def check_clinical_columns(
    path: str | Path, table: pd.DataFrame, declared: ClinicalColumns
) -> None:
    """Refuse a manifest whose declared clinical columns are absent or hold bad values.

    Args:
        path: the manifest, for messages.
        table: the manifest as read (text values, with LINE_COLUMN).
        declared: the clinical columns and the missing-value policy.

    Raises:
        UserError: a column declared twice or that is one of the manifest's own columns;
            a declared column the manifest lacks; text (or an infinite number) in a
            numeric column; a blank value when missing values are refused. The message
            names the column and the first offending lines.
    """
    repeated = sorted({name for name in declared.columns if declared.columns.count(name) > 1})
    if repeated:
        raise UserError(
            f"clinical column(s) {', '.join(repeated)} declared twice; declare each once, "
            "as numeric or as categorical"
        )
    own = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS, LINE_COLUMN)
    reserved = [name for name in declared.columns if name in own]
    if reserved:
        raise UserError(
            f"clinical column(s) {', '.join(reserved)} are manifest columns with their own "
            "meaning (a label as an input would leak the answer); declare other columns"
        )
    absent = [name for name in declared.columns if name not in table.columns]
    if absent:
        raise UserError(
            f"manifest {path}: clinical column(s) {', '.join(map(repr, absent))} missing "
            "(declared by clinical_numeric / clinical_categorical, or taken by the head "
            "applied); add them to the manifest"
        )
    lines = table[LINE_COLUMN]
    for name in declared.numeric:
        numbers = _numbers(table[name])
        bad = ~_blank(table[name]) & ~np.isfinite(numbers)
        if bad.any():
            found = ", ".join(repr(value) for value in table.loc[bad, name].unique()[:3])
            raise UserError(
                f"manifest {path}, column '{name}': not a number ({found}) at line(s) "
                f"{first_lines(bad, lines)}; a numeric clinical column holds numbers, and a "
                "missing value is a blank cell"
            )
    if declared.missing == "refuse":
        for name in declared.columns:
            blank = _blank(table[name])
            if blank.any():
                raise UserError(
                    f"manifest {path}, column '{name}': missing value at line(s) "
                    f"{first_lines(blank, lines)}; fill them, or set clinical_missing to "
                    "median or mean (imputed from training rows, with a missing indicator)"
                )


@dataclass(frozen=True)
class NumericEncoding:
    """One numeric variable: what replaces a missing value, and the standardisation."""

    name: str
    fill: float
    mean: float
    sd: float


@dataclass(frozen=True)
class CategoricalEncoding:
    """One categorical variable: the levels of the training rows, in column order."""

    name: str
    levels: tuple[str, ...]


@dataclass(frozen=True)
class ClinicalEncoding:
    """The clinical input of a head, fitted on its training rows (see the module's rules)."""

    numeric: tuple[NumericEncoding, ...]
    categorical: tuple[CategoricalEncoding, ...]
    missing: str

    @classmethod
    def fit(cls, train: pd.DataFrame, declared: ClinicalColumns) -> ClinicalEncoding:
        """Learn fills, standardisation and levels from the training rows `train`.

        Raises:
            UserError: a numeric column with no value in the training rows.
        """
        numeric = []
        for name in declared.numeric:
            observed = _numbers(train[name]).dropna()
            if observed.empty:
                raise UserError(
                    f"clinical column '{name}' has no value in the {len(train)} training rows; "
                    "fill it or leave it out of clinical_numeric"
                )
            sd = float(observed.std(ddof=0))
            fill = observed.median() if declared.missing == "median" else observed.mean()
            numeric.append(
                NumericEncoding(name, float(fill), float(observed.mean()), sd if sd > 0 else 1.0)
            )
        categorical = [
            CategoricalEncoding(name, tuple(sorted(set(_levels(train[name])) - {""})))
            for name in declared.categorical
        ]
        return cls(tuple(numeric), tuple(categorical), declared.missing)

    @property
    def columns(self) -> ClinicalColumns:
        """The declaration this encoding was fitted for."""
        return ClinicalColumns(
            tuple(variable.name for variable in self.numeric),
            tuple(variable.name for variable in self.categorical),
            self.missing,
        )

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The encoded columns, e.g. ("age", "age missing", "sex=F", "sex=M", "sex missing")."""
        names = []
        for variable in self.numeric:
            names += [variable.name, f"{variable.name} missing"]
        for variable in self.categorical:
            names += [f"{variable.name}={level}" for level in variable.levels]
            names.append(f"{variable.name} missing")
        return tuple(names)

    @property
    def width(self) -> int:
        """How many encoded columns."""
        return len(self.feature_names)

    def _check_columns(self, table: pd.DataFrame) -> None:
        absent = [name for name in self.columns.columns if name not in table.columns]
        if absent:
            raise UserError(
                f"the manifest lacks clinical column(s) {', '.join(map(repr, absent))}, "
                "which this head takes; add them"
            )

    def encode(self, table: pd.DataFrame) -> np.ndarray:
        """The encoded clinical input [rows, width] (float32) of the manifest rows `table`.

        Raises:
            UserError: a column of the encoding that `table` lacks.
        """
        self._check_columns(table)
        blocks = []
        for variable in self.numeric:
            numbers = _numbers(table[variable.name]).to_numpy()
            missing = np.isnan(numbers)
            filled = np.where(missing, variable.fill, numbers)
            blocks += [(filled - variable.mean) / variable.sd, missing.astype(float)]
        for variable in self.categorical:
            values = _levels(table[variable.name])
            blocks += [(values == level).astype(float) for level in variable.levels]
            blocks.append((values == "").astype(float))
        if not blocks:
            return np.zeros((len(table), 0), np.float32)
        return np.stack(blocks, axis=1).astype(np.float32)

    def unseen_levels(self, table: pd.DataFrame) -> dict[str, dict[str, int]]:
        """Per categorical column, each value the training rows never had and its row count."""
        self._check_columns(table)
        unseen = {}
        for variable in self.categorical:
            values = pd.Series(_levels(table[variable.name]))
            other = values[(values != "") & ~values.isin(variable.levels)]
            if len(other):
                unseen[variable.name] = {str(k): int(v) for k, v in other.value_counts().items()}
        return unseen

    def describe(self) -> str:
        """One phrase, e.g. "age (numeric), sex (2 levels), smoking (3 levels); missing: median"."""
        parts = [f"{variable.name} (numeric)" for variable in self.numeric] + [
            f"{variable.name} ({len(variable.levels)} levels)" for variable in self.categorical
        ]
        return f"{', '.join(parts)}; missing: {self.missing}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; `from_dict` reads it back exactly (floats as repr)."""
        return {
            "numeric": [vars(variable) for variable in self.numeric],
            "categorical": [
                {"name": variable.name, "levels": list(variable.levels)}
                for variable in self.categorical
            ],
            "missing": self.missing,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClinicalEncoding:
        """The encoding `to_dict` wrote."""
        numeric = tuple(NumericEncoding(**variable) for variable in data["numeric"])
        categorical = tuple(
            CategoricalEncoding(variable["name"], tuple(variable["levels"]))
            for variable in data["categorical"]
        )
        return cls(numeric, categorical, str(data["missing"]))


def _levels(values: pd.Series) -> np.ndarray:
    """Category values as compared: text with outer whitespace removed."""
    return values.astype(str).str.strip().to_numpy(dtype=object)
