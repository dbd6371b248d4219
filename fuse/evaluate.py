"""From the predictions table to the paper's numbers: per-trial metrics, mean (SD), CIs, p-values.

Nothing here trains. Every number comes from the per-row probabilities the protocol wrote
and the validation thresholds it stored with them. Rows can be taken to a coarser level
(exam, patient) before any metric; every table says its level.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fuse.schema import EVALUATED_SETS, LEVELS, positive_column
from pipeline.metrics import (
    classification_metrics,
    weighted_auc,
    weighted_macro_f1,
    weighted_share,
)
from pipeline.stats import bootstrap_weights, mean_sd, paired_trials_test, percentile_interval

OPERATING_POINTS = {"0.5": "probability cut at 0.5", "val": "cut chosen on validation (Youden)"}
REFERENCE_MODEL = "M4"
CI_METRICS = ("auc", "accuracy", "f1")
# How the images of an exam or patient become one score. The mean is the default: DeLong
# has always run on patient means, and one noisy image moves a max far more than a mean.
AGGREGATES = ("mean", "max")
DEFAULT_AGGREGATE = "mean"
POOLED_KEYS = ("model", "head", "trial", "split")
TRIAL_TEST_COLUMNS = (
    "level",
    "set",
    "head",
    "reference",
    "model",
    "trials",
    "auc_reference",
    "auc_model",
    "paired_t_p",
)


def scored_rows(predictions: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """The table with `score` (positive probability, float) and `positive` (label is positive)."""
    return predictions.assign(
        score=predictions[positive_column(classes)].astype(float),
        positive=predictions["label"] == classes[-1],
    )


def pool_folds(scored: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, head, trial, set, pair) of the evaluated sets, folds pooled.

    A pair is a test pair in exactly one fold, and an external pair, predicted by every
    fold's head, gets the mean of their scores (and of their thresholds).
    """
    evaluated = scored[scored["split"].isin(EVALUATED_SETS)]
    return (
        evaluated.groupby([*POOLED_KEYS, "row"], sort=False)
        .agg(
            score=("score", "mean"),
            threshold=("threshold", "mean"),
            label=("label", "first"),
            positive=("positive", "first"),
            patient_id=("patient_id", "first"),
            exam_id=("exam_id", "first"),
        )
        .reset_index()
    )


