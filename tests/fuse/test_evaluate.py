"""Numbers from a hand-made predictions table: per-trial metrics, thresholds, pooling, levels."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score
from synthetic_predictions import CLASSES, head_rows

from fuse.evaluate import at_level, evaluate, pooled_rows

LABELS = ["VCD", "VCD", "GC", "GC", "VCD", "GC"]
SPLITS = ["test", "test", "test", "test", "external", "external"]


def test_trial_metrics_thresholds_and_mean_sd():
    trial0 = head_rows("M4", 0, [0.1, 0.6, 0.7, 0.9, 0.2, 0.8], LABELS, SPLITS, threshold=0.65)
    trial1 = head_rows("M4", 1, [0.4, 0.45, 0.3, 0.9, 0.2, 0.8], LABELS, SPLITS)
    tables = evaluate(pd.concat([trial0, trial1]), CLASSES, resamples=50)
    per_trial = tables["per_trial"].set_index(["set", "trial"])
    y = np.array([0, 0, 1, 1])
    for trial, scores in ((0, [0.1, 0.6, 0.7, 0.9]), (1, [0.4, 0.45, 0.3, 0.9])):
        scores = np.array(scores)
        assert per_trial.loc[("test", trial), "auc@0.5"] == pytest.approx(roc_auc_score(y, scores))
        assert per_trial.loc[("test", trial), "accuracy@0.5"] == pytest.approx(
            accuracy_score(y, scores >= 0.5)
        )
    # Trial 0's validation threshold 0.65 turns row 1 (0.6) into a correct VCD call.
    assert per_trial.loc[("test", 0), "accuracy@val"] == 1.0
    assert per_trial.loc[("test", 0), "accuracy@0.5"] == 0.75
    summary = tables["summary"].set_index(["set", "metric"])
    accuracies = [0.75, accuracy_score(y, np.array([0.4, 0.45, 0.3, 0.9]) >= 0.5)]
    assert summary.loc[("test", "accuracy@0.5"), "mean"] == pytest.approx(np.mean(accuracies))
    assert summary.loc[("test", "accuracy@0.5"), "sd"] == pytest.approx(np.std(accuracies, ddof=1))
    assert (summary["trials"] == 2).all() and (summary["level"] == "image").all()


def test_folds_of_a_trial_are_pooled_and_external_scores_averaged():
    fold0_splits = ["test", "test", "train", "train", "external", "external"]
    fold1_splits = ["train", "train", "test", "test", "external", "external"]
    fold0 = head_rows("M1", 0, [0.2, 0.5, 0.7, 0.9, 0.2, 0.6], LABELS, fold0_splits)
    fold1 = head_rows("M1", 0, [0.5, 0.5, 0.8, 0.6, 0.4, 1.0], LABELS, fold1_splits, fold=1)
    pooled = pooled_rows(pd.concat([fold0, fold1]), CLASSES).set_index(["split", "row"])
    assert list(pooled.loc["test"].index) == [0, 1, 2, 3]  # each test row once
    np.testing.assert_allclose(pooled.loc["test", "score"], [0.2, 0.5, 0.8, 0.6])
    np.testing.assert_allclose(pooled.loc["external", "score"], [0.3, 0.8])


def test_exam_and_patient_scores_are_the_mean_or_max_of_their_images():
    # patient A: two exams (2 + 1 images), patient B: one exam of 2 images
    patients = ["A", "A", "A", "B", "B"]
    exams = ["A-1", "A-1", "A-2", "B-1", "B-1"]
    labels = ["VCD", "VCD", "GC", "VCD", "VCD"]
    rows = head_rows(
        "M4", 0, [0.2, 0.4, 0.9, 0.1, 0.3], labels, ["test"] * 5, patients, exams=exams
    )
    pooled = pooled_rows(rows, CLASSES)
    exam = at_level(pooled, "exam", CLASSES).set_index("exam_id")
    np.testing.assert_allclose(exam.loc[["A-1", "A-2", "B-1"], "score"], [0.3, 0.9, 0.2])
    assert list(exam.loc[["A-1", "A-2", "B-1"], "images"]) == [2, 1, 2]
    patient = at_level(pooled, "patient", CLASSES, "max").set_index("patient_id")
    np.testing.assert_allclose(patient.loc[["A", "B"], "score"], [0.9, 0.3])
    # a patient with one carcinoma exam is a carcinoma patient
    assert list(patient.loc[["A", "B"], "label"]) == ["GC", "VCD"]
    mean = at_level(pooled, "patient", CLASSES).set_index("patient_id")
    np.testing.assert_allclose(mean.loc[["A", "B"], "score"], [0.5, 0.2])


def test_paired_trial_p_sits_beside_the_per_trial_image_aucs_it_tests():
    rng = np.random.default_rng(0)
    labels = ["VCD"] * 30 + ["GC"] * 30
    frames = []
    for trial in range(3):
        truth = np.r_[np.zeros(30), np.ones(30)]
        good = np.clip(truth * 0.6 + rng.uniform(0, 0.4, 60), 0, 1)
        poor = rng.uniform(0, 1, 60)
        for model, scores in (("M4", good), ("M2", poor)):
            frames.append(head_rows(model, trial, scores, labels, ["test"] * 60))
    tables = evaluate(pd.concat(frames), CLASSES, resamples=50)
    row = tables["trial_tests"].set_index("model").loc["M2"]
    assert row["trials"] == 3 and row["paired_t_p"] < 0.05 and row["level"] == "image"
    summary = tables["summary"].set_index(["model", "metric"])
    assert row["auc_model"] == pytest.approx(summary.loc[("M2", "auc@0.5"), "mean"])
    assert row["auc_reference"] == pytest.approx(summary.loc[("M4", "auc@0.5"), "mean"])
