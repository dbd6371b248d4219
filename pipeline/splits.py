"""Patient-level, stratified, seeded train/val/test splits.

A patient's rows always land in one split, so no image or report of a test patient is
seen in training. Rows whose manifest already names a split keep it.
"""

from __future__ import annotations

from collections.abc import Sequence

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
