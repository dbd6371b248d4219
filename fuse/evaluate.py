"""From the predictions table to the paper's numbers: per-trial metrics, mean (SD), CIs, p-values.

Nothing here trains. Every number comes from the per-row probabilities the protocol wrote
and the validation thresholds in its run records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.metrics import classification_metrics, roc_auc
from pipeline.stats import (
    bootstrap_ci,
    delong_test,
    mean_sd,
    paired_trials_test,
    patient_scores,
)

EVALUATED_SETS = ("test", "external")
OPERATING_POINTS = {"0.5": "probability cut at 0.5", "val": "cut chosen on validation (Youden)"}
REFERENCE_MODEL = "M4"
CI_METRICS = ("auc", "accuracy", "f1")
COMPARISON_COLUMNS = (
    "set",
    "reference",
    "model",
    "patients",
    "patient_auc_reference",
    "patient_auc_model",
    "delong_p",
    "trials",
    "paired_t_p",
)


def pooled_rows(
    predictions: pd.DataFrame, classes: Sequence[str]
) -> pd.DataFrame:
    """One row per (model, head, trial, set, pair): the positive score and its threshold.

    Folds of one trial are pooled: a pair is a test pair in exactly one fold, and an
    external pair, predicted by every fold's head, gets the mean of their scores (and of
    their thresholds).
    """
    evaluated = predictions[predictions["split"].isin(EVALUATED_SETS)]
    evaluated = evaluated.assign(score=evaluated[f"prob_{classes[-1]}"].astype(float))
    return (
        evaluated.groupby(["model", "head", "trial", "split", "row"], sort=False)
        .agg(
            score=("score", "mean"),
            threshold=("threshold", "mean"),
            label=("label", "first"),
            patient_id=("patient_id", "first"),
        )
        .reset_index()
    )


def _metrics_of(rows: pd.DataFrame, classes: Sequence[str]) -> dict[str, float]:
    labels = rows["label"].map({name: index for index, name in enumerate(classes)}).to_numpy()
    scores = rows["score"].to_numpy()
    at_half = classification_metrics(labels, np.c_[1 - scores, scores], classes)
    # A pair's own trial/fold threshold, applied by shifting its score onto a 0.5 cut.
    shifted = np.clip(scores - rows["threshold"].to_numpy() + 0.5, 0.0, 1.0)
    at_val = classification_metrics(labels, np.c_[1 - shifted, shifted], classes)
    at_val["auc"] = at_half["auc"]
    at_half["predicted_classes"] = float(len(np.unique(scores >= 0.5)))
    at_val["predicted_classes"] = float(len(np.unique(shifted >= 0.5)))
    return {
        **{f"{name}@0.5": value for name, value in at_half.items()},
        **{f"{name}@val": value for name, value in at_val.items()},
    }


def trial_metrics(pooled: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Metrics of every (model, head, set, trial), at both operating points."""
    records = []
    for (model, head, split, trial), rows in pooled.groupby(
        ["model", "head", "split", "trial"], sort=False
    ):
        records.append(
            {
                "model": model,
                "head": head,
                "set": split,
                "trial": trial,
                **_metrics_of(rows, classes),
            }
        )
    return pd.DataFrame(records)


def summarise(per_trial: pd.DataFrame) -> pd.DataFrame:
    """Mean and SD over trials of every metric, one row per (model, head, set, metric)."""
    metric_columns = [column for column in per_trial if "@" in column]
    records = []
    for (model, head, split), rows in per_trial.groupby(["model", "head", "set"], sort=False):
        for column in metric_columns:
            mean, sd = mean_sd(rows[column].to_numpy(dtype=float))
            records.append(
                {
                    "model": model,
                    "head": head,
                    "set": split,
                    "metric": column,
                    "mean": mean,
                    "sd": sd,
                }
            )
    return pd.DataFrame(records)


