"""Classification metrics as the paper reports them, computed one way for every stage."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn import metrics as sk

from pipeline.stats import midranks

DEFAULT_THRESHOLD = 0.5  # the cut that matches argmax for two classes


def classification_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, float]:
    """Accuracy, macro precision/recall/F1, AUC and recall per class of a classifier.

    Two classes: a case is predicted positive (the last class) when its positive probability
    is >= `threshold`. More classes: the most probable class. The values equal
    scikit-learn's (macro average over all classes, 0 where a ratio is 0/0) but come from
    one confusion matrix, cheap enough to call inside a bootstrap.

    Args:
        labels: true class indices, shape [N].
        probabilities: predicted probability of each class, shape [N, len(classes)].
        classes: class names in index order; the last one is the positive class.
        threshold: cut on the positive probability, e.g. from `choose_threshold` on the
            validation split; only two-class tasks accept a value other than 0.5.

    Returns:
        A flat dict of floats: n, accuracy, precision, recall, f1 (macro), auc (of the last
        class against the rest; NaN when the labels hold only one of the two), recall_<class>
        per class, and for two classes sensitivity and specificity (the recall of the
        positive and the negative class).

    Raises:
        ValueError: a label that is not a class index, or a threshold other than 0.5 with
            more than two classes.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities)
    n_classes = len(classes)
    if len(labels) and (
        not np.array_equal(labels, labels.astype(int))
        or labels.min() < 0
        or labels.max() >= n_classes
    ):
        raise ValueError(
            f"labels must be class indices 0..{n_classes - 1} of {list(classes)}; "
            f"found values {np.unique(labels)[:10]}"
        )
    labels = labels.astype(int)
    binary = n_classes == 2
    if binary:
        predictions = (probabilities[:, -1] >= threshold).astype(int)
    elif threshold != DEFAULT_THRESHOLD:
        raise ValueError(
            f"a threshold applies to two classes; got threshold={threshold} with "
            f"{n_classes} classes {list(classes)}, which are predicted by argmax"
        )
    else:
        predictions = probabilities.argmax(axis=1)
    # confusion[true, predicted]
    confusion = np.bincount(
        labels * n_classes + predictions, minlength=n_classes * n_classes
    ).reshape(n_classes, n_classes)
    correct = np.diag(confusion)
    recall = _ratio(correct, confusion.sum(axis=1))
    precision = _ratio(correct, confusion.sum(axis=0))
    f1 = _ratio(2 * correct, confusion.sum(axis=1) + confusion.sum(axis=0))
    result = {
        "n": float(len(labels)),
        "accuracy": float(correct.sum() / len(labels)),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        # the last class against the rest, which for two classes is the usual AUC
        "auc": roc_auc(labels == n_classes - 1, probabilities[:, -1]),
    }
    for name, class_recall in zip(classes, recall, strict=True):
        result[f"recall_{name}"] = float(class_recall)
    if binary:
        result["sensitivity"] = float(recall[1])
        result["specificity"] = float(recall[0])
    return result


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    return np.divide(numerator, denominator, out=np.zeros(len(numerator)), where=denominator > 0)


