"""Classification metrics as the paper reports them, computed one way for every stage."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as sk


def classification_metrics(
    labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str]
) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1, AUC and recall per class for a binary task.

    Args:
        labels: true class indices, shape [N].
        probabilities: predicted probability of each class, shape [N, len(classes)].
        classes: class names in index order; the last one is the positive class for AUC.

    Returns:
        A flat dict of floats; AUC is NaN when the labels hold only one class.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    predictions = probabilities.argmax(axis=1)
    class_indices = list(range(len(classes)))
    result = {
        "n": float(len(labels)),
        "accuracy": float(sk.accuracy_score(labels, predictions)),
        "precision": float(
            sk.precision_score(
                labels, predictions, labels=class_indices, average="macro", zero_division=0
            )
        ),
        "recall": float(
            sk.recall_score(
                labels, predictions, labels=class_indices, average="macro", zero_division=0
            )
        ),
        "f1": float(
            sk.f1_score(labels, predictions, labels=class_indices, average="macro", zero_division=0)
        ),
        "auc": roc_auc(labels, probabilities[:, -1]),
    }
    per_class_recall = sk.recall_score(
        labels, predictions, labels=class_indices, average=None, zero_division=0
    )
    for name, recall in zip(classes, per_class_recall, strict=True):
        result[f"recall_{name}"] = float(recall)
    return result


def roc_auc(labels: np.ndarray, positive_scores: np.ndarray) -> float:
    """Area under the ROC curve of the positive (last) class; NaN if only one class is present."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(sk.roc_auc_score(labels, positive_scores))


def roc_points(labels: np.ndarray, positive_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve of the positive (last) class."""
    false_positive_rate, true_positive_rate, _ = sk.roc_curve(labels, positive_scores)
    return false_positive_rate, true_positive_rate
