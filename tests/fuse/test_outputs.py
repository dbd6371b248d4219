"""The protocol's and the report's outputs: one writer at a time, whole or not at all, and
heads that never learned are said on the console."""

import numpy as np
import pandas as pd
import pytest

from cache.store import FeatureSet, read_features, write_features
from fuse import protocol, report
from fuse.schema import PREDICTIONS_FILE, read_predictions
from pipeline.errors import UserError
from pipeline.lock import output_lock

QUICK = {"models": ("M1",), "trials": 1, "epochs": 3, "warmup_epochs": 1, "probes": False}


def config(files, out, **overrides):
    return protocol.ProtocolConfig(
        manifest=str(files["manifest"]),
        features=(str(files["image"]), str(files["text"])),
        out=str(out),
        **{**QUICK, **overrides},
    )


def test_a_second_protocol_or_report_on_one_folder_is_refused(synthetic_cache, tmp_path):
    out = tmp_path / "p"
    with output_lock(out), pytest.raises(UserError, match="being written by another run"):
        protocol.run(config(synthetic_cache, out))
    protocol.run(config(synthetic_cache, out))
    settings = report.ReportConfig(
        protocol=str(out), out=str(tmp_path / "r"), bootstrap_resamples=10
    )
    with output_lock(tmp_path / "r"), pytest.raises(UserError, match="another run"):
        report.run(settings)


def test_a_protocol_that_fails_midway_leaves_the_last_complete_folder(
    synthetic_cache, tmp_path, monkeypatch
):
    out = tmp_path / "p"
    protocol.run(config(synthetic_cache, out, heads=str(tmp_path / "models"), save_models=("M1",)))
    before = (out / PREDICTIONS_FILE).read_bytes()
    heads_before = {path.name: path.read_bytes() for path in (tmp_path / "models" / "M1").iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a kill after the table and the heads, during the curves

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(KeyboardInterrupt):  # another seed: every output would differ
        protocol.run(
            config(
                synthetic_cache, out, heads=str(tmp_path / "models"), save_models=("M1",), seed=1
            )
        )
    assert (out / PREDICTIONS_FILE).read_bytes() == before
    assert {
        path.name: path.read_bytes() for path in (tmp_path / "models" / "M1").iterdir()
    } == heads_before
    assert not list(tmp_path.glob("*.partial"))


def test_a_report_rewrites_its_files_and_leaves_the_protocol_folder(synthetic_cache, tmp_path):
    out = tmp_path / "reports"
    protocol.run(config(synthetic_cache, out / "protocol"))
    settings = report.ReportConfig(
        protocol=str(out / "protocol"), out=str(out), bootstrap_resamples=10
    )
    report.run(settings)
    (out / "tables.md").write_text("stale")
    report.run(settings)
    assert (out / "tables.md").read_text().startswith("# Results")
    assert (out / "protocol" / PREDICTIONS_FILE).is_file()
    assert not [path.name for path in out.iterdir() if path.name.startswith(".staging")]


def test_a_head_that_never_predicts_both_classes_is_said_on_the_console(
    synthetic_cache, tmp_path, capsys
):
    image = read_features(synthetic_cache["image"])
    write_features(
        synthetic_cache["image"],
        FeatureSet(
            image.keys,
            np.ones_like(image.vectors),  # every image the same: nothing to separate
            image.provenance,
            sources=image.sources,
        ),
    )
    protocol.run(config(synthetic_cache, tmp_path / "p"))
    assert "M1 head (trial 0, fold 0): no epoch after warm-up predicted both classes" in (
        capsys.readouterr().err
    )
    table = read_predictions(tmp_path / "p", ("VCD", "GC"))
    assert table["prob_GC"].nunique() == 1
