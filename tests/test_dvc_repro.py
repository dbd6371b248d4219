"""The pipeline's definition (dvc.yaml, params.yaml), and the whole pipeline as a new user
runs it: `dvc repro` on a small demo."""

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from bench.dvc_repro import describe_fits, fit_seconds
from extract.explain import ExplainConfig
from extract.run import ExtractConfig
from fuse.protocol import ProtocolConfig
from fuse.report import ReportConfig
from fuse.schema import read_predictions
from pipeline.config import build_config
from pipeline.demo.generate import DemoConfig

REPO = Path(__file__).parents[1]
SMALL_DEMO = {"patients": 40, "external_patients": 8, "images_per_report": 3}
# Each params.yaml section's stage config (extract: each of its encoder groups').
SECTION_CONFIGS = {
    "demo": DemoConfig,
    "extract": ExtractConfig,
    "fuse": ProtocolConfig,
    "label_efficiency": ProtocolConfig,
    "explain": ExplainConfig,
    "fuse_report": ReportConfig,
}
GROUPED_SECTIONS = ("extract",)  # sections holding one section per dvc.yaml foreach item


def _params_sections() -> dict[str, tuple[type, dict]]:
    """Every section of params.yaml by its --section name, with its stage's config."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    assert sorted(params) == sorted(SECTION_CONFIGS), "map each new section to its config"
    sections = {}
    for name, values in params.items():
        if name in GROUPED_SECTIONS:
            for group, group_values in values.items():
                sections[f"{name}.{group}"] = (SECTION_CONFIGS[name], group_values or {})
        else:
            sections[name] = (SECTION_CONFIGS[name], values or {})
    return sections


@pytest.mark.parametrize("section", sorted(_params_sections()))
def test_params_yaml_holds_only_settings_that_differ_from_the_defaults(section):
    config_cls, values = _params_sections()[section]
    defaults = config_cls()
    config = build_config(config_cls, values, f"params.yaml [{section}]")  # every key a field
    at_default = [key for key in values if getattr(config, key) == getattr(defaults, key)]
    assert not at_default, (
        f"params.yaml [{section}] repeats the default of {', '.join(at_default)}: leave it "
        "out (the config dataclass is the one place for a default)"
    )


def test_every_stage_reads_its_own_section_and_depends_on_pipeline():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # a foreach stage's definition
        assert "pipeline" in stage["deps"], name
        for section in stage.get("params", []):
            assert section.split(".")[0] in params, (name, section)
    read = {
        section.split(".")[0]
        for s in stages.values()
        for section in s.get("do", s).get("params", [])
    }
    assert read == set(params), "a params.yaml section no stage reads"


@pytest.mark.skipif(shutil.which("dvc") is None, reason="dvc is installed by the [dev] extra")
def test_dvc_repro_runs_every_stage_and_writes_metrics(tmp_path):
    for item in ("pipeline", "cache", "extract", "fuse", "dvc.yaml"):
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, tmp_path / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / item)
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["demo"].update(SMALL_DEMO)
    params["fuse"].update({"epochs": 3, "warmup_epochs": 1, "trials": 2})
    params["fuse_report"].update({"bootstrap_resamples": 100})
    params["label_efficiency"].update(
        {"epochs": 3, "warmup_epochs": 1, "trials": 2, "label_fractions": [0.25, 1.0]}
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)

    result = subprocess.run(["dvc", "repro"], cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    stages = _stage_names(params)
    assert "extract@reports" in stages
    for stage in stages:
        assert f"Running stage '{stage}'" in result.stdout
    for group, settings in params["extract"].items():
        written = sorted(path.name for path in (tmp_path / "features" / group).iterdir())
        assert written == sorted(f"{model}.h5" for model in settings["model"]), group
    reports = tmp_path / "reports"
    manifest = pd.read_csv(tmp_path / "data" / "demo" / "manifest.csv", dtype=str)
    predictions = read_predictions(reports / "protocol", ("VCD", "GC"))
    models = params["fuse"]["models"]
    assert len(models) == 11  # M1-M4, the five baselines, M4-clinical and M4-exam
    assert len(predictions) == len(manifest) * len(models) * 2 * 2  # models x heads x trials
    for model in models:
        metrics = json.loads((reports / "metrics" / f"{model}.json").read_text())
        assert 0.0 <= metrics["test_auc"] <= 1.0 and 0.0 <= metrics["external_auc"] <= 1.0
    assert "Table 4" in (reports / "tables.md").read_text()
    for plot in ("roc_internal.png", "roc_external.png", "training_curves.png"):
        assert (reports / plot).is_file()
    for table in (
        "levels_summary",
        "comparisons_auc",
        "calibration_ece",
        "operating_points_points",
        "contribution_leaning",
        "contribution_occlusion",
        "text_vs_vision_contradicting_report",
        "text_vs_vision_missing_report",
        "label_efficiency_curve",
    ):
        assert (reports / "analyses" / f"{table}.csv").is_file(), table
    assert (reports / "plots" / "label_efficiency_curve.png").is_file()
    for figure in ("calibration_reliability", "decision_curve", "contribution", "text_vs_vision"):
        for split in ("test", "external"):
            assert (reports / "plots" / f"{figure}_{split}.png").is_file(), (figure, split)
    explained = json.loads((reports / "explain" / "explain.json").read_text(encoding="utf-8"))
    assert explained["gallery"] and [row["set"] for row in explained["pointing_game"]] == [
        "test",
        "external",
    ]
    assert 'data-headline="M4/test/image/auc"' in (reports / "index.html").read_text()
    # What bench/dvc_repro.py reports each model's fits cost, from the runs' own records:
    # every fit counted once, and the label-efficiency run's 100% shares, taken from the
    # protocol's run, counted as reused rather than as its own fits.
    fits = fit_seconds(tmp_path)
    assert list(fits) == ["reports/label_efficiency", "reports/protocol"]
    assert sorted(fits["reports/protocol"]) == sorted(models)
    for kinds in fits["reports/protocol"].values():
        assert [(name, kind["fits"], kind["reused"]) for name, kind in kinds.items()] == [
            ("head", 2, 0),
            ("probe", 2, 0),
        ]
        assert all(kind["seconds"] > 0 for kind in kinds.values())
    learning = fits["reports/label_efficiency"]["M4"]
    assert [(kind["fits"], kind["reused"]) for kind in learning.values()] == [(2, 2), (2, 2)]
    assert "fits of reports/label_efficiency: M4: 2 heads " in describe_fits(fits)[0]
    shown = subprocess.run(["dvc", "metrics", "show"], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0 and "M4.json" in shown.stdout, shown.stdout + shown.stderr
    again = subprocess.run(["dvc", "repro"], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0 and "Running stage" not in again.stdout  # all cached

    # A setting of one encoder group that leaves its vectors as they are: only that group's
    # stage runs, it leaves its up-to-date files untouched, and so nothing after it reruns.
    features = {path: _file_state(path) for path in (tmp_path / "features").rglob("*.h5")}
    params["extract"]["reports"]["batch_size"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    changed = subprocess.run(["dvc", "repro"], cwd=tmp_path, capture_output=True, text=True)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert re.findall(r"Running stage '([^']+)'", changed.stdout) == ["extract@reports"]
    for stage in stages:
        if stage != "extract@reports":
            assert f"Stage '{stage}' didn't change, skipping" in changed.stdout, stage
    assert {path: _file_state(path) for path in features} == features
    status = subprocess.run(["dvc", "status"], cwd=tmp_path, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout + status.stderr


def _stage_names(params: dict) -> list[str]:
    """dvc.yaml's stages as dvc names them: a `foreach: ${section}` stage NAME as NAME@KEY
    for each key of that params.yaml section."""
    names = []
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text("utf-8"))["stages"].items():
        if "foreach" in stage:
            section = re.fullmatch(r"\$\{(\w+)\}", stage["foreach"]).group(1)
            names.extend(f"{name}@{key}" for key in params[section])
        else:
            names.append(name)
    return names


def _file_state(path: Path) -> tuple[int, str]:
    """When the file was last written, and a hash of its bytes."""
    return path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()