def averaged_over_trials(pooled: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, head, set, pair): its score averaged over the trials that scored it."""
    return (
        pooled.groupby(["model", "head", "split", "row"], sort=False)
        .agg(score=("score", "mean"), label=("label", "first"), patient_id=("patient_id", "first"))
        .reset_index()
    )


def confidence_intervals(
    averaged: pd.DataFrame, classes: Sequence[str], resamples: int, seed: int
) -> pd.DataFrame:
    """95% CIs by bootstrap over patients of AUC, accuracy and F1 (at 0.5), per model and set."""
    metric_of = {
        "auc": roc_auc,
        "accuracy": lambda labels, scores: float(np.mean((scores >= 0.5) == labels)),
        "f1": lambda labels, scores: classification_metrics(
            labels, np.c_[1 - scores, scores], classes
        )["f1"],
    }
    records = []
    for (model, head, split), rows in averaged.groupby(["model", "head", "split"], sort=False):
        labels = (rows["label"] == classes[-1]).to_numpy(dtype=int)
        scores = rows["score"].to_numpy()
        for name in CI_METRICS:
            low, high = bootstrap_ci(
                labels, scores, rows["patient_id"].to_numpy(), metric_of[name], resamples, seed=seed
            )
            records.append(
                {
                    "model": model,
                    "head": head,
                    "set": split,
                    "metric": name,
                    "low": low,
                    "high": high,
                }
            )
    return pd.DataFrame(records)


def comparisons(
    pooled: pd.DataFrame, per_trial: pd.DataFrame, classes: Sequence[str], reference: str
) -> pd.DataFrame:
    """The reference model's head against every other model's head, per set.

    DeLong runs on patients (each patient's score averaged over its pairs and over the
    trials that tested it), the same patients for both models; the paired t-test runs on
    the per-trial AUCs.
    """
    heads = pooled[pooled["head"] == "head"]
    records: list[dict[str, Any]] = []
    for split in EVALUATED_SETS:
        of_set = heads[heads["split"] == split]
        if reference not in set(of_set["model"]):
            continue
        patients = {
            model: patient_scores(rows.assign(label=rows["label"] == classes[-1]), "score")
            for model, rows in of_set.groupby("model", sort=False)
        }
        trials = per_trial[(per_trial["head"] == "head") & (per_trial["set"] == split)]
        reference_auc = trials[trials["model"] == reference].set_index("trial")["auc@0.5"]
        for model in patients:
            if model == reference:
                continue
            joined = patients[reference].merge(patients[model], on=["patient_id", "label"])
            delong = delong_test(
                joined["label"].to_numpy(dtype=int),
                joined["score_x"].to_numpy(),
                joined["score_y"].to_numpy(),
            )
            other_auc = trials[trials["model"] == model].set_index("trial")["auc@0.5"]
            common = reference_auc.index.intersection(other_auc.index)
            records.append(
                {
                    "set": split,
                    "reference": reference,
                    "model": model,
                    "patients": len(joined),
                    "patient_auc_reference": delong["auc_a"],
                    "patient_auc_model": delong["auc_b"],
                    "delong_p": delong["p_value"],
                    "trials": len(common),
                    "paired_t_p": paired_trials_test(
                        reference_auc[common].to_numpy(), other_auc[common].to_numpy()
                    ),
                }
            )
    return pd.DataFrame(records, columns=COMPARISON_COLUMNS)


def evaluate(
    predictions: pd.DataFrame,
    classes: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Every table the report shows, computed from the predictions table alone."""
    pooled = pooled_rows(predictions, classes)
    per_trial = trial_metrics(pooled, classes)
    averaged = averaged_over_trials(pooled)
    return {
        "per_trial": per_trial,
        "summary": summarise(per_trial),
        "ci": confidence_intervals(averaged, classes, resamples, seed),
        "comparisons": comparisons(pooled, per_trial, classes, REFERENCE_MODEL),
        "averaged": averaged,
    }
