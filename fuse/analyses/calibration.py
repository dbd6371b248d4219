"""Calibration: ECE and reliability diagrams, before and after recalibrating on validation.

Each head's probabilities are recalibrated on that head's own validation rows by
temperature scaling (one parameter on the logit), Platt scaling (slope and intercept on
the logit) or isotonic regression, and applied unchanged to its test and external rows.
Which method does best on validation is judged by the Brier score of cross-fitted
validation predictions (fit on the other validation patients, predict the held-out ones):
in-sample, isotonic regression would always win. The report setting `calibration` says
which method is applied to the figures and the ECE after calibration.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy.special import expit
from sklearn.calibration import calibration_curve
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import GroupKFold

from fuse.analyses.base import SET_TITLES, AnalysisInputs, AnalysisResult, refit_per_head, sets_of
from fuse.evaluate import pooled_rows
from pipeline.metrics import expected_calibration_error
from pipeline.stats import format_mean_sd, mean_sd

Calibrator = Callable[[np.ndarray], np.ndarray]
EPSILON = 1e-6  # keeps logits of probabilities 0 and 1 finite
CROSS_FIT_FOLDS = 5
SLOPE_BOUNDS = (1e-2, 1e2)  # 1 / temperature
NEWTON_STEPS = 50


def _logit(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(probabilities, EPSILON, 1 - EPSILON)
    return np.log(clipped / (1 - clipped))


def _fit_logistic(scores: np.ndarray, labels: np.ndarray, with_intercept: bool) -> Calibrator:
    """sigmoid(a * logit(p) + b) by maximum likelihood; b = 0 is temperature scaling, T = 1/a.

    Newton steps with backtracking on the convex log-likelihood (one or two parameters:
    a general-purpose optimiser costs far more per head than the fit itself).
    """
    design = _logit(scores)[:, None]
    if with_intercept:
        design = np.c_[design, np.ones(len(design))]
    labels = np.asarray(labels, dtype=float)

    def negative_log_likelihood(parameters: np.ndarray) -> float:
        z = design @ parameters
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))  # log(1 + e^z) - y z, stably

    parameters = np.r_[1.0, 0.0][: design.shape[1]]
    current = negative_log_likelihood(parameters)
    for _ in range(NEWTON_STEPS):
        predicted = expit(design @ parameters)
        gradient = design.T @ (predicted - labels) / len(labels)
        hessian = (design * (predicted * (1 - predicted))[:, None]).T @ design / len(labels)
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(parameters)), gradient)
        size = 1.0
        while True:
            trial = parameters - size * step
            # On separable validation rows the likelihood grows without bound with the slope;
            # the bound keeps the fit finite (temperature 0.01 to 100).
            trial[0] = np.clip(trial[0], *SLOPE_BOUNDS)
            value = negative_log_likelihood(trial)
            if value <= current or size < 1e-4:
                break
            size /= 2
        converged = abs(current - value) < 1e-12
        parameters, current = trial, min(value, current)
        if converged:
            break
    slope, offset = parameters[0], (parameters[1] if with_intercept else 0.0)
    return lambda new: expit(slope * _logit(new) + offset)


def fit_temperature(scores: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Temperature scaling: the positive logit divided by one fitted T."""
    return _fit_logistic(scores, labels, with_intercept=False)


