"""Operating points for a target sensitivity and a target specificity, chosen on validation.

Each head's cut is chosen on its own validation rows (the highest cut reaching the target
sensitivity; the lowest reaching the target specificity) and applied to its test and
external rows, where sensitivity and specificity are counted over every trial's images
together, with 95% patient-bootstrap CIs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fuse.analyses.base import AnalysisInputs, AnalysisResult, refit_per_head
from pipeline.metrics import (
    threshold_for_sensitivity,
    threshold_for_specificity,
    weighted_share,
)
from pipeline.stats import bootstrap_weights, percentile_interval

CHOOSERS = {"sensitivity": threshold_for_sensitivity, "specificity": threshold_for_specificity}


def _rate(labels: np.ndarray, called_positive: np.ndarray, positive: bool) -> float:
    chosen = labels == int(positive)
    if not chosen.any():
        return float("nan")
    hits = called_positive[chosen] if positive else ~called_positive[chosen]
    return float(np.mean(hits))


def chosen_rows(
    inputs: AnalysisInputs, target: str, value: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold-pooled test/external rows with each head's cut for `target` >= `value`, and per
    head the cut and what it gives on validation."""
    chosen = []

    def choose(validation: pd.DataFrame, evaluated: pd.DataFrame) -> pd.DataFrame:
        labels = validation["positive"].to_numpy(dtype=int)
        scores = validation["score"].to_numpy()
        threshold = CHOOSERS[target](labels, scores, value)
        called = scores >= threshold
        head = evaluated.iloc[0]
        chosen.append(
            {
                **{key: head[key] for key in ("model", "head", "trial", "fold")},
                "threshold": threshold,
                "val_sensitivity": _rate(labels, called, positive=True),
                "val_specificity": _rate(labels, called, positive=False),
            }
        )
        return evaluated.assign(threshold=threshold)

    return refit_per_head(inputs, choose), pd.DataFrame(chosen)


def operating_table(inputs: AnalysisInputs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per model, head, set and target: the cut, and the sensitivity and specificity it gives."""
    settings = inputs.settings
    records, per_head = [], []
    for target, value in (
        ("sensitivity", settings.target_sensitivity),
        ("specificity", settings.target_specificity),
    ):
        rows, heads = chosen_rows(inputs, target, value)
        per_head.append(heads.assign(target=f"{target} {value:g}"))
        validation = heads.groupby(["model", "head"], sort=False)
        for (model, head, split), group in rows.groupby(["model", "head", "split"], sort=False):
            labels = group["positive"].to_numpy(dtype=int)
            called = (group["score"] >= group["threshold"]).to_numpy()
            patients = group["patient_id"].to_numpy()
            cuts = validation.get_group((model, head))
            record = {
                "level": "image",
                "model": model,
                "head": head,
                "set": split,
                "target": f"{target} {value:g}",
                "trials": group["trial"].nunique(),
                **cuts[["threshold", "val_sensitivity", "val_specificity"]].mean().to_dict(),
            }
            weights = bootstrap_weights(patients, settings.resamples, settings.seed)
            for measure, positive in (("sensitivity", True), ("specificity", False)):
                hits = called if positive else ~called
                drawn = weighted_share(hits, labels == int(positive), weights)
                low, high = percentile_interval(drawn)
                record |= {
                    measure: _rate(labels, called, positive),
                    f"{measure}_low": low,
                    f"{measure}_high": high,
                }
            records.append(record)
    return pd.DataFrame(records), pd.concat(per_head, ignore_index=True)


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """Cuts for the target sensitivity and specificity, and what they give on test and external."""
    settings = inputs.settings
    table, per_head = operating_table(inputs)
    return AnalysisResult(
        title="Operating points",
        notes=[
            f"Targets: sensitivity {settings.target_sensitivity:g} and specificity "
            f"{settings.target_specificity:g} (report settings target_sensitivity, "
            "target_specificity). Each head's cut is chosen on its own validation rows "
            "(threshold: the mean over heads; val_*: what the cuts give there, mean over "
            "heads) and applied unchanged to its test and external rows. Image level; "
            "sensitivity and specificity count every trial's images together, 95% CIs by "
            f"patient bootstrap ({settings.resamples} resamples)."
        ],
        tables={"points": table, "per_head": per_head},
        shown=("points",),
    )
