"""The protocol end to end on a synthetic cache: predictions table, standardisation, report."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.store import FeatureSet, read_features, write_features
from fuse import protocol, report
from fuse.protocol import ProtocolConfig, run
from fuse.schema import PREDICTIONS_FILE, RUNS_FILE, read_predictions
from pipeline.errors import UserError
from pipeline.splits import plan_trials

REPO = Path(__file__).parents[2]
FAST = {"epochs": 6, "warmup_epochs": 1, "learning_rate": 1e-3, "trials": 2}


def config_for(files, out: Path, **overrides) -> ProtocolConfig:
    settings = {**FAST, "models": ("M4", "M1", "M2"), **overrides}
    return ProtocolConfig(
        manifest=str(files["manifest"]),
        features=(str(files["image"]), str(files["text"])),
        out=str(out),
        **settings,
    )


def test_predictions_table_holds_every_row_model_head_and_trial(synthetic_cache, tmp_path):
    result = run(config_for(synthetic_cache, tmp_path / "p"))
    everything = pd.read_parquet(tmp_path / "p" / PREDICTIONS_FILE)
    table = everything[everything["condition"] == "observed"]
    manifest = pd.read_csv(synthetic_cache["manifest"])
    assert len(table) == len(manifest) * 3 * 2 * 2  # models x heads x trials
    # Only M4 has both an image and a report input to replace, on test and external rows.
    replaced = everything[everything["condition"] != "observed"]
    assert set(replaced["model"]) == {"M4"} and set(replaced["split"]) == {"test", "external"}
    assert {
        "row",
        "image_path",
        "patient_id",
        "exam_id",
        "split",
        "model",
        "head",
        "trial",
        "fold",
        "label",
        "prob_VCD",
        "prob_GC",
    } <= set(table.columns)
    np.testing.assert_allclose(table["prob_VCD"] + table["prob_GC"], 1.0, atol=1e-5)
    runs = json.loads((tmp_path / "p" / RUNS_FILE).read_text())
    assert runs == json.loads(json.dumps(result, default=str))
    assert len(runs["runs"]) == 3 * 2 * 2 and {r["seed"] for r in runs["runs"]} == {0, 1}
    assert "frozen-feature" in runs["note"]
    assert runs["data"]["manifest"]["sha256"]
    # Separable synthetic features: every head must learn something.
    test = table[(table["split"] == "test") & (table["head"] == "head")]
    for model, rows in test.groupby("model"):
        correct = (rows["prob_GC"] >= 0.5) == (rows["label"] == "GC")
        assert correct.mean() > 0.75, model


@pytest.mark.parametrize("mode", ["redraw", "fixed", "kfold"])
def test_no_patient_is_in_two_splits_of_any_trial_or_fold(synthetic_cache, tmp_path, mode):
    run(
        config_for(
            synthetic_cache, tmp_path / "p", split=mode, folds=3, models=("M1",), probes=False
        )
    )
    table = read_predictions(tmp_path / "p", ("VCD", "GC"))
    per_patient = table.groupby(["trial", "fold", "patient_id"])["split"].nunique()
    assert (per_patient == 1).all()
    internal = table[table["split"] != "external"]
    if mode == "kfold":  # every internal patient is tested exactly once per trial
        tested = internal[internal["split"] == "test"].groupby(["trial", "patient_id"])["fold"]
        assert (tested.nunique() == 1).all()
        assert tested.ngroups == 2 * internal["patient_id"].nunique()
    splits_of = internal.groupby("trial").apply(lambda t: tuple(t["split"]), include_groups=False)
    assert (splits_of.iloc[0] == splits_of.iloc[1]) == (mode == "fixed")


@pytest.mark.parametrize("centre_external", [True, False])
def test_an_offset_of_the_external_site_is_taken_out_when_centring(
    synthetic_cache, tmp_path, centre_external
):
    config = {"models": ("M1",), "trials": 1, "centre_external": centre_external}
    run(config_for(synthetic_cache, tmp_path / "a", **config))
    image = read_features(synthetic_cache["image"])
    first = read_predictions(tmp_path / "a", ("VCD", "GC"))
    external = first.loc[first["split"] == "external", "image_path"].unique()
    vectors = image.vectors.copy()
    vectors[[image.keys.index(image.sources[path]) for path in external]] += 3.0
    write_features(
        synthetic_cache["image"],
        FeatureSet(image.keys, vectors, image.provenance, sources=image.sources),
    )
    run(config_for(synthetic_cache, tmp_path / "b", **config))
    second = read_predictions(tmp_path / "b", ("VCD", "GC"))
    on_external = (first["split"] == "external").to_numpy()
    a, b = first["prob_GC"].to_numpy()[on_external], second["prob_GC"].to_numpy()[on_external]
    assert np.allclose(a, b, atol=1e-5) == centre_external


def test_test_rows_do_not_change_what_the_heads_learn(synthetic_cache, tmp_path):
    run(config_for(synthetic_cache, tmp_path / "a", models=("M1",), trials=1))
    image = read_features(synthetic_cache["image"])
    table = read_predictions(tmp_path / "a", ("VCD", "GC"))
    first = table[table["head"] == "head"]
    held_out = first.loc[first["split"].isin(["test", "external"]), "image_path"]
    rows = [image.keys.index(image.sources[path]) for path in held_out]
    vectors = image.vectors.copy()
    vectors[rows] += 50.0
    write_features(
        synthetic_cache["image"],
        FeatureSet(image.keys, vectors, image.provenance, sources=image.sources),
    )
    run(config_for(synthetic_cache, tmp_path / "b", models=("M1",), trials=1))
    second = read_predictions(tmp_path / "b", ("VCD", "GC"))
    seen = first["split"].isin(["train", "val"]).to_numpy()
    for head in ("head", "probe"):
        a = table[table["head"] == head]["prob_GC"].to_numpy()
        b = second[second["head"] == head]["prob_GC"].to_numpy()
        np.testing.assert_allclose(a[seen], b[seen], atol=1e-6)
        assert not np.allclose(a[~seen], b[~seen])


def test_learning_rate_search_picks_on_validation_and_records_it(synthetic_cache, tmp_path):
    result = run(
        config_for(synthetic_cache, tmp_path / "p", models=("M2",), learning_rates=(1e-7, 1e-2))
    )
    tried = result["learning_rate_search"]["M2"]
    assert [entry["learning_rate"] for entry in tried] == [1e-7, 1e-2]
    assert {r["learning_rate"] for r in result["runs"] if r["head"] == "head"} == {1e-2}


def test_the_largest_heads_are_fitted_first_and_each_model_searched_once(
    synthetic_cache, tmp_path, monkeypatch
):
    fitted = []
    fit = protocol._fit

    def recorded_fit(job, data, kind, settings, config):
        fitted.append((job.model.name, job.split.trial, kind, settings.learning_rate))
        return fit(job, data, kind, settings, config)

    monkeypatch.setattr(protocol, "_fit", recorded_fit)
    run(
        config_for(
            synthetic_cache,
            tmp_path / "p",
            models=("M1", "M4", "M2"),
            learning_rates=(1e-3, 3e-3),
            epochs=3,
        )
    )
    heads = [(model, trial) for model, trial, kind, _ in fitted if kind == "head"]
    # M4 projects both inputs (512 + 2048 wide) into its MLP, M2 the report (2048), M1 the
    # image (512); each model's first trial first, searched on both rates, and that
    # search's winner is the trial's head (no third fit of trial 0)
    assert heads == [
        ("M4", 0),
        ("M4", 0),
        ("M4", 1),
        ("M2", 0),
        ("M2", 0),
        ("M2", 1),
        ("M1", 0),
        ("M1", 0),
        ("M1", 1),
    ]
    assert [rate for model, trial, kind, rate in fitted if kind == "head" and trial == 0][:2] == [
        1e-3,
        3e-3,
    ]


def test_missing_features_and_other_data_are_refused(synthetic_cache, tmp_path):
    with pytest.raises(
        UserError, match="no feature file holds image features of encoder blip2-vit"
    ):
        run(config_for(synthetic_cache, tmp_path / "p", models=("M3",)))
    manifest = pd.read_csv(synthetic_cache["manifest"], dtype=str, keep_default_na=False)
    manifest.loc[0, "image_path"] = "images/other.png"
    manifest.to_csv(synthetic_cache["manifest"], index=False)

    result = run(config_for(synthetic_cache, tmp_path / "one-missing"))

    assert any(
        f"1 of {len(manifest)} pair(s) have no vector" in note and "left out of every model" in note
        for note in result["data"]["notes"]
    ), result["data"]["notes"]
    predictions = read_predictions(tmp_path / "one-missing", ("VCD", "GC"))
    assert "images/other.png" not in set(predictions["image_path"])
    assert predictions.groupby(["model", "head", "trial"]).size().eq(len(manifest) - 1).all()
    manifest["report_text"] = "另一个数据集的报告"
    manifest.to_csv(synthetic_cache["manifest"], index=False)
    with pytest.raises(UserError, match="no pair of .* has a vector in every feature file"):
        run(config_for(synthetic_cache, tmp_path / "other-data"))


def test_report_tables_plots_and_small_dvc_metrics(synthetic_cache, tmp_path):
    run(config_for(synthetic_cache, tmp_path / "protocol"))
    tables = report.run(
        report.ReportConfig(
            protocol=str(tmp_path / "protocol"), out=str(tmp_path / "r"), bootstrap_resamples=100
        )
    )
    text = (tmp_path / "r" / "tables.md").read_text()
    assert "Table 4: ablation, internal test set (image level)" in text
    assert "p vs M4 (paired t, per-trial image AUCs)" in text and "DeLong vs" not in text
    assert "frozen-feature heads" in text
    for name in ("roc_internal.png", "roc_external.png", "training_curves.png"):
        assert (tmp_path / "r" / name).stat().st_size > 10_000
    metrics = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "r" / "metrics").glob("*")}
    assert set(metrics) == {"M4", "M1", "M2"}
    assert set(metrics["M4"]) == {"test_auc", "test_accuracy", "external_auc", "external_accuracy"}
    summary = tables["summary"]
    m4_auc = summary[
        (summary["model"] == "M4")
        & (summary["head"] == "head")
        & (summary["set"] == "test")
        & (summary["metric"] == "auc@0.5")
    ]
    assert metrics["M4"]["test_auc"] == pytest.approx(float(m4_auc["mean"].iloc[0]))
    compared = tables["comparisons.auc"]
    assert set(compared["model"]) == {"M1", "M2"} and compared["p_value"].between(0, 1).all()
    assert set(compared["level"]) == {"image, per trial", "image", "exam", "patient"}
    listed = json.loads((tmp_path / "r" / "tables.json").read_text())["analyses_run"]
    assert f"Analyses run: {', '.join(listed)}." in text
    for name in listed:  # every analysis wrote its tables, and its figures where it has some
        assert list((tmp_path / "r" / "analyses").glob(f"{name}_*.csv")), name
    for figure in ("calibration_reliability_test", "decision_curve_external"):
        assert (tmp_path / "r" / "plots" / f"{figure}.png").stat().st_size > 10_000


def test_cli_runs_both_commands_and_reports_user_errors(synthetic_cache, tmp_path):
    protocol = [
        sys.executable,
        "-m",
        "fuse",
        "protocol",
        "--manifest",
        str(synthetic_cache["manifest"]),
        "--features",
        str(synthetic_cache["image"]),
        str(synthetic_cache["text"]),
        "--out",
        str(tmp_path / "p"),
        "--models",
        "M4",
        "--trials",
        "1",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
    ]
    done = subprocess.run(protocol, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuse",
            "report",
            "--protocol",
            str(tmp_path / "p"),
            "--out",
            str(tmp_path / "r"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "r" / "tables.md").is_file()
    wrong = subprocess.run([*protocol, "--models", "M9"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert wrong.stderr.startswith("error: models ['M9']")


def test_plan_trials_kfold_needs_enough_patients(synthetic_cache):
    table = pd.read_csv(synthetic_cache["manifest"], dtype=str, keep_default_na=False)
    with pytest.raises(UserError, match="at least 40 patients of each label"):
        plan_trials(table, "kfold", 1, folds=40)


def test_patience_reaches_every_head_and_its_record(synthetic_cache, tmp_path):
    config = config_for(
        synthetic_cache, tmp_path / "p", epochs=60, patience=3, learning_rate=0.05, probes=False
    )
    runs = run(config)["runs"]
    curves = pd.read_csv(tmp_path / "p" / "training_curves.csv")
    for record in runs:
        trained = curves[
            (curves["model"] == record["model"]) & (curves["trial"] == record["trial"])
        ]
        assert len(trained) == record["epochs_trained"]
        assert record["epochs_trained"] == record["best_epoch"] + 3 < 60
