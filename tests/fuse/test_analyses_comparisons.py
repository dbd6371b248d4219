"""Every p-value beside AUCs of its own level, and a flag where levels order models differently."""

import numpy as np
import pandas as pd
import pytest
from synthetic_predictions import CLASSES, head_rows, runs_record

from fuse.analyses import AnalysisInputs, AnalysisSettings, comparisons
from pipeline.metrics import roc_auc
from pipeline.stats import delong_test

PATIENTS, IMAGES = 20, 5


def _disagreeing_table() -> pd.DataFrame:
    """M4 wins on images but loses on patients: one outlier image per patient drags each
    patient's mean across; M1's images are noisy around patient means that separate."""
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i:02d}" for i in range(PATIENTS)], IMAGES)
    positive = np.repeat(np.arange(PATIENTS) % 2 == 1, IMAGES)
    labels = np.where(positive, "GC", "VCD")
    outlier = np.tile(np.arange(IMAGES) == 0, PATIENTS)
    frames = []
    for trial in range(2):
        m4 = np.where(positive, 0.55, 0.3) + rng.uniform(0, 0.05, len(labels))
        m4[outlier] = np.where(positive[outlier], 0.0, 1.0)
        m1 = np.clip(np.where(positive, 0.53, 0.47) + rng.normal(0, 0.25, len(labels)), 0, 1)
        for model, scores in (("M4", m4), ("M1", m1)):
            frames.append(head_rows(model, trial, scores, labels, ["test"] * len(labels), patients))
    return pd.concat(frames, ignore_index=True)


def _auc_at(table: pd.DataFrame, model: str, level: str) -> float:
    """The AUC of trial-averaged scores at `level`, computed here from the raw table."""
    rows = table[table["model"] == model]
    images = rows.groupby("row").agg(score=("prob_GC", "mean"), label=("label", "first"))
    images["patient_id"] = rows.groupby("row")["patient_id"].first()
    if level == "patient":
        images = images.groupby("patient_id").agg(score=("score", "mean"), label=("label", "first"))
    if level == "image, per trial":
        return float(
            np.mean([roc_auc(t["label"] == "GC", t["prob_GC"]) for _, t in rows.groupby("trial")])
        )
    return roc_auc(images["label"] == "GC", images["score"].to_numpy())


def test_every_p_value_sits_beside_aucs_of_its_own_level_and_the_order_change_is_flagged():
    table = _disagreeing_table()
    inputs = AnalysisInputs(
        table, runs_record(["M4", "M1"]), CLASSES, AnalysisSettings(resamples=200)
    )
    result = comparisons.analyse(inputs)
    compared = result.tables["auc"].set_index("level")
    # the premise: image and patient level order the two models differently
    assert _auc_at(table, "M4", "image") > _auc_at(table, "M1", "image")
    assert _auc_at(table, "M4", "patient") < _auc_at(table, "M1", "patient")
    for level in ("image, per trial", "image", "patient"):
        row = compared.loc[level]
        assert row["auc_reference"] == pytest.approx(_auc_at(table, "M4", level), abs=1e-6), level
        assert row["auc_model"] == pytest.approx(_auc_at(table, "M1", level), abs=1e-6), level
    # the patient p is DeLong's on those very patient scores
    patient = (
        table.groupby(["model", "patient_id"])
        .agg(score=("prob_GC", "mean"), label=("label", "first"))
        .reset_index()
    )
    m4, m1 = (patient[patient["model"] == name].set_index("patient_id") for name in ("M4", "M1"))
    delong = delong_test((m4["label"] == "GC").to_numpy(), m4["score"], m1.loc[m4.index, "score"])
    assert compared.loc["patient", "p_value"] == pytest.approx(delong["p_value"])
    assert compared.loc["patient", "test"] == "DeLong on patients"
    assert compared.loc["image", "test"] == "paired patient bootstrap"
    flagged = [note for note in result.notes if note.startswith("Order changes")]
    assert len(flagged) == 1 and "M1" in flagged[0] and "patient:" in flagged[0]


def test_no_flag_when_every_level_agrees():
    table = _disagreeing_table()
    better = table["model"] == "M4"
    positive = table["label"] == "GC"
    table.loc[better, "prob_GC"] = np.where(positive[better], 0.9, 0.1).astype(np.float32)
    inputs = AnalysisInputs(
        table, runs_record(["M4", "M1"]), CLASSES, AnalysisSettings(resamples=50)
    )
    notes = comparisons.analyse(inputs).notes
    assert not any(note.startswith("Order changes") for note in notes)


def test_the_difference_ci_is_paired_on_the_same_resampled_patients():
    # M1 = M4 plus a small shift per patient: the AUCs move together from one resample to
    # the next, so the paired CI of their difference is far narrower than either AUC's spread
    table = _disagreeing_table()
    m4 = table[table["model"] == "M1"].assign(model="M4")  # patient means spread out
    shift = np.random.default_rng(1).normal(0, 0.01, m4["patient_id"].nunique())
    code = m4["patient_id"].astype("category").cat.codes.to_numpy()
    m1 = m4.assign(model="M1", prob_GC=(m4["prob_GC"] + shift[code]).astype(np.float32))
    inputs = AnalysisInputs(
        pd.concat([m4, m1]), runs_record(["M4", "M1"]), CLASSES, AnalysisSettings(resamples=300)
    )
    row = comparisons.analyse(inputs).tables["auc"].set_index("level").loc["patient"]
    assert row["difference_high"] - row["difference_low"] < 0.1
