"""Label efficiency: test and external AUC against the share of training patients.

Read from the predictions table of a protocol run with several `label_fractions` (its
heads trained on stratified, nested shares of each trial's training patients, validation
and test patients fixed). Per model, head, set and fraction: AUC per trial, then mean and
SD over trials (each trial draws its own patients, so the SD is over draws and splits).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fuse.analyses.base import SET_TITLES, AnalysisInputs, AnalysisResult
from fuse.evaluate import scored_rows
from fuse.schema import EVALUATED_SETS
from pipeline.metrics import roc_auc
from pipeline.stats import mean_sd

KEYS = ["model", "head", "split", "fraction"]


def curve_table(predictions: pd.DataFrame, classes: tuple[str, ...]) -> pd.DataFrame:
    """One row per model, head, set and fraction: AUC mean and SD over trials."""
    scored = scored_rows(predictions[predictions["split"].isin(EVALUATED_SETS)], classes)
    # external rows are scored by every fold's head: average them per row first
    pooled = (
        scored.groupby([*KEYS, "trial", "row"], sort=False)
        .agg(score=("score", "mean"), positive=("positive", "first"))
        .reset_index()
    )
    per_trial = (
        pooled.groupby([*KEYS, "trial"], sort=False)
        .apply(
            lambda rows: roc_auc(rows["positive"].to_numpy(dtype=int), rows["score"].to_numpy()),
            include_groups=False,
        )
        .rename("auc")
        .reset_index()
    )
    patients = (
        predictions[predictions["split"] == "train"]
        .groupby(["model", "head", "fraction", "trial", "fold"])["patient_id"]
        .nunique()
        .groupby(["model", "head", "fraction"])
        .mean()
    )
    records = []
    for (model, head, split, fraction), group in per_trial.groupby(KEYS, sort=False):
        mean, sd = mean_sd(group["auc"].to_numpy())
        records.append(
            {
                "level": "image",
                "set": split,
                "model": model,
                "head": head,
                "fraction": fraction,
                "training_patients": float(patients.get((model, head, fraction), np.nan)),
                "trials": group["trial"].nunique(),
                "auc": mean,
                "auc_sd": sd,
            }
        )
    return pd.DataFrame(records).sort_values(["set", "model", "head", "fraction"])


def figure_of(curve: pd.DataFrame) -> Figure:
    """AUC against the share of training patients, one panel per set, SD as a band."""
    sets = [split for split in SET_TITLES if split in set(curve["set"])]
    figure = Figure(figsize=(6.4 * len(sets), 4.2), layout="tight")
    axes = np.atleast_1d(figure.subplots(1, len(sets), squeeze=False)[0])
    for axis, split in zip(axes, sets, strict=True):
        for (model, head), rows in curve[curve["set"] == split].groupby(
            ["model", "head"], sort=False
        ):
            percent = rows["fraction"].to_numpy() * 100
            line = axis.plot(percent, rows["auc"], marker="o", label=f"{model} {head}")[0]
            axis.fill_between(
                percent,
                rows["auc"] - rows["auc_sd"],
                rows["auc"] + rows["auc_sd"],
                color=line.get_color(),
                alpha=0.15,
            )
        axis.set_xscale("log")
        axis.set(
            title=f"Label efficiency, {SET_TITLES[split]}",
            xlabel="training patients used (%, log scale)",
            ylabel="AUC, image level (mean and SD over trials)",
        )
        axis.legend(fontsize="small", loc="lower right")
    return figure


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """The learning curves of every model and head of the label-efficiency run."""
    title = "Label efficiency"
    table = inputs.label_efficiency
    if table is None or table.empty:
        return AnalysisResult(
            title=title,
            notes=[
                "Not run: the report was given no label-efficiency protocol folder "
                "(`--label-efficiency`; under DVC the label_efficiency stage)."
            ],
        )
    curve = curve_table(table, inputs.classes)
    return AnalysisResult(
        title=title,
        notes=[
            "Heads and probes trained on stratified, nested shares of each trial's training "
            "patients (training_patients: their mean number over trials); validation and "
            "test patients are the trial's own at every share. AUC at image level, mean and "
            "SD over trials (each trial draws its own patients)."
        ],
        tables={"curve": curve},
        figures={"curve": figure_of(curve)},
    )
