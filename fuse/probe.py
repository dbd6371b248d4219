"""The logistic-regression probe trained beside every head, on the same vectors and split.

As in CLIP_benchmark, the regularisation strength is chosen on the validation split and
recorded with the result. Rows with identical inputs (the images of one report, for a
report-only model) are fitted once with their count as sample weight, which is the same
objective and much less work.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

PROBE_C_GRID = tuple(10.0**exponent for exponent in range(-4, 3))  # inverse L2 strength


@dataclass(frozen=True)
class ProbeResult:
    """Probabilities of every row, and the C that validation chose."""

    probabilities: np.ndarray  # [rows, classes]
    c: float
    val_loss: float


def fit_probe(
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    seed: int,
) -> ProbeResult:
    """Fit L2 logistic regressions on `train_rows` for each C and keep the best on validation.

    Args:
        inputs: row-aligned, already standardised input matrices; they are concatenated.
        labels: [rows] class indices.
        train_rows, val_rows: row indices.
        seed: for the solver's tie-breaking.
    """
    features = torch.cat(list(inputs), dim=1).numpy()
    train_x, train_y = features[train_rows.numpy()], labels[train_rows].numpy()
    unique_x, first, counts = np.unique(train_x, axis=0, return_index=True, return_counts=True)
    unique_y = train_y[first]
    if len(np.unique(np.c_[unique_x, unique_y], axis=0)) != len(unique_x):
        unique_x, unique_y, counts = train_x, train_y, np.ones(len(train_y))  # same x, two labels
    val_x, val_y = features[val_rows.numpy()], labels[val_rows].numpy()
    classes = np.arange(int(labels.max()) + 1)
    best: tuple[float, float, LogisticRegression] | None = None
    for c in PROBE_C_GRID:
        probe = LogisticRegression(C=c, max_iter=2000, random_state=seed)
        with warnings.catch_warnings():
            # At the weakest regularisation lbfgs may stop before its tolerance; the
            # validation loss judges the result either way.
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(unique_x, unique_y, sample_weight=counts)
        loss = log_loss(val_y, probe.predict_proba(val_x), labels=classes)
        if best is None or loss < best[0]:
            best = (loss, c, probe)
    loss, c, probe = best
    return ProbeResult(probabilities=probe.predict_proba(features), c=c, val_loss=float(loss))