def choose_threshold(labels: np.ndarray, positive_scores: np.ndarray) -> float:
    """The cut on the positive score that maximises Youden's J on these (validation) cases.

    J = sensitivity + specificity - 1, tried at every threshold of the ROC curve. Among equal
    J the threshold closest to 0.5 wins (and of two equally close, the higher one), so a
    flat optimum does not drift away from the untuned cut.

    Args:
        labels: true class of each case, two values; the larger one is the positive class.
        positive_scores: score of the positive class, shape [N].

    Returns:
        A finite threshold, one of the scores; 0.5 when only one class is present.
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return DEFAULT_THRESHOLD
    # Keep every threshold: dropping collinear points could drop a tie closer to 0.5.
    false_positive_rate, true_positive_rate, thresholds = sk.roc_curve(
        labels, positive_scores, pos_label=present[-1], drop_intermediate=False
    )
    # The first threshold is +inf (nothing positive, J = 0); J = 0 is also reached at the
    # lowest score (everything positive), so leaving it out loses no optimum.
    finite = np.isfinite(thresholds)
    youden = (true_positive_rate - false_positive_rate)[finite]
    thresholds = thresholds[finite]
    # Distinct J values differ by at least 1/(positives * negatives); the tolerance only
    # absorbs rounding.
    best = np.flatnonzero(youden >= youden.max() - 1e-9)
    # thresholds decrease along the curve, so argmin's first match is the higher of two
    # equally close ones
    closest = best[np.argmin(np.abs(thresholds[best] - DEFAULT_THRESHOLD))]
    return float(thresholds[closest])


def roc_auc(labels: np.ndarray, positive_scores: np.ndarray) -> float:
    """Area under the ROC curve of the positive (last) class; NaN if only one class is present.

    Computed from midranks (the Mann-Whitney statistic, ties counting half), equal to
    scikit-learn's roc_auc_score but without its input checks, which dominate the cost when
    a bootstrap calls it a thousand times.

    Raises:
        ValueError: more than two classes, or a score that is NaN or infinite.
    """
    labels = np.asarray(labels)
    positive_scores = np.asarray(positive_scores, dtype=float)
    present = np.unique(labels)
    if len(present) > 2:
        raise ValueError(f"roc_auc takes two classes; labels hold {len(present)}: {present}")
    if not np.isfinite(positive_scores).all():
        raise ValueError("positive_scores contain NaN or infinity")
    if len(present) < 2:
        return float("nan")
    is_positive = labels == present[-1]
    n_positive = int(is_positive.sum())
    n_negative = len(labels) - n_positive
    rank_sum = midranks(positive_scores)[is_positive].sum()
    return float((rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative))


def roc_points(labels: np.ndarray, positive_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates of the ROC curve of the positive (last) class."""
    false_positive_rate, true_positive_rate, _ = sk.roc_curve(labels, positive_scores)
    return false_positive_rate, true_positive_rate


def threshold_for_sensitivity(
    labels: np.ndarray, positive_scores: np.ndarray, target: float
) -> float:
    """The highest cut whose sensitivity on these (validation) cases is at least `target`.

    Predicted positive is score >= cut, so the cut is the k-th highest positive score with
    k = ceil(target x positives): the fewest positives called that still meet the target,
    which leaves the most negatives below the cut. NaN without positives.
    """
    labels, positive_scores = np.asarray(labels), np.asarray(positive_scores, dtype=float)
    positives = np.sort(positive_scores[labels == 1])[::-1]
    if len(positives) == 0:
        return float("nan")
    needed = max(1, math.ceil(target * len(positives) - 1e-9))
    return float(positives[needed - 1])


def threshold_for_specificity(
    labels: np.ndarray, positive_scores: np.ndarray, target: float
) -> float:
    """The lowest cut whose specificity on these (validation) cases is at least `target`.

    Negatives below the cut are called negative, so the cut sits just above the k-th lowest
    negative score with k = ceil(target x negatives). NaN without negatives.
    """
    labels, positive_scores = np.asarray(labels), np.asarray(positive_scores, dtype=float)
    negatives = np.sort(positive_scores[labels == 0])
    if len(negatives) == 0:
        return float("nan")
    needed = max(1, math.ceil(target * len(negatives) - 1e-9))
    return float(np.nextafter(negatives[needed - 1], np.inf))


def expected_calibration_error(
    labels: np.ndarray, positive_scores: np.ndarray, bins: int = 10
) -> float:
    """Expected calibration error of the positive-class probability over equal-width bins.

    The sum over bins of |observed positive rate - mean probability|, weighted by the bin's
    share of cases; bins are [0, 1/bins), ..., [1 - 1/bins, 1] and empty ones count 0.
    """
    labels = np.asarray(labels, dtype=float)
    positive_scores = np.asarray(positive_scores, dtype=float)
    if len(labels) == 0:
        return float("nan")
    bin_of = np.clip((positive_scores * bins).astype(int), 0, bins - 1)
    # |sum of (label - probability)| per bin over N is the bin's gap times its share
    gap = np.bincount(bin_of, weights=labels - positive_scores, minlength=bins)
    return float(np.abs(gap).sum() / len(labels))


