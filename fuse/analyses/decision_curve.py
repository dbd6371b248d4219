"""Decision curves: net benefit of treating by each model's score, against treat-all and
treat-none, over threshold probabilities 0.01 to 0.99."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fuse.analyses.base import SET_TITLES, AnalysisInputs, AnalysisResult, sets_of
from fuse.evaluate import pooled_rows
from pipeline.metrics import net_benefit

CURVE_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
TREAT_ALL, TREAT_NONE = "treat all", "treat none"


def curves(pooled: pd.DataFrame) -> pd.DataFrame:
    """Net benefit per trained model, set and threshold probability, mean over trials; with
    treat-all (every case treated, from the same rows) and treat-none (0)."""
    heads = pooled[pooled["head"] == "head"]
    frames = []
    for (split, model), rows in heads.groupby(["split", "model"], sort=False):
        benefit, treat_all = [], []
        for _, trial in rows.groupby("trial"):
            labels = trial["positive"].to_numpy()
            benefit.append(net_benefit(labels, trial["score"].to_numpy(), CURVE_THRESHOLDS))
            treat_all.append(net_benefit(labels, np.ones(len(labels)), CURVE_THRESHOLDS))
        frames.append(
            pd.DataFrame(
                {
                    "set": split,
                    "model": model,
                    "trials": rows["trial"].nunique(),
                    "threshold": CURVE_THRESHOLDS,
                    "net_benefit": np.mean(benefit, axis=0),
                    "treat_all": np.mean(treat_all, axis=0),
                    "treat_none": 0.0,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def at_thresholds(curve: pd.DataFrame, thresholds: tuple[float, ...]) -> pd.DataFrame:
    """The curves at a few threshold probabilities: one row per set and strategy."""
    chosen = curve[curve["threshold"].isin(np.round(thresholds, 2))]
    records = []
    for split, rows in chosen.groupby("set", sort=False):
        by_model = rows.pivot_table(
            index="model", columns="threshold", values="net_benefit", sort=False
        )
        trials = rows.groupby("model", sort=False)["trials"].first()
        reference = rows.groupby("threshold")["treat_all"].mean()  # same rows for every model
        for model, values in by_model.iterrows():
            records.append(
                {"set": split, "strategy": model, "trials": trials[model], **values.to_dict()}
            )
        records.append({"set": split, "strategy": TREAT_ALL, **reference.to_dict()})
        records.append(
            {"set": split, "strategy": TREAT_NONE, **dict.fromkeys(reference.index, 0.0)}
        )
    table = pd.DataFrame(records).astype({"trials": "Int64"})  # none for treat all/none
    table.insert(0, "level", "image")
    return table.rename(columns={value: f"net benefit at {value:g}" for value in thresholds})


def figure_of(curve: pd.DataFrame, split: str) -> Figure:
    """Every trained model's decision curve on one set, with treat-all and treat-none."""
    figure = Figure(figsize=(6.4, 5.0), layout="tight")
    axis = figure.subplots()
    rows = curve[curve["set"] == split]
    for model, group in rows.groupby("model", sort=False):
        axis.plot(group["threshold"], group["net_benefit"], label=model)
    treat_all = rows.groupby("threshold")["treat_all"].mean()
    axis.plot(treat_all.index, treat_all.to_numpy(), color="black", linestyle="--", label=TREAT_ALL)
    axis.axhline(0.0, color="grey", linestyle=":", label=TREAT_NONE)
    highest = float(max(rows["net_benefit"].max(), treat_all.max()))
    axis.set(
        title=f"Decision curve, {SET_TITLES[split]} (mean over trials)",
        xlabel="threshold probability",
        ylabel="net benefit",
        xlim=(0, 1),
        ylim=(-0.05, max(0.05, highest * 1.1)),  # treat-all dives below
    )
    axis.legend(fontsize="small", loc="upper right")
    return figure


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """Decision curves per set, and their values at the report's threshold probabilities."""
    pooled = pooled_rows(inputs.predictions, inputs.classes)
    curve = curves(pooled)
    return AnalysisResult(
        title="Decision curves",
        notes=[
            "Net benefit = TP/N - FP/N x p/(1 - p) at threshold probability p (treat when the "
            "positive probability is >= p), trained heads, image level, as scored (not "
            "recalibrated), per trial and then the mean over trials. Treat all: every image "
            "treated; treat none: 0."
        ],
        tables={
            "at_thresholds": at_thresholds(curve, inputs.settings.decision_thresholds),
            "curve": curve,
        },
        figures={split: figure_of(curve, split) for split in sets_of(pooled)},
        shown=("at_thresholds",),
    )
