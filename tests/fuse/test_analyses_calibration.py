"""Recalibration on validation rows: temperature scaling repairs an overconfident head."""

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize
from synthetic_predictions import CLASSES, head_rows, runs_record

from fuse.analyses import AnalysisInputs, AnalysisSettings, calibration
from pipeline.metrics import expected_calibration_error


def _overconfident_head(rows_per_split: int = 400, seed: int = 0) -> pd.DataFrame:
    """True probabilities from a logistic model; the head reports logits three times too large."""
    rng = np.random.default_rng(seed)
    splits = np.repeat(["val", "test", "external"], rows_per_split)
    logits = rng.normal(0, 1.5, len(splits))
    positive = rng.random(len(splits)) < 1 / (1 + np.exp(-logits))
    scores = 1 / (1 + np.exp(-3 * logits))
    labels = np.where(positive, "GC", "VCD")
    patients = [f"P{i // 4}" for i in range(len(splits))]  # four images each
    return head_rows("M4", 0, scores, labels, splits, patients)


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_recalibration_on_validation_lowers_the_ece_of_an_overconfident_head(method):
    table = _overconfident_head()
    settings = AnalysisSettings(calibration=method)
    inputs = AnalysisInputs(table, runs_record(["M4"]), CLASSES, settings)
    result = calibration.analyse(inputs)
    ece = result.tables["ece_values"].set_index(["set", "calibration"])["ece"]
    for split in ("test", "external"):
        assert ece[(split, "none")] > 0.08, split  # the premise: badly calibrated
        assert ece[(split, method)] < ece[(split, "none")] / 2, split
    assert set(result.figures) == {"reliability_test", "reliability_external"}


def test_temperature_is_fitted_on_validation_rows_only():
    table = _overconfident_head()
    # flip every test label: a fit that saw test rows would learn a negative slope
    on_test = table["split"] == "test"
    table.loc[on_test, "label"] = np.where(table.loc[on_test, "label"] == "GC", "VCD", "GC")
    inputs = AnalysisInputs(table, runs_record(["M4"]), CLASSES, AnalysisSettings())
    after, _ = calibration.calibrated_rows(inputs, "temperature")
    validation = table[table["split"] == "val"]
    fitted = calibration.fit_temperature(
        validation["prob_GC"].to_numpy(dtype=float), (validation["label"] == "GC").to_numpy()
    )
    external = after[after["split"] == "external"].sort_values("row")
    raw = table[table["split"] == "external"].sort_values("row")["prob_GC"].to_numpy(dtype=float)
    np.testing.assert_allclose(external["score"], fitted(raw), rtol=1e-6)


def test_ece_uses_equal_width_bins():
    # bin [0.2, 0.3): 2 cases, mean 0.25, 1 positive -> gap 0.25; bin [0.9, 1]: 2 at 0.95, both
    # positive -> gap 0.05; weighted by half each
    labels = np.array([0, 1, 1, 1])
    scores = np.array([0.2, 0.3 - 1e-9, 0.95, 0.95])
    assert expected_calibration_error(labels, scores, bins=10) == pytest.approx(0.15)


@pytest.mark.parametrize("with_intercept", [False, True])
def test_logistic_fits_reach_the_likelihood_optimum_of_a_far_off_head(with_intercept):
    # logits twenty times too large and shifted: full Newton steps from (1, 0) overshoot
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300).astype(float)
    scores = 1 / (1 + np.exp(-20 * (rng.normal(0, 1, 300) + 0.6 * labels - 0.3) + 3))
    logits = calibration._logit(scores)
    design = np.c_[logits, np.ones(300)] if with_intercept else logits[:, None]

    def negative_log_likelihood(parameters):
        z = design @ parameters
        return np.mean(np.logaddexp(0, z) - labels * z)

    bounds = [calibration.SLOPE_BOUNDS] + ([(None, None)] if with_intercept else [])
    best = minimize(
        negative_log_likelihood, np.ones(design.shape[1]), method="L-BFGS-B", bounds=bounds
    ).x
    fit = calibration.fit_platt if with_intercept else calibration.fit_temperature
    probe = np.array([0.1, 0.5, 0.9])
    probe_design = np.c_[calibration._logit(probe), np.ones(3)][:, : design.shape[1]]
    expected = 1 / (1 + np.exp(-(probe_design @ best)))
    np.testing.assert_allclose(fit(scores, labels)(probe), expected, atol=1e-4)
