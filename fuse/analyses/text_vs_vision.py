"""Text against vision: a contradicting report, and a missing one.

Contradicting report: each test and external pair scored with the report of a patient of
the other class of the same set (condition text_swapped). The decision at the head's
validation cut either keeps the image's class (follows the image; it is the pair's true
class) or takes the swapped report's class (follows the report): the share following the
report is what a model that trusts text over the image shows ("blind faith in text").

Missing report: the fused head scored with the report replaced by the training mean
(text_mean), which is what a head trained with modality dropout saw for a dropped report,
beside the fallback of the image-only model (M1) on the same pairs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fuse.analyses.base import SET_TITLES, AnalysisInputs, AnalysisResult, sets_of
from fuse.analyses.contribution import KEYS, beside_observed, pooled_condition
from fuse.evaluate import pooled_rows
from fuse.schema import OBSERVED
from pipeline.metrics import roc_auc
from pipeline.stats import mean_sd

IMAGE_ONLY_MODEL = "M1"


def _summarised(per_trial: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """Mean and SD over trials of `columns`, per model, head and set."""
    records = []
    for (model, head, split), group in per_trial.groupby(KEYS, sort=False):
        record = {"level": "image", "set": split, "model": model, "head": head}
        record["trials"] = group["trial"].nunique()
        record["images"] = int(group["images"].iloc[0])
        for column in columns:
            record[column], record[f"{column}_sd"] = mean_sd(group[column].to_numpy())
        records.append(record)
    return pd.DataFrame(records)


def swap_table(inputs: AnalysisInputs) -> pd.DataFrame:
    """Accuracy with the observed and with a contradicting report, and whom decisions follow."""
    joined = beside_observed(
        pooled_condition(inputs, OBSERVED), pooled_condition(inputs, "text_swapped"), "swapped"
    )
    records = []
    for (model, head, split, trial), rows in joined.groupby([*KEYS, "trial"], sort=False):
        truth = rows["positive"].to_numpy()
        as_observed = (rows["score"] >= rows["threshold"]).to_numpy()
        as_swapped = (rows["score_swapped"] >= rows["threshold"]).to_numpy()
        records.append(
            {
                "model": model,
                "head": head,
                "split": split,
                "trial": trial,
                "images": len(rows),
                "accuracy_observed": float(np.mean(as_observed == truth)),
                "accuracy_swapped": float(np.mean(as_swapped == truth)),
                # The swapped report's class is the other class: a decision follows it
                # exactly when it is not the image's (true) class.
                "follows_report": float(np.mean(as_swapped != truth)),
                "changed_by_swap": float(np.mean(as_swapped != as_observed)),
            }
        )
    return _summarised(
        pd.DataFrame(records),
        ["accuracy_observed", "accuracy_swapped", "follows_report", "changed_by_swap"],
    )


def missing_report_table(inputs: AnalysisInputs) -> pd.DataFrame:
    """AUC and accuracy with the report as observed, as missing (training mean), and of the
    image-only model on the same pairs (the fallback)."""
    joined = beside_observed(
        pooled_condition(inputs, OBSERVED), pooled_condition(inputs, "text_mean"), "missing"
    )
    image_only = pooled_rows(
        inputs.predictions[inputs.predictions["model"] == IMAGE_ONLY_MODEL], inputs.classes
    )
    fallback = {
        (head, split, trial): rows
        for (head, split, trial), rows in image_only.groupby(["head", "split", "trial"])
    }
    records = []
    for (model, head, split, trial), rows in joined.groupby([*KEYS, "trial"], sort=False):
        truth = rows["positive"].to_numpy()
        record = {
            "model": model,
            "head": head,
            "split": split,
            "trial": trial,
            "images": len(rows),
            "auc_observed": roc_auc(truth.astype(int), rows["score"].to_numpy()),
            "auc_missing_report": roc_auc(truth.astype(int), rows["score_missing"].to_numpy()),
            "accuracy_missing_report": float(
                np.mean((rows["score_missing"] >= rows["threshold"]).to_numpy() == truth)
            ),
            f"auc_{IMAGE_ONLY_MODEL}": np.nan,
        }
        image_rows = fallback.get((head, split, trial))
        if image_rows is not None:
            same = image_rows[image_rows["row"].isin(rows["row"])]
            record[f"auc_{IMAGE_ONLY_MODEL}"] = roc_auc(
                same["positive"].to_numpy(dtype=int), same["score"].to_numpy()
            )
        records.append(record)
    return _summarised(
        pd.DataFrame(records),
        [
            "auc_observed",
            "auc_missing_report",
            "accuracy_missing_report",
            f"auc_{IMAGE_ONLY_MODEL}",
        ],
    )


def figure_of(swap: pd.DataFrame, split: str) -> Figure:
    """Share of decisions that follow a contradicting report, per model (trained heads)."""
    rows = swap[(swap["set"] == split) & (swap["head"] == "head")]
    figure = Figure(figsize=(6.4, 3.8), layout="tight")
    axis = figure.subplots()
    positions = np.arange(len(rows))
    axis.bar(positions, rows["follows_report"], yerr=rows["follows_report_sd"], capsize=3)
    axis.set_xticks(positions, rows["model"])
    axis.set(
        title=f"Decisions that follow a contradicting report, {SET_TITLES[split]}",
        ylabel="share of pairs (mean over trials)",
        ylim=(0, 1),
    )
    return figure


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """The swap and missing-report tables of every model with an image and a report."""
    title = "Text against vision"
    if inputs.conditions is None or inputs.conditions.empty:
        return AnalysisResult(
            title=title,
            notes=["Not run: the protocol scored no pairs with an input replaced."],
        )
    swap = swap_table(inputs)
    modality_dropout = inputs.runs["settings"].get("modality_dropout", 0.0)
    return AnalysisResult(
        title=title,
        notes=[
            "Contradicting report: each test and external pair scored with the report of a "
            "patient of the other class of the same set. accuracy_swapped is against the "
            "pair's own (the image's) class; follows_report is the share of decisions, at "
            "the head's validation cut, that take the swapped report's class; "
            "changed_by_swap the share that differ from the observed decision. Image level, "
            "mean and SD over trials.",
            "Missing report: the report replaced by the training mean, the stand-in that "
            f"modality dropout trains the head on (this run: modality_dropout "
            f"{modality_dropout}); auc_{IMAGE_ONLY_MODEL} is the image-only model on the "
            "same pairs, the fallback for an exam without a report. The fused head with "
            "the mean report is the default, one model for both cases; with "
            "modality_dropout 0 it never saw a missing report in training.",
        ],
        tables={"contradicting_report": swap, "missing_report": missing_report_table(inputs)},
        figures={
            split: figure_of(swap, split)
            for split in sets_of(swap.rename(columns={"set": "split"}))
        },
    )
