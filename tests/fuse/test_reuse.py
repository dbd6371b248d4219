"""A protocol run takes the fits another run already made (fuse.reuse) and writes what it
would have written by fitting them again."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_synthetic_cache

from fuse import protocol
from fuse.protocol import ProtocolConfig
from fuse.reuse import REUSED_FROM
from fuse.schema import CURVES_FILE, PREDICTIONS_FILE, RUNS_FILE

COMMON = {"epochs": 4, "learning_rate": 1e-3, "trials": 2, "precision": "fp32"}


def _run(files: dict[str, Path], out: Path, **settings) -> dict:
    return protocol.run(
        ProtocolConfig(
            manifest=str(files["manifest"]),
            features=(str(files["image"]), str(files["text"])),
            out=str(out),
            **{**COMMON, **settings},
        )
    )


def _label_efficiency(files: dict[str, Path], out: Path, **settings) -> dict:
    return _run(
        files, out, models=("M4",), label_fractions=(0.5, 1.0), conditions=False, **settings
    )


@pytest.fixture(scope="module")
def main_protocol(tmp_path_factory) -> dict[str, Path]:
    """The main protocol's run on a synthetic cache, the conditions scored, with a model
    of clinical variables beside M4: the table then has a column M4's rows leave empty,
    and settings M4 does not read (the clinical columns) differ from the runs below."""
    folder = tmp_path_factory.mktemp("reuse")
    files = write_synthetic_cache(folder)
    manifest = pd.read_csv(files["manifest"])
    manifest["age"] = 50 + manifest.index % 20
    manifest.to_csv(files["manifest"], index=False)
    _run(files, folder / "protocol", models=("M4", "M4-clinical"), clinical_numeric=("age",))
    return {**files, "protocol": folder / "protocol"}


def _count_fits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float]]:
    fits: list[tuple[str, float]] = []
    fit = protocol._fit

    def counted(job, data, kind, settings, config):
        fits.append((kind, job.fraction))
        return fit(job, data, kind, settings, config)

    monkeypatch.setattr(protocol, "_fit", counted)
    return fits


def test_the_full_share_is_taken_from_the_protocol_and_equals_a_refit(
    main_protocol, tmp_path, monkeypatch
):
    _label_efficiency(main_protocol, tmp_path / "fitted")
    fits = _count_fits(monkeypatch)
    runs = _label_efficiency(
        main_protocol, tmp_path / "taken", reuse=str(main_protocol["protocol"])
    )

    assert sorted(fits) == [("head", 0.5)] * 2 + [("probe", 0.5)] * 2  # 100%: none fitted
    fitted, taken = tmp_path / "fitted", tmp_path / "taken"
    pd.testing.assert_frame_equal(
        pd.read_parquet(fitted / PREDICTIONS_FILE), pd.read_parquet(taken / PREDICTIONS_FILE)
    )
    assert (fitted / CURVES_FILE).read_text() == (taken / CURVES_FILE).read_text()
    records = {
        name: json.loads((folder / RUNS_FILE).read_text())["runs"]
        for name, folder in (("fitted", fitted), ("taken", taken))
    }
    for record in records["fitted"] + records["taken"]:
        record.pop("seconds")
    copied = [record.pop(REUSED_FROM, None) for record in records["taken"]]
    assert records["fitted"] == records["taken"]
    assert [record["fraction"] for record in runs["runs"] if REUSED_FROM in record] == [1.0] * 4
    assert copied.count(str(main_protocol["protocol"])) == 4 and copied.count(None) == 4


def test_a_changed_setting_or_feature_file_takes_nothing(
    main_protocol, tmp_path, monkeypatch, capsys
):
    fits = _count_fits(monkeypatch)
    runs = _label_efficiency(
        main_protocol, tmp_path / "epochs", epochs=5, reuse=str(main_protocol["protocol"])
    )
    assert len(fits) == 8 and not any(REUSED_FROM in record for record in runs["runs"])
    said = capsys.readouterr().err
    assert "M4: none taken from" in said and "epochs is 4 there and 5 here" in said

    (tmp_path / "other").mkdir()
    other = write_synthetic_cache(tmp_path / "other", seed=1)
    changed = {**main_protocol, "image": other["image"]}
    fits.clear()
    runs = _label_efficiency(changed, tmp_path / "features", reuse=str(main_protocol["protocol"]))
    assert len(fits) == 8 and not any(REUSED_FROM in record for record in runs["runs"])
    assert "its blip2-qformer/image features differ" in capsys.readouterr().err


def test_a_fit_the_run_saves_is_fitted_again(main_protocol, tmp_path, monkeypatch):
    fits = _count_fits(monkeypatch)
    runs = _label_efficiency(
        main_protocol,
        tmp_path / "saving",
        heads=str(tmp_path / "models"),
        reuse=str(main_protocol["protocol"]),
    )
    assert len(fits) == 8 and not any(REUSED_FROM in record for record in runs["runs"])
    assert len(list((tmp_path / "models" / "M4").glob("*.safetensors"))) == 8
    assert np.isfinite([record["threshold"] for record in runs["runs"]]).all()
