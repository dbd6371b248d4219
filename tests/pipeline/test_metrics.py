import math

import numpy as np
import pytest
from sklearn import metrics as sk

from pipeline.metrics import (
    choose_threshold,
    classification_metrics,
    roc_auc,
    weighted_auc,
    weighted_macro_f1,
    weighted_share,
)


def _two_class(positive):
    positive = np.asarray(positive, dtype=float)
    return np.stack([1 - positive, positive], 1)


def test_metrics_of_a_known_confusion():
    labels = np.array([0, 0, 0, 1, 1, 1])
    positive = np.array([0.1, 0.2, 0.7, 0.8, 0.9, 0.4])  # one error in each class
    result = classification_metrics(labels, _two_class(positive), ("VCD", "GC"))
    assert result["accuracy"] == 4 / 6
    assert result["recall_VCD"] == 2 / 3 and result["recall_GC"] == 2 / 3
    assert result["precision"] == 2 / 3 and math.isclose(result["f1"], 2 / 3)
    # 8 of the 9 (positive, negative) pairs are ordered right
    assert math.isclose(result["auc"], 8 / 9)
    assert result["n"] == 6


def test_auc_is_nan_with_one_class():
    result = classification_metrics(
        np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ("A", "B")
    )
    assert math.isnan(result["auc"])


def test_sensitivity_and_specificity_by_hand_at_a_lowered_threshold():
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    positive = np.array([0.1, 0.25, 0.3, 0.6, 0.2, 0.35, 0.9])
    # At 0.3: predicted positive are 0.3, 0.6 (negatives) and 0.35, 0.9 (positives), so
    # TP=2, FN=1 (0.2), TN=2 (0.1, 0.25), FP=2.
    result = classification_metrics(labels, _two_class(positive), ("VCD", "GC"), threshold=0.3)
    assert result["sensitivity"] == 2 / 3 == result["recall_GC"]
    assert result["specificity"] == 2 / 4 == result["recall_VCD"]
    assert result["accuracy"] == 4 / 7
    # At the default 0.5 only 0.6 and 0.9 are called positive: TP=1, TN=3.
    default = classification_metrics(labels, _two_class(positive), ("VCD", "GC"))
    assert default["sensitivity"] == 1 / 3 and default["specificity"] == 3 / 4
    assert default["auc"] == result["auc"]  # the threshold does not touch the ranking


@pytest.mark.parametrize("threshold", [0.5, 0.37, 0.8])
def test_metrics_match_scikit_learn_at_a_threshold(threshold):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    positive = np.clip(0.3 * labels + 0.7 * rng.random(40), 0, 1)
    result = classification_metrics(labels, _two_class(positive), ("VCD", "GC"), threshold)
    predictions = (positive >= threshold).astype(int)
    (tn, fp), (fn, tp) = sk.confusion_matrix(labels, predictions, labels=[0, 1])
    assert result["accuracy"] == sk.accuracy_score(labels, predictions)
    assert result["precision"] == sk.precision_score(labels, predictions, average="macro")
    assert result["recall"] == sk.recall_score(labels, predictions, average="macro")
    assert math.isclose(result["f1"], sk.f1_score(labels, predictions, average="macro"))
    assert result["sensitivity"] == tp / (tp + fn)
    assert result["specificity"] == tn / (tn + fp)
    assert math.isclose(result["auc"], sk.roc_auc_score(labels, positive))


def test_a_positive_probability_equal_to_the_threshold_is_positive():
    result = classification_metrics(np.array([0, 1]), _two_class([0.5, 0.5]), ("A", "B"))
    assert result["sensitivity"] == 1.0 and result["specificity"] == 0.0


def test_more_than_two_classes_use_argmax_and_refuse_a_threshold():
    labels = np.array([0, 1, 2, 2])
    probabilities = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.4, 0.35, 0.25]])
    result = classification_metrics(labels, probabilities, ("A", "B", "C"))
    assert result["accuracy"] == 3 / 4 and result["recall_C"] == 1 / 2
    assert "sensitivity" not in result and "specificity" not in result
    # AUC of C against the rest: of C's scores 0.6 beats 0.2 and 0.3, 0.25 beats only 0.2
    assert result["auc"] == 3 / 4
    with pytest.raises(ValueError, match="threshold"):
        classification_metrics(labels, probabilities, ("A", "B", "C"), threshold=0.4)


