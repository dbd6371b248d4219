"""Training: learning rates, kept epochs, heads whose kept epoch is the first eligible one,
fallbacks to the last epoch, and trials that called one class for every pair."""

from __future__ import annotations

import pandas as pd

from fuse.analyses.base import AnalysisInputs, AnalysisResult, sets_of
from fuse.evaluate import pooled_rows, trial_metrics


def flagged_by_warmup(runs: pd.DataFrame) -> pd.Series:
    """True for a head whose kept epoch is its first eligible one: the warm-up length, not
    the validation data, decided its selection."""
    return runs["first_eligible_epoch"].notna() & (
        runs["best_epoch"] == runs["first_eligible_epoch"]
    )


def training_table(inputs: AnalysisInputs) -> tuple[pd.DataFrame, list[str]]:
    """One row per model's trained heads, and the sentences the table needs."""
    runs = pd.DataFrame(inputs.runs["runs"])
    heads = runs[runs["head"] == "head"].assign(decided_by_warmup=lambda r: flagged_by_warmup(r))
    pooled = pooled_rows(inputs.predictions, inputs.classes)
    per_trial = trial_metrics(pooled[pooled["head"] == "head"], inputs.classes)
    one_class = per_trial[per_trial["predicted_classes@0.5"] < 2]
    records, notes = [], []
    for model, rows in heads.groupby("model", sort=False):
        warmup = int(rows["decided_by_warmup"].sum())
        records.append(
            {
                "model": model,
                "heads": len(rows),
                "learning rate": ", ".join(f"{rate:g}" for rate in rows["learning_rate"].unique()),
                "kept epochs": ", ".join(str(int(epoch)) for epoch in rows["best_epoch"]),
                "kept epoch = first eligible": warmup,
                "fell back to the last epoch": int(
                    rows["fallback_to_last_epoch"].fillna(False).sum()
                ),
                **{
                    f"trials with one class for every {split} pair (0.5 cut)": int(
                        ((one_class["model"] == model) & (one_class["set"] == split)).sum()
                    )
                    for split in sets_of(pooled)
                },
            }
        )
        if warmup == len(rows):
            notes.append(
                f"Every {model} head kept its first eligible epoch: the warm-up length, not "
                "the validation data, chose these heads; a longer warm-up or patience would "
                "change them."
            )
    fallen = heads[heads["fallback_to_last_epoch"].fillna(False).astype(bool)]
    if len(fallen):
        listed = ", ".join(
            f"{row.model} trial {row.trial} fold {row.fold}" for row in fallen.itertuples()
        )
        notes.append(f"Fell back to the last epoch (no eligible epoch was better): {listed}.")
    return pd.DataFrame(records), notes


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """The training table: selection, kept epochs, warm-up-decided heads, fallbacks."""
    settings = inputs.runs["settings"]
    table, notes = training_table(inputs)
    return AnalysisResult(
        title="Training",
        notes=[
            f"Selection: {settings['selection']} after {settings['warmup_epochs']} warm-up "
            f"epochs, of {settings['epochs']}. 'kept epoch = first eligible' counts heads "
            "whose kept epoch is the first one selection could pick.",
            *notes,
        ],
        tables={"heads": table},
    )
