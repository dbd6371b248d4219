"""Uncertainty and significance for the paper's comparisons: DeLong, patient bootstrap, trials."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

# Most row indices the bootstrap holds at once; bounds memory on large tables (8 bytes each).
BOOTSTRAP_ROWS_PER_CHUNK = 2_000_000


def midranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1 to N of a 1-d array, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run_of_position = np.cumsum(starts_run) - 1
    run_starts = np.flatnonzero(starts_run)
    run_ends = np.r_[run_starts[1:], len(values)]
    # a run at 0-based positions start..end-1 holds ranks start+1..end
    run_midranks = (run_starts + 1 + run_ends) / 2
    ranks = np.empty(len(values))
    ranks[order] = run_midranks[run_of_position]
    return ranks


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict[str, float]:
    """Paired DeLong test that two scores of the same cases have the same ROC AUC.

    DeLong, DeLong & Clarke-Pearson (1988), computed with the midrank algorithm of Sun & Xu
    (2014). The cases must be independent: pass one row per patient (`patient_scores`).

    Args:
        labels: true class of each case, two values; the larger one is the positive class.
        scores_a: score of the positive class from model A, shape [N].
        scores_b: score of the positive class from model B, shape [N].

    Returns:
        auc_a, auc_b, difference (auc_a - auc_b), z and the two-sided p_value. With only one
        class present every value is NaN; z and p_value are NaN when a class has fewer than
        two cases (the variance needs two). When the variance of the
        difference is 0 (e.g. identical scores) z is 0 and p_value 1 if the AUCs are equal,
        else z is infinite and p_value 0, the limit of the test.

    Raises:
        ValueError: mismatched lengths, non-finite scores, or more than two classes.
    """
    labels = np.asarray(labels)
    if not np.shape(scores_a) == np.shape(scores_b) == labels.shape or labels.ndim != 1:
        raise ValueError(
            f"need one score per label: labels of shape {labels.shape}, scores of shapes "
            f"{np.shape(scores_a)} and {np.shape(scores_b)}"
        )
    scores = np.stack([np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)])
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; DeLong needs finite scores")
    classes = np.unique(labels)
    if len(classes) > 2:
        raise ValueError(f"DeLong compares binary scores; labels hold {len(classes)} classes")
    nan = float("nan")
    if len(classes) < 2:
        return {"auc_a": nan, "auc_b": nan, "difference": nan, "z": nan, "p_value": nan}
    is_positive = labels == classes[-1]
    positives, negatives = scores[:, is_positive], scores[:, ~is_positive]
    n_positive, n_negative = positives.shape[1], negatives.shape[1]

    # Sun & Xu: ranks within each class and overall give every structural component at once.
    overall = np.stack([midranks(row) for row in np.hstack([positives, negatives])])
    within_positive = np.stack([midranks(row) for row in positives])
    within_negative = np.stack([midranks(row) for row in negatives])
    # V10: share of negatives each positive outranks; V01: share of positives above each negative
    v10 = (overall[:, :n_positive] - within_positive) / n_negative
    v01 = 1.0 - (overall[:, n_positive:] - within_negative) / n_positive
    aucs = v10.mean(axis=1)
    difference = float(aucs[0] - aucs[1])
    result = {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "difference": difference}
    if min(n_positive, n_negative) < 2:
        return result | {"z": nan, "p_value": nan}

    # Var(A - B) = S10_aa + S10_bb - 2 S10_ab over m, plus the same for S01 over n; taking the
    # variance of the paired differences directly is the same sum and is exactly 0 for
    # identical scores, where the three-term sum can leave rounding noise.
    variance = (
        np.var(v10[0] - v10[1], ddof=1) / n_positive + np.var(v01[0] - v01[1], ddof=1) / n_negative
    )
    if variance <= 0:
        if difference == 0:
            return result | {"z": 0.0, "p_value": 1.0}
        return result | {"z": math.copysign(math.inf, difference), "p_value": 0.0}
    z = difference / math.sqrt(variance)
    return result | {"z": z, "p_value": float(2 * scipy_stats.norm.sf(abs(z)))}


def patient_scores(table: pd.DataFrame, score_column: str) -> pd.DataFrame:
    """One row per patient, its label and the mean of its rows' scores.

    Images of one patient are correlated, so tests that assume independent cases
    (`delong_test`) run on patients.

    Args:
        table: rows with columns patient_id, label and `score_column`.
        score_column: the column to average, e.g. a model's positive-class probability.

    Returns:
        Columns patient_id, label, `score_column`; sorted by patient_id.

    Raises:
        ValueError: a patient whose rows carry more than one label.
    """
    labels_per_patient = table.groupby("patient_id")["label"].nunique()
    mixed = labels_per_patient[labels_per_patient > 1].index.tolist()
    if mixed:
        raise ValueError(
            f"{len(mixed)} patient(s) have rows with different labels, e.g. {mixed[:5]}; "
            "a patient-level score needs one label per patient"
        )
    return (
        table.groupby("patient_id")
        .agg(label=("label", "first"), score=(score_column, "mean"))
        .rename(columns={"score": score_column})
        .reset_index()
    )


def bootstrap_values(
    labels: np.ndarray,
    positive_scores: np.ndarray,
    groups: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """`metric` on each of `n_resamples` bootstrap resamples of whole groups.

    Each resample draws as many groups as there are, with replacement, and takes all rows of
    every drawn group, so rows of one patient stay together. Two metrics of the same rows
    (a paired comparison) pass `positive_scores` as [N, 2]: both columns see the same draw.

    Args:
        labels: true class of each row, shape [N].
        positive_scores: score(s) of each row, shape [N] or [N, k].
        groups: the unit of resampling of each row (patient_id), shape [N].
        metric: metric(labels, scores) -> float, called once per resample.
        n_resamples: number of resamples drawn.
        seed: seed of the resampling; the same seed gives the same values.

    Returns:
        Shape [n_resamples], NaN where the metric is NaN (e.g. AUC of a single class).

    Raises:
        ValueError: mismatched lengths, no rows or n_resamples < 1.
    """
    labels = np.asarray(labels)
    positive_scores = np.asarray(positive_scores)
    groups = np.asarray(groups)
    if not len(labels) == len(positive_scores) == len(groups):
        raise ValueError(
            f"labels, scores and groups differ in length: "
            f"{len(labels)}, {len(positive_scores)}, {len(groups)}"
        )
    if len(labels) == 0 or n_resamples < 1:
        raise ValueError(
            f"need rows and n_resamples >= 1; got {len(labels)} rows, n_resamples={n_resamples}"
        )
    _, group_of_row = np.unique(groups, return_inverse=True)
    rows_by_group = np.argsort(group_of_row, kind="stable")
    group_sizes = np.bincount(group_of_row)
    group_starts = np.cumsum(group_sizes) - group_sizes
    n_groups = len(group_sizes)

    rng = np.random.default_rng(seed)
    resamples_per_chunk = max(1, BOOTSTRAP_ROWS_PER_CHUNK // len(labels))
    values = []
    for first in range(0, n_resamples, resamples_per_chunk):
        n_chunk = min(resamples_per_chunk, n_resamples - first)
        drawn = rng.integers(0, n_groups, size=(n_chunk, n_groups))
        # Row indices of every drawn group, all resamples of the chunk laid end to end: each
        # group contributes its run rows_by_group[start : start + size].
        sizes = group_sizes[drawn].ravel()
        run_offsets = np.cumsum(sizes) - sizes
        positions = np.repeat(group_starts[drawn].ravel() - run_offsets, sizes)
        rows = rows_by_group[positions + np.arange(len(positions))]
        resample_ends = np.cumsum(group_sizes[drawn].sum(axis=1))[:-1]
        for resample in np.split(rows, resample_ends):
            values.append(metric(labels[resample], positive_scores[resample]))
    return np.asarray(values, dtype=float)


def bootstrap_weights(groups: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """How often each row is taken in each of `n_resamples` resamples of whole groups.

    The draws are those of `bootstrap_values` with the same seed (while its resamples fit in
    one chunk), as a [n_resamples, N] count matrix instead of row lists: a metric written
    over weights (`pipeline.metrics.weighted_auc`, or a matrix product for counts) then
    takes all resamples at once, hundreds of times faster than one call per resample. Pass
    one matrix to two models for a paired comparison.

    Raises:
        ValueError: no rows or n_resamples < 1.
    """
    groups = np.asarray(groups)
    if len(groups) == 0 or n_resamples < 1:
        raise ValueError(
            f"need rows and n_resamples >= 1; got {len(groups)} rows, n_resamples={n_resamples}"
        )
    _, group_of_row = np.unique(groups, return_inverse=True)
    n_groups = int(group_of_row.max()) + 1
    drawn = np.random.default_rng(seed).integers(0, n_groups, size=(n_resamples, n_groups))
    offsets = np.arange(n_resamples)[:, None] * n_groups
    counts = np.bincount((drawn + offsets).ravel(), minlength=n_resamples * n_groups)
    return counts.reshape(n_resamples, n_groups)[:, group_of_row].astype(np.float64)


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap values, NaNs left out; NaN if all are.

    Raises:
        ValueError: confidence outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"need 0 < confidence < 1; got confidence={confidence}")
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided bootstrap p-value that a paired difference is 0, from its resampled values.

    Twice the smaller share of resamples on either side of 0 (a difference of exactly 0
    counts on both), capped at 1; NaN when every value is NaN.
    """
    differences = np.asarray(differences, dtype=float)
    differences = differences[~np.isnan(differences)]
    if len(differences) == 0:
        return float("nan")
    below, above = np.mean(differences <= 0), np.mean(differences >= 0)
    return float(min(1.0, 2 * min(below, above)))


