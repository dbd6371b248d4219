"""What a fitted head says when one of its inputs is replaced: the occlusion and swap
conditions that the modality analyses read from the predictions table.

Every condition changes the head's own (prepared) inputs of the evaluated rows and
nothing else, so no head is retrained and the table's row for a pair under a condition
sits beside its observed row. A replaced vector comes from the same split (test rows
from test rows), never from the pair's own patient, which keeps the vectors' marginal
distribution and leaves only the link between the pair's inputs broken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fuse.head import FittedHead
from fuse.schema import OBSERVED

MODALITY_TITLES = {"image": "image", "text": "report"}
CONDITIONS = {
    OBSERVED: "the pair as it is",
    "image_permuted": "image vector replaced by that of another patient of the same split "
    "(the headline occlusion: the replaced vectors keep their distribution)",
    "image_mean": "image vector replaced by the training rows' mean (a missing image)",
    "text_permuted": "report vector replaced by that of another patient of the same split "
    "(the headline occlusion)",
    "text_mean": "report vector replaced by the training rows' mean (a missing report)",
    "text_swapped": "report vector replaced by that of a patient of the other class of the "
    "same split (a report contradicting the image)",
}
NO_SOURCE = -1  # source_row of conditions that take no other row's vector


@dataclass(frozen=True)
class Condition:
    """One condition's rows, the rows whose vector each received, and the probabilities."""

    name: str
    rows: np.ndarray  # row indices scored under the condition
    source_rows: np.ndarray  # the row whose vector replaced theirs, NO_SOURCE for the mean
    probabilities: np.ndarray  # [rows, classes]


def conditions_of(modalities: Sequence[str]) -> list[str]:
    """The conditions that apply to a head of these input modalities: both image and report
    must be inputs of their own, or nothing is left to compare."""
    if not {"image", "text"} <= set(modalities):
        return []
    return [name for name in CONDITIONS if name != OBSERVED]


def other_patient_rows(patients: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each row, a row of another patient: rows in a random patient order, rolled by
    the largest patient's row count, so no row lands in its own patient's block.

    Returns positions into `patients`; a row keeps itself only when one patient holds more
    than half of the rows (nothing else to take).
    """
    order_of_patients = rng.permutation(np.unique(patients))
    rank = {patient: position for position, patient in enumerate(order_of_patients)}
    ordered = np.array(
        sorted(range(len(patients)), key=lambda row: (rank[patients[row]], rng.random()))
    )
    largest = int(np.max(np.unique(patients, return_counts=True)[1]))
    if len(patients) < 2 * largest:
        return np.arange(len(patients))
    partner = np.empty(len(patients), dtype=np.int64)
    partner[ordered] = np.roll(ordered, largest)
    return partner


def other_class_rows(
    patients: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """For each row, a random row of another patient whose label differs (-1 if none)."""
    partner = np.full(len(labels), NO_SOURCE, dtype=np.int64)
    for label in np.unique(labels):
        mine = np.flatnonzero(labels == label)
        theirs = np.flatnonzero(labels != label)
        if len(theirs):
            partner[mine] = theirs[rng.integers(len(theirs), size=len(mine))]
    different = partner >= 0
    same_patient = different & (patients[np.maximum(partner, 0)] == patients)
    partner[same_patient] = NO_SOURCE
    return partner


def _replaced(
    prepared: Sequence[torch.Tensor],
    position: int,
    rows: np.ndarray,
    sources: np.ndarray | None,
    mean: torch.Tensor,
) -> list[torch.Tensor]:
    """The prepared inputs of `rows`, input `position` taken from `sources` (or the mean)."""
    index = torch.from_numpy(rows)
    replaced = [vectors[index] for vectors in prepared]
    if sources is None:
        replaced[position] = mean.expand(len(rows), -1).clone()
    else:
        replaced[position] = prepared[position][torch.from_numpy(sources)]
    return replaced


def score_conditions(
    head: FittedHead,
    prepared: Sequence[torch.Tensor],
    rows_by_set: Mapping[str, np.ndarray],
    patients: np.ndarray,
    labels: np.ndarray,
    seed: int,
    exams: np.ndarray | None = None,
) -> list[Condition]:
    """Score every condition that applies to `head` on the rows of each evaluated set.

    Args:
        head: a fitted head; `prepared` are its inputs as `head.prepared` gives them.
        rows_by_set: the rows of each set (test, external) to score; partners come from
            the same set.
        patients, labels: every row's patient and class index.
        seed: the draw of partners (the same for every head of one trial and set).
        exams: every row's exam, for an exam-level head (which pools the replaced rows of
            each exam; a report replaced per image becomes the mean of the reports given).
    """
    modalities = [modality for _, modality in head.model.inputs]
    conditions = conditions_of(modalities)
    results: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
        name: [] for name in conditions
    }
    for set_index, rows in enumerate(rows_by_set.values()):
        if not len(rows) or not conditions:
            continue
        rng = np.random.default_rng([seed, set_index])
        others = rows[other_patient_rows(patients[rows], rng)]
        swapped = other_class_rows(patients[rows], labels[rows], rng)
        has_swap = swapped >= 0
        for name in conditions:
            modality, how = name.split("_")
            position = modalities.index(modality)
            mean = head.absent_[position]  # what the head was trained to read as missing
            if how == "permuted":
                scored, sources = rows, others
            elif how == "mean":
                scored, sources = rows, None
            else:
                scored, sources = rows[has_swap], rows[swapped[has_swap]]
            if not len(scored):
                continue
            probabilities = head.probabilities_of_prepared(
                _replaced(prepared, position, scored, sources, mean),
                None if exams is None else exams[scored],
            )
            results[name].append(
                (
                    scored,
                    sources if sources is not None else np.full(len(scored), NO_SOURCE),
                    probabilities,
                )
            )
    return [
        Condition(
            name,
            np.concatenate([part[0] for part in parts]),
            np.concatenate([part[1] for part in parts]),
            np.concatenate([part[2] for part in parts]),
        )
        for name, parts in results.items()
        if parts
    ]
