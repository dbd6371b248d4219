"""Patient-level, stratified, seeded train/val/test splits.

A patient's rows always land in one split, so no image or report of a test patient is
seen in training. Rows whose manifest already names a split keep it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import UserError

ASSIGNED_SPLITS = ("train", "val", "test")


def assign_splits(
    table: pd.DataFrame, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> pd.Series:
    """Give every row without a split one of train/val/test, patient by patient.

    Patients are stratified by their most frequent label and shuffled with `seed`.

    Args:
        table: a validated manifest (columns patient_id, label, split).
        fractions: shares of patients for train, val and test; they must sum to 1.
        seed: the shuffle seed; the same seed gives the same split.

    Returns:
        The split of every row, aligned with `table`.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise UserError(
            f"split fractions must be three non-negative shares summing to 1, got {list(fractions)}"
        )
    splits = table["split"].copy()
    unassigned = table[splits == ""]
    patient_labels = unassigned.groupby("patient_id")["label"].agg(
        lambda labels: labels.mode().iloc[0]
    )
    rng = np.random.default_rng(seed)
    split_of_patient: dict[str, str] = {}
    for label in sorted(patient_labels.unique()):
        patients = sorted(patient_labels[patient_labels == label].index)
        patients = [patients[i] for i in rng.permutation(len(patients))]
        n_train = round(fractions[0] * len(patients))
        n_val = round(fractions[1] * len(patients))
        for position, patient in enumerate(patients):
            if position < n_train:
                split_of_patient[patient] = "train"
            elif position < n_train + n_val:
                split_of_patient[patient] = "val"
            else:
                split_of_patient[patient] = "test"
    blank = splits == ""
    splits[blank] = table.loc[blank, "patient_id"].map(split_of_patient)
    return splits


SPLIT_MODES = {
    "redraw": "a new seeded 8:1:1 patient split for every trial",
    "fixed": "one patient split for all trials; only the training seed changes",
    "kfold": "patient-grouped, stratified k-fold: every patient is a test patient once per "
    "trial, and validation patients are carved from the training folds",
}


@dataclass(frozen=True)
class TrialSplit:
    """Where every row goes in one trial (and fold) of the protocol."""

    trial: int
    fold: int  # 0 unless the mode is kfold
    seed: int  # seeds both this split and the heads trained on it
    splits: pd.Series  # train/val/test/external per row, aligned with the manifest


def _patient_labels(table: pd.DataFrame) -> pd.Series:
    return table.groupby("patient_id")["label"].agg(lambda labels: labels.mode().iloc[0])


def _kfold_splits(
    table: pd.DataFrame, folds: int, fractions: Sequence[float], seed: int
) -> list[pd.Series]:
    open_rows = table["split"] == ""
    if (table.loc[~open_rows, "split"] != "external").any():
        raise UserError(
            "split mode kfold assigns every internal patient itself; the manifest names "
            "train/val/test for some rows: clear those or use split mode fixed"
        )
    patient_labels = _patient_labels(table[open_rows])
    rng = np.random.default_rng(seed)
    fold_of_patient: dict[str, int] = {}
    for label in sorted(patient_labels.unique()):
        patients = sorted(patient_labels[patient_labels == label].index)
        if len(patients) < folds:
            raise UserError(
                f"kfold with {folds} folds needs at least {folds} patients of each label; "
                f"label {label} has {len(patients)}"
            )
        for position, index in enumerate(rng.permutation(len(patients))):
            fold_of_patient[patients[index]] = position % folds
    val_share = fractions[1] / (fractions[0] + fractions[1])
    result = []
    for fold in range(folds):
        rest = table[open_rows & (table["patient_id"].map(fold_of_patient) != fold)]
        rest_splits = assign_splits(
            rest.assign(split=""), (1.0 - val_share, val_share, 0.0), seed * 1000 + fold
        )
        splits = table["split"].copy()
        in_fold = open_rows & (table["patient_id"].map(fold_of_patient) == fold)
        splits[in_fold] = "test"
        splits[rest_splits.index] = rest_splits
        result.append(splits)
    return result


def plan_trials(
    table: pd.DataFrame,
    mode: str,
    trials: int,
    folds: int = 5,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> list[TrialSplit]:
    """The splits of every trial (and fold) of the protocol.

    Trial t uses seed `seed + t`. Rows whose manifest names a split keep it (in kfold, only
    `external` may be named).

    Args:
        table: a validated manifest.
        mode: a key of SPLIT_MODES.
        trials: how many trials (at least 1).
        folds: folds per trial in kfold mode (at least 2).
        fractions: train/val/test shares; in kfold mode only train:val matters.
        seed: the first trial's seed.

    Raises:
        UserError: an unknown mode, a bad count, or too few patients for the folds.
    """
    if mode not in SPLIT_MODES:
        raise UserError(f"split mode {mode!r}: choose from {', '.join(SPLIT_MODES)}")
    if trials < 1 or (mode == "kfold" and folds < 2):
        raise UserError(f"need at least 1 trial and, for kfold, 2 folds; got {trials}, {folds}")
    plan = []
    for trial in range(trials):
        trial_seed = seed + trial
        if mode == "kfold":
            for fold, splits in enumerate(_kfold_splits(table, folds, fractions, trial_seed)):
                plan.append(TrialSplit(trial, fold, trial_seed, splits))
        else:
            split_seed = trial_seed if mode == "redraw" else seed
            plan.append(
                TrialSplit(trial, 0, trial_seed, assign_splits(table, fractions, split_seed))
            )
    return plan


def labelled_subset(
    table: pd.DataFrame, train_rows: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """The training rows of a stratified share of the training patients (label efficiency).

    Each class keeps round(fraction x its patients), at least one; the patients come from
    one seeded order per class, so a smaller fraction's patients are part of every larger
    fraction's (nested subsets: a learning curve then compares like with like).

    Args:
        table: a validated manifest (patient_id, label), positions as in `train_rows`.
        train_rows: positions of the training rows.
        fraction: the share of training patients to keep, in (0, 1].
        seed: the order of patients; the same seed keeps the same patients.

    Returns:
        The kept training rows, in the order given.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"label fraction {fraction}: give a share of patients in (0, 1]")
    if fraction == 1:
        return train_rows
    training = table.iloc[train_rows]
    labels = _patient_labels(training)
    rng = np.random.default_rng(seed)
    kept: list[str] = []
    for label in sorted(labels.unique()):
        patients = labels.index[labels == label].to_numpy()
        order = rng.permutation(np.sort(patients))
        kept.extend(order[: max(1, round(fraction * len(patients)))])
    return train_rows[training["patient_id"].isin(kept).to_numpy()]
