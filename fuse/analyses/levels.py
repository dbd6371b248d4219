"""The paper's metrics at image, exam and patient level, side by side.

Exam and patient scores aggregate their images' scores by mean (the default) and by max.
"""

from __future__ import annotations

import pandas as pd

from fuse.analyses.base import AnalysisInputs, AnalysisResult, sets_of
from fuse.evaluate import (
    AGGREGATES,
    DEFAULT_AGGREGATE,
    at_level,
    pooled_rows,
    summarise,
    trial_metrics,
)
from fuse.schema import LEVELS
from pipeline.stats import format_mean_sd

SHOWN_METRICS = ("accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity")


def views() -> list[tuple[str, str]]:
    """(level, aggregate) pairs: the image itself, then each coarser level by each aggregate."""
    return [("image", "none")] + [
        (level, aggregate) for level in LEVELS if level != "image" for aggregate in AGGREGATES
    ]


def level_summary(pooled: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """Mean, SD and trials of every metric at every (level, aggregate), model, head and set."""
    frames = []
    for level, aggregate in views():
        rows = at_level(
            pooled, level, classes, DEFAULT_AGGREGATE if level == "image" else aggregate
        )
        frames.append(trial_metrics(rows, classes).assign(level=level, aggregate=aggregate))
    return summarise(pd.concat(frames, ignore_index=True))


def _shown(summary: pd.DataFrame, split: str, classes: tuple[str, ...]) -> pd.DataFrame:
    metrics = [*SHOWN_METRICS[:5], *(f"recall_{name}" for name in classes), *SHOWN_METRICS[5:]]
    rows = summary[(summary["set"] == split) & (summary["head"] == "head")]
    records = []
    for (level, aggregate, model), group in rows.groupby(
        ["level", "aggregate", "model"], sort=False
    ):
        cells = group.set_index("metric")
        records.append(
            {
                "level": level,
                "aggregate": aggregate,
                "model": model,
                "trials": int(group["trials"].iloc[0]),
                **{
                    name: format_mean_sd(
                        cells.loc[f"{name}@0.5", "mean"], cells.loc[f"{name}@0.5", "sd"]
                    )
                    for name in metrics
                },
            }
        )
    return pd.DataFrame(records)


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """Metrics at each level beside the image-level ones, per set, mean (SD) over trials."""
    pooled = pooled_rows(inputs.predictions, inputs.classes)
    summary = level_summary(pooled, inputs.classes)
    shown = {split: _shown(summary, split, inputs.classes) for split in sets_of(pooled)}
    return AnalysisResult(
        title="Image, exam and patient level",
        notes=[
            "Trained heads, 0.5 cut, mean (SD) over the trials in the 'trials' column. An exam's "
            "(patient's) score is the mean or the max of its images' scores; the mean is the "
            "default everywhere else in this report (the DeLong tests use it, and one noisy "
            "image moves a max far more than a mean). A unit is positive when any of its "
            "images is."
        ],
        tables={"summary": summary, **shown},
        shown=tuple(shown),
    )
