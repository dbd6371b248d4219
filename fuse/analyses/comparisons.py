"""Each model against the reference (M4), at every level, with a test of that same level.

Per set and level (image, exam, patient), every unit's score is averaged over the trials
that scored it; both models' AUCs on the units they share, their difference with a paired
patient-bootstrap CI (the same resampled patients for both), and a p-value: DeLong at exam
and patient level, where units are taken as independent, and at image level the paired
patient bootstrap (images of one patient are correlated, which DeLong's variance ignores,
so it would be too small). The paired t-test over trials' image AUCs (Tables 2-4) is listed
too, as level "image, per trial". Where levels order two models differently, a note says so.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fuse.analyses.base import SET_TITLES, AnalysisInputs, AnalysisResult, sets_of
from fuse.evaluate import (
    REFERENCE_MODEL,
    at_level,
    averaged_over_trials,
    pooled_rows,
    trial_metrics,
    trial_tests,
)
from fuse.schema import LEVELS
from pipeline.metrics import roc_auc, weighted_auc
from pipeline.stats import bootstrap_p_value, bootstrap_weights, delong_test, percentile_interval

PER_TRIAL_LEVEL = "image, per trial"
COLUMNS = (
    "set",
    "level",
    "reference",
    "model",
    "units",
    "patients",
    "trials",
    "auc_reference",
    "auc_model",
    "difference",
    "difference_low",
    "difference_high",
    "p_value",
    "test",
)


def level_comparisons(
    pooled: pd.DataFrame, level: str, classes, reference: str, resamples: int, seed: int
) -> list[dict]:
    """The reference's trained head against every other model's, at `level`, per set."""
    heads = pooled[pooled["head"] == "head"]
    averaged = averaged_over_trials(at_level(heads, level, classes), level)
    units = list(LEVELS[level])
    records = []
    for split, rows in averaged.groupby("split", sort=False):
        if reference not in set(rows["model"]):
            continue
        ours = rows[rows["model"] == reference]
        for model, theirs in rows.groupby("model", sort=False):
            if model == reference:
                continue
            joined = ours.merge(theirs, on=[*units, "positive"], suffixes=("_a", "_b"))
            labels = joined["positive"].to_numpy(dtype=int)
            scores = joined[["score_a", "score_b"]].to_numpy()
            patients = joined["patient_id" if "patient_id" in units else "patient_id_a"]
            # one weight matrix for both models: the same resampled patients (paired)
            weights = bootstrap_weights(patients.to_numpy(), resamples, seed)
            differences = weighted_auc(labels, scores[:, 0], weights) - weighted_auc(
                labels, scores[:, 1], weights
            )
            low, high = percentile_interval(differences)
            if level == "image":
                p_value, test = bootstrap_p_value(differences), "paired patient bootstrap"
            else:
                p_value = delong_test(labels, scores[:, 0], scores[:, 1])["p_value"]
                test = f"DeLong on {level}s"
            records.append(
                {
                    "set": split,
                    "level": level,
                    "reference": reference,
                    "model": model,
                    "units": len(joined),
                    "patients": patients.nunique(),
                    "trials": int(min(joined["trials_a"].max(), joined["trials_b"].max())),
                    "auc_reference": roc_auc(labels, scores[:, 0]),
                    "auc_model": roc_auc(labels, scores[:, 1]),
                    "difference": roc_auc(labels, scores[:, 0]) - roc_auc(labels, scores[:, 1]),
                    "difference_low": low,
                    "difference_high": high,
                    "p_value": p_value,
                    "test": test,
                }
            )
    return records


def per_trial_comparisons(pooled: pd.DataFrame, classes, reference: str) -> list[dict]:
    """The paired t-test over trials' image AUCs, in this table's columns."""
    heads = pooled[pooled["head"] == "head"]
    tested = trial_tests(trial_metrics(heads, classes), reference)
    return [
        {
            "set": row["set"],
            "level": PER_TRIAL_LEVEL,
            "reference": reference,
            "model": row["model"],
            "units": np.nan,
            "patients": np.nan,
            "trials": row["trials"],
            "auc_reference": row["auc_reference"],
            "auc_model": row["auc_model"],
            "difference": row["auc_reference"] - row["auc_model"],
            "difference_low": np.nan,
            "difference_high": np.nan,
            "p_value": row["paired_t_p"],
            "test": "paired t over trials",
        }
        for _, row in tested.iterrows()
    ]


def order_changes(compared: pd.DataFrame) -> list[str]:
    """One sentence per (set, model) whose AUC order against the reference flips between levels."""
    notes = []
    for (split, model), rows in compared.groupby(["set", "model"], sort=False):
        signs = np.sign(rows["difference"].to_numpy())
        if (signs > 0).any() and (signs < 0).any():
            described = "; ".join(
                f"{row.level}: {row.reference} {row.auc_reference:.3f} vs {model} "
                f"{row.auc_model:.3f}"
                for row in rows.itertuples()
            )
            notes.append(
                f"Order changes with the level on the {SET_TITLES[split]}: {model} ranks "
                f"above {rows['reference'].iloc[0]} at some levels and below it at others "
                f"({described})."
            )
    return notes


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """AUC comparisons with the reference model per set and level, each with its own test."""
    settings = inputs.settings
    pooled = pooled_rows(inputs.predictions, inputs.classes)
    records = per_trial_comparisons(pooled, inputs.classes, REFERENCE_MODEL)
    for level in LEVELS:
        records += level_comparisons(
            pooled, level, inputs.classes, REFERENCE_MODEL, settings.resamples, settings.seed
        )
    # counts stay integers beside the per-trial rows, which have none
    compared = pd.DataFrame(records, columns=COLUMNS).astype(
        {"units": "Int64", "patients": "Int64", "trials": "Int64"}
    )
    order = {split: index for index, split in enumerate(sets_of(pooled))}
    compared = (
        compared.assign(set_order=compared["set"].map(order))
        .sort_values(["set_order", "model"], kind="stable")
        .drop(columns="set_order")
        .reset_index(drop=True)
    )
    return AnalysisResult(
        title=f"Comparisons with {REFERENCE_MODEL}, level by level",
        notes=[
            "Trained heads. Each p-value tests the two AUCs in its own row, at its own level: "
            "'image, per trial' is the mean of per-trial image AUCs (as in Tables 2-4) with a "
            "paired t-test over trials; the other rows use each unit's score averaged over "
            "trials (exam and patient: the mean of their images), difference = "
            f"{REFERENCE_MODEL} - model with a 95% paired patient-bootstrap CI "
            f"({settings.resamples} resamples). DeLong treats exams, or patients, as "
            "independent; at image level the p-value is the paired patient bootstrap's, since "
            "DeLong would take a patient's correlated images as independent cases.",
            *order_changes(compared),
        ],
        tables={"auc": compared},
    )
