"""The logistic-regression probe trained beside every head, on the same vectors and split.

As in CLIP_benchmark, the regularisation strength is chosen on the validation split and
recorded with the result. Rows with identical inputs (the images of one report, for a
report-only model) are fitted once with their count as sample weight, which is the same
objective and much less work.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit, softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

PROBE_C_GRID = tuple(10.0**exponent for exponent in range(-4, 3))  # inverse L2 strength
_PREDICT_CHUNK_ROWS = 4096  # sklearn predicts in float64: a chunk at a time, not all rows


@dataclass(frozen=True)
class ProbeFit:
    """The logistic regression that validation chose: its weights and its C."""

    coef: np.ndarray  # [1, features] for two classes, else [classes, features]
    intercept: np.ndarray  # [1] or [classes]
    c: float
    val_loss: float

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Class probabilities [rows, classes] of `features` [rows, features], as
        scikit-learn's LogisticRegression computes them, a chunk of rows at a time."""
        return np.concatenate(
            [
                _probabilities(features[start : start + _PREDICT_CHUNK_ROWS], self)
                for start in range(0, len(features), _PREDICT_CHUNK_ROWS)
            ]
        )


def _probabilities(features: np.ndarray, fit: ProbeFit) -> np.ndarray:
    decision = features.astype(np.float64) @ fit.coef.T + fit.intercept
    if decision.shape[1] == 1:
        positive = expit(decision[:, 0])
        return np.c_[1 - positive, positive]
    return softmax(decision, axis=1)


def fit_probe(
    inputs: Sequence[torch.Tensor],
    labels: torch.Tensor,
    train_rows: torch.Tensor,
    val_rows: torch.Tensor,
    seed: int,
) -> ProbeFit:
    """Fit L2 logistic regressions on `train_rows` for each C and keep the best on validation.

    Args:
        inputs: row-aligned, already standardised input matrices; they are concatenated.
        labels: [rows] class indices.
        train_rows, val_rows: row indices.
        seed: for the solver's tie-breaking.
    """
    features = torch.cat(list(inputs), dim=1).numpy()
    train_x, train_y = features[train_rows.numpy()], labels[train_rows].numpy()
    first, group = _identical_rows(train_x)
    unique_x, unique_y, counts = train_x[first], train_y[first], np.bincount(group)
    if (unique_y[group] != train_y).any():  # the same vector under two labels
        unique_x, unique_y, counts = train_x, train_y, np.ones(len(train_y))
    del train_x
    # float64 and contiguous once, or every fit below would make its own copy.
    unique_x = np.ascontiguousarray(unique_x, dtype=np.float64)
    val_x, val_y = features[val_rows.numpy()], labels[val_rows].numpy()
    classes = np.arange(int(labels.max()) + 1)
    # From the strongest regularisation to the weakest, each fit starting at the last one's
    # weights: the same convex problems, but lbfgs needs a fraction of the iterations.
    probe = LogisticRegression(max_iter=2000, random_state=seed, warm_start=True)
    best: ProbeFit | None = None
    for c in sorted(PROBE_C_GRID):
        probe.set_params(C=c)
        with warnings.catch_warnings():
            # At the weakest regularisation lbfgs may stop before its tolerance; the
            # validation loss judges the result either way.
            warnings.simplefilter("ignore", ConvergenceWarning)
            probe.fit(unique_x, unique_y, sample_weight=counts)
        loss = float(log_loss(val_y, probe.predict_proba(val_x), labels=classes))
        if best is None or loss < best.val_loss:
            best = ProbeFit(
                coef=probe.coef_.astype(np.float64),  # a copy: the next fit changes coef_
                intercept=probe.intercept_.astype(np.float64),
                c=c,
                val_loss=loss,
            )
    return best


def _identical_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first row of each group of byte-identical rows, and each row's group index.

    Grouped by a digest of each row: np.unique(axis=0) would sort copies of the whole
    matrix, which at the paper's widths costs more memory than the head's training.
    """
    digests = np.array([hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in matrix])
    _, first, group = np.unique(digests, return_index=True, return_inverse=True)
    return first, group