def test_multi_class_metrics_match_scikit_learn_with_empty_classes():
    rng = np.random.default_rng(8)
    labels = rng.choice([0, 1, 3], 50)  # class 2 never occurs
    probabilities = rng.random((50, 4)) * [1, 1, 1, 0.1]  # and class 3 is never predicted
    result = classification_metrics(labels, probabilities, ("A", "B", "C", "D"))
    predictions = probabilities.argmax(axis=1)
    every = {"labels": [0, 1, 2, 3], "zero_division": 0}
    assert math.isclose(result["accuracy"], sk.accuracy_score(labels, predictions))
    for name, score in (("precision", sk.precision_score), ("recall", sk.recall_score)):
        assert math.isclose(result[name], score(labels, predictions, average="macro", **every))
    assert math.isclose(result["f1"], sk.f1_score(labels, predictions, average="macro", **every))
    per_class = sk.recall_score(labels, predictions, average=None, **every)
    assert [result[f"recall_{name}"] for name in "ABCD"] == pytest.approx(per_class)


def test_labels_must_be_class_indices():
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(np.array([0, 2]), _two_class([0.1, 0.9]), ("A", "B"))


def test_roc_auc_matches_scikit_learn_with_ties():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60), 1)  # many ties
    assert math.isclose(roc_auc(labels, scores), sk.roc_auc_score(labels, scores))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(labels, np.full(60, np.nan))


def test_choose_threshold_finds_the_known_best_cut():
    # Negatives at 0.05, 0.1, 0.5, 0.75 and positives from 0.8 up: only 0.8 separates them
    # (J=1), although 0.5 is closer to the default.
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.05, 0.1, 0.5, 0.75, 0.8, 0.85, 0.9])
    assert choose_threshold(labels, scores) == 0.8


def test_choose_threshold_breaks_ties_towards_one_half():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.55, 0.7, 0.9])
    # J = 2/3 both at 0.7 (TPR 2/3, FPR 0) and at 0.55 (TPR 1, FPR 1/3); 0.55 is closer to 0.5
    assert choose_threshold(labels, scores) == 0.55


def test_choose_threshold_sees_ties_through_rounding():
    labels = np.repeat([1, 0], 10)
    positives = [0.95, 0.9, 0.52, 0.3, 0.28, 0.26, 0.24, 0.22, 0.2, 0.18]
    negatives = [0.85, 0.45, 0.44, 0.43, 0.42, 0.41, 0.4, 0.39, 0.38, 0.37]
    # J = 0.2 at 0.9 (TPR 0.2, FPR 0) and at 0.52 (TPR 0.3, FPR 0.1), where in floating
    # point 0.3 - 0.1 falls just below 0.2; 0.52 is still the tie closer to 0.5.
    assert choose_threshold(labels, np.array(positives + negatives)) == 0.52


def test_choose_threshold_maximises_youden_over_every_cut():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 2, 80)
    scores = np.round(np.clip(0.25 * labels + rng.random(80), 0, 1), 2)
    chosen = choose_threshold(labels, scores)

    def youden(threshold):
        result = classification_metrics(labels, _two_class(scores), ("N", "P"), threshold)
        return result["sensitivity"] + result["specificity"] - 1

    assert math.isclose(youden(chosen), max(youden(cut) for cut in np.unique(scores)))


def test_choose_threshold_is_finite_and_one_half_for_one_class():
    assert choose_threshold(np.array([1, 1, 1]), np.array([0.2, 0.9, 0.4])) == 0.5
    # Inverted scores: no cut beats J=0, which the lowest score reaches, never +inf.
    assert choose_threshold(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])) == 0.1


def test_weighted_metrics_equal_the_plain_ones_on_repeated_cases():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40), 1)  # ties
    weights = rng.integers(0, 4, size=(25, 40)).astype(float)
    auc = weighted_auc(labels, scores, weights)
    f1 = weighted_macro_f1(labels, scores >= 0.5, weights)
    sensitivity = weighted_share(scores >= 0.5, labels == 1, weights)
    for row, counts in enumerate(weights.astype(int)):
        repeated = np.repeat(np.arange(40), counts)
        y, s = labels[repeated], scores[repeated]
        plain = classification_metrics(y, np.c_[1 - s, s], ("VCD", "GC"))
        assert auc[row] == pytest.approx(plain["auc"], nan_ok=True)
        assert f1[row] == pytest.approx(plain["f1"])
        assert sensitivity[row] == pytest.approx(plain["sensitivity"])