def bootstrap_ci(
    labels: np.ndarray,
    positive_scores: np.ndarray,
    groups: np.ndarray,
    metric: Callable[[np.ndarray, np.ndarray], float],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of `metric`, resampling whole groups.

    `bootstrap_values` then `percentile_interval`: resamples where the metric is NaN are
    left out, and both bounds are NaN when it is NaN on every resample.

    Raises:
        ValueError: mismatched lengths, no rows, n_resamples < 1, or confidence outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"need 0 < confidence < 1; got confidence={confidence}")
    values = bootstrap_values(labels, positive_scores, groups, metric, n_resamples, seed)
    return percentile_interval(values, confidence)


def paired_trials_test(values_a: np.ndarray, values_b: np.ndarray) -> float:
    """Two-sided paired t-test p-value of two models' metric over the same trials (seeds).

    The rule at the edges: NaN with fewer than two pairs (no variance); when every trial
    differs by the same amount, 1.0 if that amount is 0 (no evidence of a difference) and
    0.0 otherwise (the test's limit as the spread goes to 0).

    Raises:
        ValueError: the two inputs differ in length.
    """
    values_a = np.asarray(values_a, dtype=float)
    values_b = np.asarray(values_b, dtype=float)
    if values_a.shape != values_b.shape or values_a.ndim != 1:
        raise ValueError(
            f"need one value per trial for both models; got shapes {values_a.shape} and "
            f"{values_b.shape}"
        )
    if len(values_a) < 2:
        return float("nan")
    differences = values_a - values_b
    if np.all(differences == differences[0]):
        return 1.0 if differences[0] == 0 else 0.0
    return float(scipy_stats.ttest_rel(values_a, values_b).pvalue)


def mean_sd(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1); the SD is NaN for a single value.

    Raises:
        ValueError: no values.
    """
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        raise ValueError("mean_sd needs at least one value")
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), sd


def format_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    """Mean and SD as the paper's tables print them: "0.776 (0.021)".

    A NaN mean prints as "–"; a NaN SD (one trial) as "0.776 (–)", never "(nan)".
    """
    if math.isnan(mean):
        return "–"
    spread = "–" if math.isnan(sd) else f"{sd:.{digits}f}"
    return f"{mean:.{digits}f} ({spread})"
