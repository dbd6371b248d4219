"""Cuts for a target sensitivity/specificity are chosen on validation and only applied to test."""

import numpy as np
import pandas as pd
import pytest
from synthetic_predictions import CLASSES, head_rows, runs_record

from fuse.analyses import AnalysisInputs, AnalysisSettings, operating_points
from pipeline.metrics import threshold_for_sensitivity, threshold_for_specificity


def _shifted_head(seed: int = 0) -> pd.DataFrame:
    """Validation scores sit higher than test scores, so cuts chosen on the two differ."""
    rng = np.random.default_rng(seed)
    splits = np.repeat(["val", "test"], 200)
    positive = np.tile(np.arange(200) % 2 == 1, 2)
    scores = np.where(positive, 0.65, 0.35) + rng.normal(0, 0.12, 400)
    scores[splits == "test"] -= 0.15
    labels = np.where(positive, "GC", "VCD")
    patients = [f"P{i // 2}" for i in range(400)]  # two images each, one label
    return head_rows("M4", 0, np.clip(scores, 0, 1), labels, splits, patients)


def _table(table: pd.DataFrame) -> pd.DataFrame:
    inputs = AnalysisInputs(table, runs_record(["M4"]), CLASSES, AnalysisSettings(resamples=100))
    return operating_points.analyse(inputs).tables["points"].set_index("target")


def test_the_target_sensitivity_cut_meets_its_target_on_validation():
    points = _table(_shifted_head())
    assert points.loc["sensitivity 0.95", "val_sensitivity"] >= 0.95
    assert points.loc["specificity 0.95", "val_specificity"] >= 0.95
    row = points.loc["sensitivity 0.95"]
    assert row["sensitivity_low"] <= row["sensitivity"] <= row["sensitivity_high"]


def test_cuts_come_from_validation_rows_not_test_rows():
    table = _shifted_head()
    points = _table(table)
    for target, choose in (
        ("sensitivity", threshold_for_sensitivity),
        ("specificity", threshold_for_specificity),
    ):
        rows = {split: table[table["split"] == split] for split in ("val", "test")}
        cut = {
            split: choose((r["label"] == "GC").to_numpy(), r["prob_GC"].to_numpy(float), 0.95)
            for split, r in rows.items()
        }
        assert cut["val"] != pytest.approx(cut["test"], abs=0.02)  # the premise
        assert points.loc[f"{target} 0.95", "threshold"] == pytest.approx(cut["val"])
        test = rows["test"]
        called = test["prob_GC"].to_numpy(float) >= cut["val"]
        positive = (test["label"] == "GC").to_numpy()
        # on test the validation cut misses the target: shifted scores lose positives
        assert points.loc[f"{target} 0.95", "sensitivity"] == pytest.approx(called[positive].mean())
        assert points.loc[f"{target} 0.95", "specificity"] == pytest.approx(
            (~called[~positive]).mean()
        )
    assert points.loc["sensitivity 0.95", "sensitivity"] < 0.95


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_threshold_helpers_reach_their_target_with_the_tightest_cut(target):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 101)
    scores = rng.random(101)
    cut = threshold_for_sensitivity(labels, scores, target)
    assert (scores[labels == 1] >= cut).mean() >= target
    above = scores[(labels == 1) & (scores > cut)]
    assert (scores[labels == 1] >= above.min()).mean() < target if len(above) else True
    cut = threshold_for_specificity(labels, scores, target)
    assert (scores[labels == 0] < cut).mean() >= target
    below = scores[(labels == 0) & (scores < cut)]
    assert (scores[labels == 0] < below.max()).mean() < target
