"""How much each model leans on the image and on the report: occlusion and attribution.

Occlusion is model-agnostic: every head with an image and a report input scored the test
and external pairs again with one input replaced (fuse.counterfactual), by another
patient's vector of the same set (the headline: the replaced inputs keep their
distribution) or by the training mean. Per trial: the AUC as observed, as replaced, the
drop, and the share of decisions (at the head's validation cut) that change; then mean
(SD) over trials, and the drop's 95% CI and p-value by a paired patient bootstrap on the
trial-averaged scores. Attribution: each input's share of |gradient x input| of the
positive log-odds on the vector the classifier reads, per pair, averaged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fuse.analyses.base import SET_TITLES, AnalysisInputs, AnalysisResult, sets_of
from fuse.counterfactual import MODALITY_TITLES
from fuse.evaluate import averaged_over_trials, pool_folds, scored_rows
from fuse.schema import CONDITION_COLUMN, OBSERVED, attribution_column
from pipeline.metrics import roc_auc, weighted_auc
from pipeline.stats import (
    bootstrap_p_value,
    bootstrap_weights,
    format_mean_sd,
    mean_sd,
    percentile_interval,
)

HEADLINE = "permuted"
REPLACEMENTS = {"permuted": "another patient's vector", "mean": "the training mean"}
KEYS = ["model", "head", "split"]


def pooled_condition(inputs: AnalysisInputs, condition: str) -> pd.DataFrame:
    """The fold-pooled scored rows of one condition (observed: the table itself)."""
    frame = (
        inputs.predictions
        if condition == OBSERVED
        else inputs.conditions[inputs.conditions[CONDITION_COLUMN] == condition]
    )
    return pool_folds(scored_rows(frame, inputs.classes))


def beside_observed(observed: pd.DataFrame, changed: pd.DataFrame, suffix: str) -> pd.DataFrame:
    """The observed pooled rows that were also scored under a condition, with that score
    as `score_<suffix>`."""
    return observed.merge(
        changed[[*KEYS, "trial", "row", "score"]],
        on=[*KEYS, "trial", "row"],
        suffixes=("", f"_{suffix}"),
    )


def _per_trial(observed: pd.DataFrame, replaced: pd.DataFrame) -> pd.DataFrame:
    joined = beside_observed(observed, replaced, "replaced")
    records = []
    for (model, head, split, trial), rows in joined.groupby([*KEYS, "trial"], sort=False):
        labels = rows["positive"].to_numpy(dtype=int)
        decided = rows["score"] >= rows["threshold"]
        decided_replaced = rows["score_replaced"] >= rows["threshold"]
        records.append(
            {
                "model": model,
                "head": head,
                "split": split,
                "trial": trial,
                "auc_observed": roc_auc(labels, rows["score"].to_numpy()),
                "auc_replaced": roc_auc(labels, rows["score_replaced"].to_numpy()),
                "changed": float(np.mean(decided != decided_replaced)),
            }
        )
    return pd.DataFrame(records)


def _bootstrap_drop(
    observed: pd.DataFrame, replaced: pd.DataFrame, resamples: int, seed: int
) -> pd.DataFrame:
    """Per (model, head, set): the drop in AUC of trial-averaged scores, its CI and p."""
    ours = averaged_over_trials(observed)
    theirs = averaged_over_trials(replaced)
    records = []
    for (model, head, split), rows in ours.groupby(KEYS, sort=False):
        joined = rows.merge(theirs, on=[*KEYS, "row"], suffixes=("", "_replaced"))
        labels = joined["positive"].to_numpy(dtype=int)
        weights = bootstrap_weights(joined["patient_id"].to_numpy(), resamples, seed)
        drops = weighted_auc(labels, joined["score"].to_numpy(), weights) - weighted_auc(
            labels, joined["score_replaced"].to_numpy(), weights
        )
        low, high = percentile_interval(drops)
        records.append(
            {
                "model": model,
                "head": head,
                "split": split,
                "images": len(joined),
                "patients": joined["patient_id"].nunique(),
                "drop_low": low,
                "drop_high": high,
                "p_value": bootstrap_p_value(drops),
            }
        )
    return pd.DataFrame(records)


def occlusion_table(inputs: AnalysisInputs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per set, model, head, modality and replacement; and the same per trial."""
    observed = pooled_condition(inputs, OBSERVED)
    settings = inputs.settings
    frames, per_trial = [], []
    for modality, title in MODALITY_TITLES.items():
        for replacement in REPLACEMENTS:
            condition = f"{modality}_{replacement}"
            if not (inputs.conditions[CONDITION_COLUMN] == condition).any():
                continue
            replaced = pooled_condition(inputs, condition)
            trials = _per_trial(observed, replaced)
            trials["drop"] = trials["auc_observed"] - trials["auc_replaced"]
            per_trial.append(trials.assign(modality=title, replaced_by=REPLACEMENTS[replacement]))
            summary = trials.groupby(KEYS, sort=False).agg(
                trials=("trial", "nunique"),
                auc_observed=("auc_observed", "mean"),
                auc_replaced=("auc_replaced", "mean"),
                drop=("drop", "mean"),
                drop_sd=("drop", lambda values: mean_sd(values.to_numpy())[1]),
                changed_decisions=("changed", "mean"),
                changed_sd=("changed", lambda values: mean_sd(values.to_numpy())[1]),
            )
            tested = _bootstrap_drop(
                observed.merge(replaced[[*KEYS, "trial", "row"]], on=[*KEYS, "trial", "row"]),
                replaced,
                settings.resamples,
                settings.seed,
            )
            frames.append(
                summary.reset_index()
                .merge(tested, on=KEYS)
                .assign(modality=title, replaced_by=REPLACEMENTS[replacement])
            )
    table = pd.concat(frames, ignore_index=True).rename(columns={"split": "set"})
    table.insert(0, "level", "image")
    first = ["level", "set", "model", "head", "modality", "replaced_by", "trials"]
    trials = pd.concat(per_trial, ignore_index=True).rename(columns={"split": "set"})
    trials.insert(0, "level", "image")
    return table[first + [column for column in table if column not in first]], trials


