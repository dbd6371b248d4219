import math
import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import roc_auc_score

from pipeline.metrics import roc_auc, weighted_auc
from pipeline.stats import (
    bootstrap_ci,
    bootstrap_p_value,
    bootstrap_values,
    bootstrap_weights,
    delong_test,
    format_mean_sd,
    mean_sd,
    midranks,
    paired_trials_test,
    patient_scores,
)


def _delong_by_definition(labels, scores_a, scores_b):
    """V10, V01, AUCs, z and p of the paired DeLong test from its definition, by explicit loops."""

    def kernel(positive, negative):
        return 1.0 if positive > negative else 0.5 if positive == negative else 0.0

    positives = [i for i, label in enumerate(labels) if label == 1]
    negatives = [j for j, label in enumerate(labels) if label == 0]
    m, n = len(positives), len(negatives)
    v10, v01, aucs = [], [], []
    for scores in (scores_a, scores_b):
        v10.append([sum(kernel(scores[i], scores[j]) for j in negatives) / n for i in positives])
        v01.append([sum(kernel(scores[i], scores[j]) for i in positives) / m for j in negatives])
        aucs.append(sum(v10[-1]) / m)

    def covariance(u, v):
        mean_u, mean_v = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mean_u) * (y - mean_v) for x, y in zip(u, v, strict=True)) / (len(u) - 1)

    def s(k, o):  # DeLong's S_ko = S10_ko / m + S01_ko / n
        return covariance(v10[k], v10[o]) / m + covariance(v01[k], v01[o]) / n

    variance = s(0, 0) + s(1, 1) - 2 * s(0, 1)
    z = (aucs[0] - aucs[1]) / math.sqrt(variance)
    return v10, v01, aucs, z, math.erfc(abs(z) / math.sqrt(2))


# 3 positives then 3 negatives, with a tie in each model
HAND_LABELS = [1, 1, 1, 0, 0, 0]
HAND_A = [0.9, 0.6, 0.4, 0.5, 0.2, 0.4]
HAND_B = [0.7, 0.3, 0.55, 0.6, 0.1, 0.3]


def test_delong_matches_a_case_worked_by_hand():
    v10, v01, aucs, z, p = _delong_by_definition(HAND_LABELS, HAND_A, HAND_B)
    # Worked by hand: the share of negatives below each positive (ties half) and of
    # positives above each negative.
    np.testing.assert_allclose(v10, [[1, 1, 1 / 2], [1, 1 / 2, 2 / 3]])
    np.testing.assert_allclose(v01, [[2 / 3, 1, 5 / 6], [1 / 3, 1, 5 / 6]])
    # AUCs 5/6 and 13/18; Var(A-B) = (13/108)/3 + (1/27)/3 = 17/324, so z = (1/9)/(sqrt(17)/18)
    assert aucs == pytest.approx([5 / 6, 13 / 18])
    assert z == pytest.approx(2 / math.sqrt(17))

    result = delong_test(np.array(HAND_LABELS), np.array(HAND_A), np.array(HAND_B))
    assert result["auc_a"] == pytest.approx(5 / 6) and result["auc_b"] == pytest.approx(13 / 18)
    assert result["difference"] == pytest.approx(1 / 9)
    assert result["z"] == pytest.approx(2 / math.sqrt(17))
    assert result["p_value"] == pytest.approx(p)


def test_delong_matches_the_definition_on_random_scores():
    rng = np.random.default_rng(2)
    labels = np.array([1] * 12 + [0] * 15)
    rng.shuffle(labels)
    scores_a = np.round(0.4 * labels + rng.random(27), 1)  # rounded for ties
    scores_b = np.round(0.2 * labels + rng.random(27), 1)
    _, _, aucs, z, p = _delong_by_definition(labels, scores_a, scores_b)
    result = delong_test(labels, scores_a, scores_b)
    assert result["auc_a"] == pytest.approx(roc_auc_score(labels, scores_a))
    assert result["auc_b"] == pytest.approx(aucs[1])
    assert result["z"] == pytest.approx(z) and result["p_value"] == pytest.approx(p)
    swapped = delong_test(labels, scores_b, scores_a)
    assert swapped["z"] == pytest.approx(-z) and swapped["p_value"] == pytest.approx(p)


