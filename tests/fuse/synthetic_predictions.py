"""Predictions tables and run records written by hand, in the schema's columns."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fuse.schema import required_columns

CLASSES = ("VCD", "GC")


def head_rows(
    model: str,
    trial: int,
    scores: Sequence[float],
    labels: Sequence[str],
    splits: Sequence[str],
    patients: Sequence[str] | None = None,
    *,
    exams: Sequence[str] | None = None,
    fold: int = 0,
    head: str = "head",
    threshold: float = 0.5,
) -> pd.DataFrame:
    """One head's rows: row i is pair i; patients default to one per row, one exam each."""
    count = len(scores)
    patients = list(patients) if patients is not None else [f"P{i}" for i in range(count)]
    exams = list(exams) if exams is not None else [f"{patient}-E1" for patient in patients]
    scores = np.asarray(scores, dtype=float)
    frame = pd.DataFrame(
        {
            "row": np.arange(count),
            "image_path": [f"images/{i}.png" for i in range(count)],
            "patient_id": patients,
            "exam_id": exams,
            "site": "hospital_a",
            "label": list(labels),
            "split": list(splits),
            "model": model,
            "head": head,
            "trial": trial,
            "fold": fold,
            "threshold": threshold,
            "prob_VCD": (1 - scores).astype(np.float32),
            "prob_GC": scores.astype(np.float32),
        }
    )
    assert tuple(frame.columns) == required_columns(CLASSES)
    return frame


def runs_record(models: Sequence[str], heads: Sequence[dict] = ()) -> dict:
    """A runs.json with the sections the report reads; `heads` are the per-head records."""
    return {
        "note": "hand-made",
        "settings": {
            "classes": list(CLASSES),
            "warmup_epochs": 2,
            "epochs": 10,
            "selection": "val_loss",
            "split": "redraw",
            "seed": 0,
            "centre_external": False,
        },
        "models": {
            model: {"role": "proposed" if model == "M4" else "ablation"} for model in models
        },
        "learning_rate_search": {},
        "data": {},
        "runs": list(heads)
        or [
            {
                "model": model,
                "head": "head",
                "trial": 0,
                "fold": 0,
                "learning_rate": 1e-4,
                "best_epoch": 5,
                "first_eligible_epoch": 3,
                "fallback_to_last_epoch": False,
            }
            for model in models
        ],
    }
