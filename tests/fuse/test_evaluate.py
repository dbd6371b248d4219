"""Numbers from a hand-made predictions table: per-trial metrics, thresholds, pooling, p-values."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from fuse.evaluate import evaluate, pooled_rows

CLASSES = ("VCD", "GC")


def table(model, trial, fold, scores, splits, labels, threshold=0.5):
    return pd.DataFrame(
        {
            "row": np.arange(len(scores)),
            "patient_id": [f"P{index}" for index in range(len(scores))],
            "label": labels,
            "split": splits,
            "model": model,
            "head": "head",
            "trial": trial,
            "fold": fold,
            "threshold": threshold,
            "prob_VCD": 1 - np.asarray(scores),
            "prob_GC": scores,
        }
    )


LABELS = ["VCD", "VCD", "GC", "GC", "VCD", "GC"]
SPLITS = ["test", "test", "test", "test", "external", "external"]


def test_trial_metrics_thresholds_and_mean_sd():
    trial0 = table("M4", 0, 0, [0.1, 0.6, 0.7, 0.9, 0.2, 0.8], SPLITS, LABELS, threshold=0.65)
    trial1 = table("M4", 1, 0, [0.4, 0.45, 0.3, 0.9, 0.2, 0.8], SPLITS, LABELS)
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


def test_folds_of_a_trial_are_pooled_and_external_scores_averaged():
    fold0 = table(
        "M1",
        0,
        0,
        [0.2, 0.5, 0.7, 0.9, 0.2, 0.6],
        ["test", "test", "train", "train", "external", "external"],
        LABELS,
    )
    fold1 = table(
        "M1",
        0,
        1,
        [0.5, 0.5, 0.8, 0.6, 0.4, 1.0],
        ["train", "train", "test", "test", "external", "external"],
        LABELS,
    )
    pooled = pooled_rows(pd.concat([fold0, fold1]), CLASSES).set_index(["split", "row"])
    assert list(pooled.loc["test"].index) == [0, 1, 2, 3]  # each test row once
    np.testing.assert_allclose(pooled.loc["test", "score"], [0.2, 0.5, 0.8, 0.6])
    np.testing.assert_allclose(pooled.loc["external", "score"], [0.3, 0.8])


def test_comparisons_give_delong_and_paired_trial_p_values():
    rng = np.random.default_rng(0)
    labels = ["VCD"] * 30 + ["GC"] * 30
    frames = []
    for trial in range(3):
        truth = np.r_[np.zeros(30), np.ones(30)]
        good = np.clip(truth * 0.6 + rng.uniform(0, 0.4, 60), 0, 1)
        poor = rng.uniform(0, 1, 60)
        for model, scores in (("M4", good), ("M2", poor)):
            frames.append(table(model, trial, 0, scores, ["test"] * 60, labels))
    compared = evaluate(pd.concat(frames), CLASSES, resamples=50)["comparisons"]
    row = compared.set_index("model").loc["M2"]
    assert row["patients"] == 60 and row["trials"] == 3
    assert row["delong_p"] < 0.001 and row["paired_t_p"] < 0.05
