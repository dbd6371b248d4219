"""Analyses over the predictions table, one module each; the report walks `ANALYSES`.

Each entry maps a name (used for file names and tables.json) to a function
`analyse(AnalysisInputs) -> AnalysisResult`. Adding an analysis is one module with that
function and one line here.
"""

from __future__ import annotations

from collections.abc import Callable

from fuse.analyses import (
    calibration,
    comparisons,
    decision_curve,
    levels,
    operating_points,
    training,
)
from fuse.analyses.base import AnalysisInputs, AnalysisResult, AnalysisSettings

ANALYSES: dict[str, Callable[[AnalysisInputs], AnalysisResult]] = {
    "levels": levels.analyse,
    "comparisons": comparisons.analyse,
    "calibration": calibration.analyse,
    "operating_points": operating_points.analyse,
    "decision_curve": decision_curve.analyse,
    "training": training.analyse,
}

__all__ = ["ANALYSES", "AnalysisInputs", "AnalysisResult", "AnalysisSettings"]