def net_benefit(
    labels: np.ndarray, positive_scores: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """Net benefit of treating cases whose score is >= each threshold probability p.

    NB(p) = TP/N - FP/N x p / (1 - p) (Vickers & Elkin 2006): a false positive costs p/(1-p)
    true positives, the odds at which a clinician is indifferent to treating.
    """
    labels = np.asarray(labels, dtype=bool)
    positive_scores = np.asarray(positive_scores, dtype=float)
    thresholds = np.asarray(thresholds, dtype=float)
    treated = positive_scores[None, :] >= thresholds[:, None]
    true_positive = (treated & labels).sum(axis=1) / len(labels)
    false_positive = (treated & ~labels).sum(axis=1) / len(labels)
    return true_positive - false_positive * thresholds / (1 - thresholds)


def weighted_auc(
    labels: np.ndarray, positive_scores: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """ROC AUC under each row of case weights at once (ties count half); NaN without both classes.

    With integer weights this is `roc_auc` of the cases repeated that often, so a bootstrap
    count matrix (`pipeline.stats.bootstrap_weights`) gives every resample's AUC in one pass.

    Args:
        labels: true class of each case, 0/1 or bool, shape [N].
        positive_scores: score of each case, shape [N].
        weights: [R, N] non-negative weights.

    Returns:
        Shape [R].
    """
    positive = np.asarray(labels).astype(bool)
    scores = np.asarray(positive_scores, dtype=float)
    order = np.argsort(scores, kind="stable")
    scores, positive = scores[order], positive[order]
    weights = np.asarray(weights, dtype=float)[:, order]
    # negatives_before[:, k]: the negatives' weight in sorted places 0 .. k-1. A positive
    # wins over the negatives below its run of tied scores and half of those inside it:
    # half of (negatives before its run + negatives before the next run).
    negatives_before = np.zeros((len(weights), len(scores) + 1))
    np.cumsum(weights * ~positive, axis=1, out=negatives_before[:, 1:])
    starts_run = np.r_[True, scores[1:] != scores[:-1]]
    run_starts = np.flatnonzero(starts_run)
    run_of = np.cumsum(starts_run) - 1
    next_run_starts = np.r_[run_starts[1:], len(scores)]
    runs = run_of[positive]
    positive_weights = weights[:, positive]
    wins = 0.5 * np.einsum(
        "rp,rp->r",
        positive_weights,
        negatives_before[:, run_starts[runs]] + negatives_before[:, next_run_starts[runs]],
    )
    total_positive = positive_weights.sum(axis=1)
    total_negative = negatives_before[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = wins / (total_positive * total_negative)
    return np.where((total_positive > 0) & (total_negative > 0), auc, np.nan)


def weighted_share(hits: np.ndarray, among: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted share of `hits` among the cases `among`, per row of weights; NaN if none.

    E.g. sensitivity: hits = called positive, among = truly positive.
    """
    among = np.asarray(among, dtype=float)
    weights = np.asarray(weights, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = weights @ (among * np.asarray(hits, dtype=float)) / (weights @ among)
    return np.where(weights @ among > 0, share, np.nan)


def weighted_macro_f1(labels: np.ndarray, called: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro F1 of two classes per row of weights, 0 for a class never present nor called
    (scikit-learn's zero_division=0, as `classification_metrics`)."""
    positive = np.asarray(labels).astype(bool)
    called = np.asarray(called).astype(bool)
    weights = np.asarray(weights, dtype=float)
    true_positive = weights @ (positive & called)
    true_negative = weights @ (~positive & ~called)
    wrong = weights @ (positive != called)
    scores = []
    for correct in (true_positive, true_negative):
        denominator = 2 * correct + wrong
        scores.append(
            np.divide(2 * correct, denominator, out=np.zeros_like(correct), where=denominator > 0)
        )
    return (scores[0] + scores[1]) / 2