def pooled_rows(predictions: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """`pool_folds` of the table's positive scores."""
    return pool_folds(scored_rows(predictions, classes))


def at_level(
    pooled: pd.DataFrame, level: str, classes: Sequence[str], aggregate: str = DEFAULT_AGGREGATE
) -> pd.DataFrame:
    """Pooled rows taken to `level` (a key of schema.LEVELS): one row per unit and trial.

    A unit's score is the `aggregate` ("mean" or "max") of its images' scores, its
    threshold the mean of theirs (the image-level validation cut), and it is positive when
    any of its images is (a patient with one carcinoma exam has carcinoma).
    """
    if level == "image":
        return pooled
    units = list(LEVELS[level])
    grouped = pooled.groupby([*POOLED_KEYS, *units], sort=False)
    rows = grouped.agg(
        score=("score", aggregate),
        threshold=("threshold", "mean"),
        positive=("positive", "max"),
        images=("row", "size"),
    ).reset_index()
    rows["label"] = np.where(rows["positive"], classes[-1], classes[0])
    return rows


def _metrics_of(rows: pd.DataFrame, classes: Sequence[str]) -> dict[str, float]:
    labels = rows["positive"].to_numpy(dtype=int)
    scores = rows["score"].to_numpy()
    at_half = classification_metrics(labels, np.c_[1 - scores, scores], classes)
    # A row's own trial/fold threshold, applied by shifting its score onto a 0.5 cut.
    shifted = np.clip(scores - rows["threshold"].to_numpy() + 0.5, 0.0, 1.0)
    at_val = classification_metrics(labels, np.c_[1 - shifted, shifted], classes)
    at_val["auc"] = at_half["auc"]
    at_half["predicted_classes"] = float(len(np.unique(scores >= 0.5)))
    at_val["predicted_classes"] = float(len(np.unique(shifted >= 0.5)))
    return {
        **{f"{name}@0.5": value for name, value in at_half.items()},
        **{f"{name}@val": value for name, value in at_val.items()},
    }


def trial_metrics(rows: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Metrics of every (model, head, set, trial), at both operating points."""
    records = [
        {"model": model, "head": head, "set": split, "trial": trial, **_metrics_of(group, classes)}
        for (model, head, split, trial), group in rows.groupby(
            ["model", "head", "split", "trial"], sort=False
        )
    ]
    return pd.DataFrame(records)


def summarise(per_trial: pd.DataFrame) -> pd.DataFrame:
    """Mean, SD and number of trials of every metric, one row per (keys, metric).

    The keys are every column that is neither a metric (name with "@") nor the trial, so a
    level or aggregate column carries through.
    """
    metric_columns = [column for column in per_trial if "@" in column]
    keys = [column for column in per_trial if "@" not in column and column != "trial"]
    records = []
    for values, rows in per_trial.groupby(keys, sort=False):
        for column in metric_columns:
            mean, sd = mean_sd(rows[column].to_numpy(dtype=float))
            records.append(
                {
                    **dict(zip(keys, values, strict=True)),
                    "trials": rows["trial"].nunique(),
                    "metric": column,
                    "mean": mean,
                    "sd": sd,
                }
            )
    return pd.DataFrame(records)


def averaged_over_trials(rows: pd.DataFrame, level: str = "image") -> pd.DataFrame:
    """One row per (model, head, set, unit of `level`): its score averaged over the trials
    that scored it."""
    units = list(LEVELS[level])
    extra = {} if "patient_id" in units else {"patient_id": ("patient_id", "first")}
    return (
        rows.groupby(["model", "head", "split", *units], sort=False)
        .agg(
            score=("score", "mean"),
            label=("label", "first"),
            positive=("positive", "first"),
            trials=("trial", "nunique"),
            **extra,
        )
        .reset_index()
    )


def confidence_intervals(
    averaged: pd.DataFrame, classes: Sequence[str], resamples: int, seed: int
) -> pd.DataFrame:
    """95% CIs by bootstrap over patients of AUC, accuracy and F1 (at 0.5), per model and set.

    All resamples at once, as patient-count weights (`bootstrap_weights`).
    """
    records = []
    for (model, head, split), rows in averaged.groupby(["model", "head", "split"], sort=False):
        labels = rows["positive"].to_numpy(dtype=bool)
        scores = rows["score"].to_numpy()
        weights = bootstrap_weights(rows["patient_id"].to_numpy(), resamples, seed)
        called = scores >= 0.5
        values = {
            "auc": weighted_auc(labels, scores, weights),
            "accuracy": weighted_share(called == labels, np.ones(len(labels)), weights),
            "f1": weighted_macro_f1(labels, called, weights),
        }
        for name in CI_METRICS:
            low, high = percentile_interval(values[name])
            records.append(
                {
                    "level": "image",
                    "model": model,
                    "head": head,
                    "set": split,
                    "metric": name,
                    "low": low,
                    "high": high,
                }
            )
    return pd.DataFrame(records)


def trial_tests(per_trial: pd.DataFrame, reference: str = REFERENCE_MODEL) -> pd.DataFrame:
    """Paired t-tests over trials of every model's image-level AUC against the reference's.

    The AUCs beside each p are the means over the trials both models have, the very values
    the test compares.
    """
    records = []
    for (split, head), rows in per_trial.groupby(["set", "head"], sort=False):
        by_model = {
            model: group.set_index("trial")["auc@0.5"] for model, group in rows.groupby("model")
        }
        if reference not in by_model:
            continue
        for model, aucs in by_model.items():
            if model == reference:
                continue
            common = by_model[reference].index.intersection(aucs.index)
            ours, theirs = by_model[reference][common].to_numpy(), aucs[common].to_numpy()
            records.append(
                {
                    "level": "image",
                    "set": split,
                    "head": head,
                    "reference": reference,
                    "model": model,
                    "trials": len(common),
                    "auc_reference": float(np.mean(ours)) if len(common) else float("nan"),
                    "auc_model": float(np.mean(theirs)) if len(common) else float("nan"),
                    "paired_t_p": paired_trials_test(ours, theirs),
                }
            )
    return pd.DataFrame(records, columns=TRIAL_TEST_COLUMNS)


def evaluate(
    predictions: pd.DataFrame,
    classes: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """The image-level tables of the paper (Tables 2-4), from the predictions table alone."""
    pooled = pooled_rows(predictions, classes)
    per_trial = trial_metrics(pooled, classes).assign(level="image")
    averaged = averaged_over_trials(pooled)
    return {
        "per_trial": per_trial,
        "summary": summarise(per_trial),
        "ci": confidence_intervals(averaged, classes, resamples, seed),
        "trial_tests": trial_tests(per_trial),
        "averaged": averaged,
        "pooled": pooled,
    }