def test_delong_of_identical_scores_has_p_one():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 30)
    scores = rng.random(30)
    result = delong_test(labels, scores, scores.copy())
    assert result["z"] == 0.0 and result["p_value"] == 1.0 and result["difference"] == 0.0


def test_delong_without_two_classes_is_nan():
    result = delong_test(np.ones(4), np.arange(4.0), np.arange(4.0)[::-1])
    assert all(math.isnan(value) for value in result.values())
    # one negative: the AUCs exist, their variance does not
    one_negative = delong_test(np.array([1, 1, 0]), np.array([0.9, 0.8, 0.1]), np.zeros(3))
    assert one_negative["auc_a"] == 1.0 and math.isnan(one_negative["p_value"])


def test_midranks_share_tied_ranks():
    assert midranks(np.array([0.3, 0.1, 0.3, 0.2, 0.3])).tolist() == [4, 1, 4, 2, 4]


def test_patient_scores_average_each_patient():
    table = pd.DataFrame(
        {
            "patient_id": ["p2", "p1", "p2", "p1", "p3"],
            "label": [1, 0, 1, 0, 1],
            "prob_a": [0.8, 0.2, 0.6, 0.4, 0.5],
        }
    )
    patients = patient_scores(table, "prob_a")
    assert patients["patient_id"].tolist() == ["p1", "p2", "p3"]
    assert patients["label"].tolist() == [0, 1, 1]
    assert patients["prob_a"].tolist() == pytest.approx([0.3, 0.7, 0.5])


def test_patient_scores_refuse_a_patient_with_two_labels():
    table = pd.DataFrame({"patient_id": ["p1", "p1"], "label": [0, 1], "prob": [0.1, 0.9]})
    with pytest.raises(ValueError, match="p1"):
        patient_scores(table, "prob")


