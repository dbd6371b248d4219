"""Net benefit against treat-all and treat-none."""

import numpy as np
import pytest
from synthetic_predictions import CLASSES, head_rows, runs_record

from fuse.analyses import AnalysisInputs, AnalysisSettings, decision_curve
from pipeline.metrics import net_benefit


def test_net_benefit_counts_true_and_weighted_false_positives():
    labels = np.array([1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.3, 0.6, 0.2, 0.1])
    # at p = 0.25: treated 0.9, 0.3, 0.6 -> TP 2, FP 1; NB = 2/5 - 1/5 * 1/3
    # at p = 0.5: treated 0.9, 0.6 -> TP 1, FP 1; NB = 1/5 - 1/5
    np.testing.assert_allclose(
        net_benefit(labels, scores, np.array([0.25, 0.5])), [0.4 - 0.2 / 3, 0.0]
    )


def test_curves_hold_treat_all_and_treat_none_and_the_table_reads_them():
    labels = ["GC", "GC", "VCD", "VCD", "VCD"] * 4
    scores = [0.9, 0.3, 0.6, 0.2, 0.1] * 4
    table = head_rows("M4", 0, scores, labels, ["test"] * 20)
    settings = AnalysisSettings(decision_thresholds=(0.25, 0.5))
    result = decision_curve.analyse(AnalysisInputs(table, runs_record(["M4"]), CLASSES, settings))
    shown = result.tables["at_thresholds"].set_index("strategy")
    assert shown.loc["M4", "net benefit at 0.25"] == pytest.approx(0.4 - 0.2 / 3)
    prevalence = 0.4
    assert shown.loc["treat all", "net benefit at 0.5"] == pytest.approx(
        prevalence - (1 - prevalence)
    )
    assert shown.loc["treat none", "net benefit at 0.25"] == 0.0
    curve = result.tables["curve"]
    assert curve["threshold"].min() == 0.01 and curve["threshold"].max() == 0.99
    assert set(result.figures) == {"test"}
