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
    contribution,
    decision_curve,
    label_efficiency,
    levels,
    operating_points,
    text_vs_vision,
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
    "contribution": contribution.analyse,
    "text_vs_vision": text_vs_vision.analyse,
    "label_efficiency": label_efficiency.analyse,
}

__all__ = ["ANALYSES", "AnalysisInputs", "AnalysisResult", "AnalysisSettings"]