def fit_platt(scores: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Platt scaling: a logistic regression on the positive logit."""
    return _fit_logistic(scores, labels, with_intercept=True)


def fit_isotonic(scores: np.ndarray, labels: np.ndarray) -> Calibrator:
    """Isotonic regression of the label on the score, clipped outside the fitted range."""
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
    return fitted.predict


CALIBRATORS: dict[str, Callable[[np.ndarray, np.ndarray], Calibrator]] = {
    "temperature": fit_temperature,
    "platt": fit_platt,
    "isotonic": fit_isotonic,
}


def _can_fit(labels: np.ndarray) -> bool:
    return len(np.unique(labels)) == 2


def cross_fitted_brier(validation: pd.DataFrame, method: str) -> float:
    """Brier score of `method` on validation rows, each predicted by a fit without its patient."""
    labels = validation["positive"].to_numpy(dtype=float)
    scores = validation["score"].to_numpy()
    groups = validation["patient_id"].to_numpy()
    folds = min(CROSS_FIT_FOLDS, len(np.unique(groups)))
    if folds < 2 or not _can_fit(labels):
        return float("nan")
    predicted = np.full(len(labels), np.nan)
    for fit_rows, held_out in GroupKFold(n_splits=folds).split(scores, labels, groups):
        if not _can_fit(labels[fit_rows]):
            return float("nan")
        predicted[held_out] = CALIBRATORS[method](scores[fit_rows], labels[fit_rows])(
            scores[held_out]
        )
    return float(np.mean((predicted - labels) ** 2))


def calibrated_rows(inputs: AnalysisInputs, method: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fold-pooled test/external rows recalibrated by `method`, and each head's validation fit.

    A head whose validation rows hold one class keeps its scores (nothing to fit).
    """
    fits = []

    def recalibrate(validation: pd.DataFrame, evaluated: pd.DataFrame) -> pd.DataFrame:
        labels = validation["positive"].to_numpy(dtype=float)
        head = evaluated.iloc[0]
        fits.append(
            {
                "model": head["model"],
                "head": head["head"],
                "trial": head["trial"],
                "fold": head["fold"],
                "validation_rows": len(validation),
                **{f"brier_{name}": cross_fitted_brier(validation, name) for name in CALIBRATORS},
                "brier_none": float(np.mean((validation["score"] - labels) ** 2)),
            }
        )
        if not _can_fit(labels):
            return evaluated
        calibrator = CALIBRATORS[method](validation["score"].to_numpy(), labels)
        return evaluated.assign(score=calibrator(evaluated["score"].to_numpy()))

    return refit_per_head(inputs, recalibrate), pd.DataFrame(fits)


def ece_table(before: pd.DataFrame, after: pd.DataFrame, bins: int, method: str) -> pd.DataFrame:
    """ECE per model, head and set, mean (SD) over trials, before and after recalibration."""
    records = []
    for name, rows in (("none", before), (method, after)):
        for (model, head, split), group in rows.groupby(["model", "head", "split"], sort=False):
            per_trial = [
                expected_calibration_error(
                    trial["positive"].to_numpy(), trial["score"].to_numpy(), bins
                )
                for _, trial in group.groupby("trial")
            ]
            mean, sd = mean_sd(per_trial)
            records.append(
                {
                    "level": "image",
                    "model": model,
                    "head": head,
                    "set": split,
                    "calibration": name,
                    "trials": len(per_trial),
                    "ece": mean,
                    "ece_sd": sd,
                }
            )
    return pd.DataFrame(records)


def method_table(fits: pd.DataFrame) -> pd.DataFrame:
    """Per model and head kind: each method's cross-fitted validation Brier score (image
    level), mean over its heads (every trial and fold)."""
    columns = ["brier_none", *(f"brier_{name}" for name in CALIBRATORS)]
    grouped = fits.groupby(["model", "head"], sort=False)
    table = grouped[columns].mean().reset_index()
    table.insert(2, "heads", grouped.size().to_numpy())
    methods = table[[f"brier_{name}" for name in CALIBRATORS]]
    table["best_on_validation"] = [
        min(CALIBRATORS, key=lambda name, row=row: row[f"brier_{name}"])
        if row.notna().any()
        else "–"
        for _, row in methods.iterrows()
    ]
    return table


def reliability_figure(
    before: pd.DataFrame, after: pd.DataFrame, split: str, bins: int, method: str
) -> Figure:
    """Observed positive rate against mean probability in equal-width bins, trained heads,
    all trials' rows together; left as scored, right after recalibration."""
    figure = Figure(figsize=(10, 4.6), layout="tight")
    axes = figure.subplots(1, 2, sharey=True)
    for axis, rows, name in zip(
        axes, (before, after), ("as scored", f"after {method}"), strict=True
    ):
        chosen = rows[(rows["split"] == split) & (rows["head"] == "head")]
        for model, group in chosen.groupby("model", sort=False):
            observed, predicted = calibration_curve(
                group["positive"].to_numpy(), group["score"].to_numpy(), n_bins=bins
            )
            ece = expected_calibration_error(
                group["positive"].to_numpy(), group["score"].to_numpy(), bins
            )
            axis.plot(
                predicted, observed, marker="o", markersize=3, label=f"{model} (ECE {ece:.3f})"
            )
        axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect")
        axis.set(
            title=f"{SET_TITLES[split]}, {name}",
            xlabel="mean predicted probability",
            xlim=(0, 1),
            ylim=(0, 1),
        )
        axis.legend(fontsize="small", loc="upper left")
    axes[0].set_ylabel("observed positive rate")
    return figure


def analyse(inputs: AnalysisInputs) -> AnalysisResult:
    """ECE and reliability diagrams per model and set, as scored and after recalibration."""
    settings = inputs.settings
    method, bins = settings.calibration, settings.calibration_bins
    before = pooled_rows(inputs.predictions, inputs.classes)
    after, fits = calibrated_rows(inputs, method)
    ece = ece_table(before, after, bins, method)
    methods = method_table(fits)
    shown_ece = ece.assign(
        ece=[format_mean_sd(m, s) for m, s in zip(ece["ece"], ece["ece_sd"], strict=True)]
    )
    return AnalysisResult(
        title="Calibration",
        notes=[
            f"Expected calibration error over {bins} equal-width bins of the positive "
            "probability, per trial (folds pooled), mean (SD) over trials. Every head is "
            "recalibrated on its own validation rows and applied to its test and external rows "
            f"unchanged; applied here: {method} (report setting `calibration`). The methods "
            "table gives each method's Brier score on validation rows predicted by fits "
            "without their patient (cross-fitted over "
            f"{CROSS_FIT_FOLDS} patient folds; in-sample, isotonic would always win)."
        ],
        tables={
            "ece": shown_ece.drop(columns="ece_sd"),
            "ece_values": ece,
            "methods": methods,
            "fits": fits,
        },
        figures={
            f"reliability_{split}": reliability_figure(before, after, split, bins, method)
            for split in sets_of(before)
        },
        shown=("ece", "methods"),
    )