def attribution_table(inputs: AnalysisInputs) -> pd.DataFrame:
    """Mean attribution share of each modality per set, model and head, mean (SD) over
    trials of the per-pair shares' mean."""
    columns = [
        attribution_column(modality)
        for modality in MODALITY_TITLES
        if attribution_column(modality) in inputs.predictions
    ]
    if not columns:
        return pd.DataFrame()
    rows = inputs.predictions[inputs.predictions["split"].isin(list(SET_TITLES))]
    rows = rows.dropna(subset=columns)
    per_trial = rows.groupby([*KEYS, "trial"], sort=False)[columns].mean().reset_index()
    records = []
    for (model, head, split), group in per_trial.groupby(KEYS, sort=False):
        record = {"level": "image", "set": split, "model": model, "head": head}
        record["trials"] = group["trial"].nunique()
        for modality, title in MODALITY_TITLES.items():
            column = attribution_column(modality)
            if column in group:
                record[f"{title}_share"], record[f"{title}_share_sd"] = mean_sd(
                    group[column].to_numpy()
                )
        records.append(record)
    return pd.DataFrame(records)


def leaning_table(occlusion: pd.DataFrame, attribution: pd.DataFrame) -> pd.DataFrame:
    """Which modality each model leans on: the larger headline drop, when its CI excludes
    0 ("neither" otherwise), beside both drops and the image's attribution share."""
    headline = occlusion[occlusion["replaced_by"] == REPLACEMENTS[HEADLINE]]
    records = []
    for (split, model, head), rows in headline.groupby(["set", "model", "head"], sort=False):
        drops = rows.set_index("modality")
        image, report = (drops.loc[MODALITY_TITLES[key]] for key in ("image", "text"))
        larger = image if image["drop"] >= report["drop"] else report
        leans_on = larger.name if larger["drop_low"] > 0 else "neither"
        records.append(
            {
                "level": "image",
                "set": split,
                "model": model,
                "head": head,
                "trials": int(image["trials"]),
                "image_drop": format_mean_sd(image["drop"], image["drop_sd"]),
                "report_drop": format_mean_sd(report["drop"], report["drop_sd"]),
                "leans_on": leans_on,
            }
        )
    table = pd.DataFrame(records)
    if len(attribution):
        shares = attribution[["set", "model", "head", "image_share"]]
        table = table.merge(shares, on=["set", "model", "head"], how="left")
    return table


def figure_of(occlusion: pd.DataFrame, split: str) -> Figure:
    """Headline AUC drop per model and modality (trained heads), SD over trials as bars."""
    rows = occlusion[
        (occlusion["set"] == split)
        & (occlusion["head"] == "head")
        & (occlusion["replaced_by"] == REPLACEMENTS[HEADLINE])
    ]
    models = list(dict.fromkeys(rows["model"]))
    figure = Figure(figsize=(6.4, 4.0), layout="tight")
    axis = figure.subplots()
    width = 0.38
    for offset, title in zip((-width / 2, width / 2), MODALITY_TITLES.values(), strict=True):
        bars = rows[rows["modality"] == title].set_index("model").reindex(models)
        axis.bar(
            np.arange(len(models)) + offset,
            bars["drop"],
            width,
            yerr=bars["drop_sd"],
            label=f"{title} replaced",
            capsize=3,
        )
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xticks(np.arange(len(models)), models)
    axis.set(
        title=f"AUC drop when one input is replaced, {SET_TITLES[split]}",
        ylabel="AUC observed - AUC replaced (mean over trials)",
    )
    axis.legend(fontsize="small")
    return figure


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """Occlusion drops and attribution shares of every model with an image and a report."""
    if inputs.conditions is None or inputs.conditions.empty:
        return AnalysisResult(
            title="Modality contribution",
            notes=[
                "Not run: the protocol scored no pairs with an input replaced "
                "(no model has both an image and a report input, or conditions: false)."
            ],
        )
    occlusion, per_trial = occlusion_table(inputs)
    attribution = attribution_table(inputs)
    shown = ("leaning", "occlusion")
    tables = {
        "leaning": leaning_table(occlusion, attribution),
        "occlusion": occlusion,
        "occlusion_per_trial": per_trial,
    }
    if len(attribution):
        tables["attribution"] = attribution
        shown = (*shown, "attribution")
    return AnalysisResult(
        title="Modality contribution",
        notes=[
            "Each head scored the test and external pairs again with its image, then its "
            "report, replaced: by another patient's vector of the same set (the headline: "
            "the replaced inputs keep their distribution, only the pair's link breaks) and by "
            "the training mean. drop = AUC observed - AUC replaced, per trial, mean and SD "
            "over trials; drop_low/drop_high/p_value: paired patient bootstrap "
            f"({inputs.settings.resamples} resamples) of trial-averaged scores. "
            "changed_decisions: share of pairs whose decision at the head's validation cut "
            "changes. Image level.",
            "leans_on: the modality whose replacement costs more AUC, when that drop's CI "
            "excludes 0; neither otherwise.",
            "Attribution: each input's share of |gradient x input| of the positive log-odds "
            "on the vector the classifier reads (the probe: weights x inputs), per pair, "
            "then averaged over the set's pairs; mean and SD over trials.",
        ],
        tables=tables,
        figures={
            split: figure_of(occlusion, split)
            for split in sets_of(occlusion.rename(columns={"set": "split"}))
        },
        shown=shown,
    )