def _clustered(n_patients, rows_per_patient, seed):
    """Labels, scores and patient of each row; a patient's rows share its label and score."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_patients) % 2
    scores = 0.5 * labels + rng.random(n_patients)
    patients = np.arange(n_patients)
    return tuple(np.repeat(column, rows_per_patient) for column in (labels, scores, patients))


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_more_patients():
    widths = []
    for n_patients in (20, 200):
        labels, scores, patients = _clustered(n_patients, 4, seed=n_patients)
        low, high = bootstrap_ci(labels, scores, patients, roc_auc, n_resamples=400)
        assert low < roc_auc(labels, scores) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # ten times the patients: about a third of the width


def test_bootstrap_ci_resamples_patients_not_rows():
    labels, scores, patients = _clustered(30, 10, seed=1)
    by_patient = bootstrap_ci(labels, scores, patients, roc_auc, n_resamples=400)
    by_row = bootstrap_ci(labels, scores, np.arange(len(labels)), roc_auc, n_resamples=400)
    # ten identical rows per patient: treating them as independent shrinks the interval
    # about sqrt(10)-fold
    assert by_patient[1] - by_patient[0] > 2 * (by_row[1] - by_row[0])


@pytest.mark.parametrize(("confidence", "normal_quantile"), [(0.95, 1.960), (0.5, 0.674)])
def test_bootstrap_ci_of_a_mean_matches_the_normal_interval(confidence, normal_quantile):
    values = np.random.default_rng(0).normal(size=400)
    standard_error = values.std(ddof=1) / math.sqrt(len(values))
    low, high = bootstrap_ci(
        np.zeros(400),
        values,
        np.arange(400),
        lambda _, drawn: float(drawn.mean()),
        n_resamples=2000,
        confidence=confidence,
    )
    assert (high - low) / 2 == pytest.approx(normal_quantile * standard_error, rel=0.1)
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.2 * standard_error)


def test_bootstrap_ci_takes_every_row_of_a_drawn_group():
    sizes = np.array([1, 2, 3, 5])
    groups = np.repeat(np.array(["a", "b", "c", "d"]), sizes)
    row_in_group = np.concatenate([np.arange(size) for size in sizes])
    labels = np.zeros(len(groups))
    # the score names its row, so the metric can see which rows of each group came along
    scores = np.repeat(np.arange(4), sizes) * 10 + row_in_group
    draws_seen = []

    def whole_groups(_, drawn_scores):
        group_ids, rows = np.divmod(drawn_scores.astype(int), 10)
        for group in np.unique(group_ids):
            counts = np.bincount(rows[group_ids == group], minlength=sizes[group])
            assert (counts == counts[0]).all(), f"group {group} came in part: {counts}"
        draws_seen.append(np.count_nonzero(rows == 0))  # each drawn group brings one row 0
        return float(len(drawn_scores))

    bootstrap_ci(labels, scores, groups, whole_groups, n_resamples=200)
    assert draws_seen == [4] * 200  # as many groups drawn as there are


def test_bootstrap_ci_skips_resamples_where_the_metric_is_undefined():
    labels, scores, patients = _clustered(4, 3, seed=0)  # often a single class is drawn
    low, high = bootstrap_ci(labels, scores, patients, roc_auc, n_resamples=200)
    assert 0 <= low <= high <= 1
    never = bootstrap_ci(labels, scores, patients, lambda *_: float("nan"), n_resamples=10)
    assert all(math.isnan(bound) for bound in never)


def test_bootstrap_ci_is_reproducible_and_fast():
    rng = np.random.default_rng(0)
    patients = rng.integers(0, 50, 600)
    labels = patients % 2
    scores = 0.3 * labels + rng.random(600)
    start = time.perf_counter()
    first = bootstrap_ci(labels, scores, patients, roc_auc, n_resamples=1000, seed=7)
    elapsed = time.perf_counter() - start
    assert first == bootstrap_ci(labels, scores, patients, roc_auc, n_resamples=1000, seed=7)
    assert elapsed < 1.0  # ~60 of these per report


def test_paired_trials_test_matches_scipy():
    a = [0.781, 0.774, 0.769, 0.790, 0.772]
    b = [0.760, 0.771, 0.752, 0.779, 0.770]
    assert paired_trials_test(a, b) == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
    # by hand: differences have mean 0.0108 and SD 0.008385, so t = 2.880 on 4 df
    assert paired_trials_test(a, b) == pytest.approx(0.0449, abs=1e-4)


def test_paired_trials_test_at_the_edges():
    assert math.isnan(paired_trials_test([0.7], [0.6]))
    assert paired_trials_test([0.7, 0.8, 0.75], [0.7, 0.8, 0.75]) == 1.0
    assert paired_trials_test([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        paired_trials_test([0.1, 0.2], [0.1])


def test_mean_sd_and_its_format():
    assert mean_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5 / 3)))
    mean, sd = mean_sd([0.7])
    assert mean == 0.7 and math.isnan(sd)
    with pytest.raises(ValueError):
        mean_sd([])
    assert format_mean_sd(0.7764, 0.0213) == "0.776 (0.021)"
    assert format_mean_sd(0.7764, 0.0213, digits=2) == "0.78 (0.02)"
    assert format_mean_sd(0.7764, sd) == "0.776 (–)"  # one trial: no "(nan)"
    assert format_mean_sd(float("nan"), sd) == "–"


def test_bootstrap_weights_are_the_draws_of_bootstrap_values_as_counts():
    labels, scores, patients = _clustered(30, 3, seed=2)
    weights = bootstrap_weights(patients, n_resamples=300, seed=4)
    assert weights.shape == (300, len(labels))
    # every row of a patient is counted as often as its patient is drawn; 30 drawn in all
    for patient in np.unique(patients):
        rows = weights[:, patients == patient]
        assert (rows == rows[:, :1]).all()
    np.testing.assert_array_equal(weights[:, ::3].sum(axis=1), 30)
    by_weights = weighted_auc(labels, scores, weights)
    by_calls = bootstrap_values(labels, scores, patients, roc_auc, n_resamples=300, seed=4)
    np.testing.assert_allclose(by_weights, by_calls, equal_nan=True)


def test_bootstrap_p_value_is_twice_the_smaller_tail():
    assert bootstrap_p_value(np.r_[np.full(90, 0.1), np.full(10, -0.1)]) == pytest.approx(0.2)
    assert bootstrap_p_value(np.full(50, 0.0)) == 1.0
    assert math.isnan(bootstrap_p_value(np.full(5, np.nan)))
