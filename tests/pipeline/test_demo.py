import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from pipeline.demo import DemoConfig, run, scenes
from pipeline.demo.patients import EXTERNAL_SITE, INTERNAL_SITE, plan_site
from pipeline.demo.scenes import CAMERAS
from pipeline.errors import UserError
from pipeline.lock import output_lock
from pipeline.manifest import load_manifest
from pipeline.metrics import roc_auc

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = {"patients": 20, "external_patients": 6, "images_per_report": 3}
COLUMNS = [
    "image_path",
    "report_text",
    "label",
    "patient_id",
    "exam_id",
    "split",
    "site",
    "lesion_mask",
]
CLINICAL = ["age", "sex", "smoking"]


def read(manifest: Path) -> pd.DataFrame:
    return pd.read_csv(manifest, dtype=str, keep_default_na=False, encoding="utf-8")


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    return run(DemoConfig(out=str(tmp_path_factory.mktemp("demo")), **SMALL))


def test_manifest_has_the_schema_and_sites(small_demo):
    table = read(small_demo)
    assert list(table.columns) == COLUMNS + CLINICAL
    internal = table[table["patient_id"].str.startswith("A")]
    external = table[table["patient_id"].str.startswith("B")]
    assert len(internal) + len(external) == len(table)
    assert (internal["split"] == "").all() and (internal["site"] == "hospital_a").all()
    assert (external["split"] == "external").all() and (external["site"] == "hospital_b").all()
    # The pipeline's own loader accepts it, images included.
    assert len(load_manifest(small_demo, ("VCD", "GC"))) == len(table)


def test_class_counts_follow_the_paper_shares(small_demo):
    patients = read(small_demo).drop_duplicates("patient_id")
    counts = patients.groupby(["site", "label"]).size().to_dict()
    # round(20 * 206 / 404) = 10 and round(6 * 22 / 47) = 3 VCD patients.
    assert counts == {
        ("hospital_a", "VCD"): 10,
        ("hospital_a", "GC"): 10,
        ("hospital_b", "VCD"): 3,
        ("hospital_b", "GC"): 3,
    }


def test_one_exam_and_report_per_patient_with_at_least_three_images(small_demo):
    by_patient = read(small_demo).groupby("patient_id")
    assert (by_patient["report_text"].nunique() == 1).all()
    assert (by_patient["exam_id"].nunique() == 1).all()
    assert (by_patient.size() >= 3).all()
    assert by_patient["exam_id"].first().loc["A0001"] == "A0001-E1"


def test_reports_are_chinese_and_never_name_the_diagnosis(small_demo):
    reports = read(small_demo)["report_text"].unique()
    assert all("声带" in report for report in reports)
    for word in ("癌", "不典型增生", "异型增生", "VCD", "GC"):
        assert not any(word in report for report in reports), word


def test_images_open_and_come_from_their_site_camera(small_demo):
    table = read(small_demo)
    for image_path, site in zip(table["image_path"], table["site"], strict=True):
        with Image.open(small_demo.parent / image_path) as image:
            assert image.format == "PNG" and image.mode == "RGB"
            assert image.size in CAMERAS[site].sizes
    assert not list(small_demo.parent.glob("*.partial"))
    assert (small_demo.parent / "demo_config.yaml").is_file()


def test_same_seed_gives_identical_files(small_demo, tmp_path):
    again = run(DemoConfig(out=str(tmp_path), **SMALL))
    assert again.read_bytes() == small_demo.read_bytes()
    for image_path in read(small_demo)["image_path"]:
        assert (tmp_path / image_path).read_bytes() == (small_demo.parent / image_path).read_bytes()


def test_another_seed_gives_another_data_set(tmp_path):
    tiny = {"patients": 2, "external_patients": 0, "images_per_report": 1}
    first = run(DemoConfig(out=str(tmp_path / "a"), seed=0, **tiny))
    second = run(DemoConfig(out=str(tmp_path / "b"), seed=1, **tiny))
    assert first.read_bytes() != second.read_bytes()


def test_each_modality_is_informative_but_imperfect():
    patients = plan_site(INTERNAL_SITE, 2000, images_per_report=14, seed=0)
    labels = np.array([patient.label == "GC" for patient in patients])
    # What the images draw separates the classes almost fully (views, rendering and the
    # tiny encoder lose most of it); what only the report words is a weaker, imperfect
    # signal, set so that image-only and report-only heads score alike, as in the paper
    # (see the latent constants in pipeline/demo/patients.py).
    drawn = roc_auc(labels, np.array([patient.lesion.severity for patient in patients]))
    worded = roc_auc(labels, np.array([patient.mobility + patient.extent for patient in patients]))
    assert 0.95 < drawn < 1.0 and 0.75 < worded < 0.9


def test_clinical_variables_carry_a_modest_signal_in_the_documented_direction(small_demo):
    table = read(small_demo)
    assert (table.groupby("patient_id")[CLINICAL].nunique() <= 1).all().all()
    written = table.drop_duplicates("patient_id").set_index("patient_id")[CLINICAL]
    planned = plan_site(INTERNAL_SITE, SMALL["patients"], SMALL["images_per_report"], seed=0)
    for patient in planned:
        expected = [str(patient.age), patient.sex, patient.smoking]
        assert written.loc[patient.patient_id].tolist() == expected
    assert load_manifest(small_demo, ("VCD", "GC"))[CLINICAL].equals(read(small_demo)[CLINICAL])
    drawn = pd.DataFrame(
        [
            {"gc": p.label == "GC", "age": p.age, "sex": p.sex, "smoking": p.smoking}
            for p in plan_site(INTERNAL_SITE, 4000, images_per_report=3, seed=0)
        ]
    )
    by_class = drawn.groupby("gc").agg(
        age=("age", "mean"),
        male=("sex", lambda sex: (sex == "M").mean()),
        current=("smoking", lambda smoking: (smoking == "current").mean()),
        unrecorded=("smoking", lambda smoking: (smoking == "").mean()),
    )
    # carcinoma: older, more often male, more often a current smoker; blanks for both
    signals = ["age", "male", "current"]
    assert (by_class.loc[True, signals] > by_class.loc[False, signals]).all()
    assert (by_class["unrecorded"].between(0.02, 0.12)).all()
    assert set(drawn["sex"]) == {"M", "F"} and drawn["age"].between(30, 90).all()
    # modest: a sum of the three signals separates the classes far from perfectly
    score = drawn["age"] / 9 + (drawn["sex"] == "M") + (drawn["smoking"] == "current")
    assert 0.6 < roc_auc(drawn["gc"].to_numpy(), score.to_numpy()) < 0.8


def run_cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.demo", *flags],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_writes_a_manifest(tmp_path):
    sizes = ["--patients", "8", "--external-patients", "2", "--images-per-report", "3"]
    result = run_cli("--out", str(tmp_path), *sizes)
    assert result.returncode == 0, result.stderr
    assert read(tmp_path / "manifest.csv")["patient_id"].nunique() == 10


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--patients", "abc"], "invalid int value"),
        (["--patients", "1"], "at least 2"),
        (["--seed", "-1"], "--seed is -1; it must be at least 0"),
    ],
    ids=["not-a-number", "too-few-patients", "negative-seed"],
)
def test_cli_rejects_bad_input_with_exit_code_2(flags, message, tmp_path):
    result = run_cli("--out", str(tmp_path / "demo"), *flags)
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "demo").exists()


def test_cli_requires_out():
    result = run_cli("--patients", "8")
    assert result.returncode == 2 and "--out" in result.stderr


def test_a_rerun_replaces_the_folder_whole_under_a_lock(tmp_path):
    out = tmp_path / "demo"
    tiny = {"patients": 4, "external_patients": 0, "images_per_report": 1}
    run(DemoConfig(out=str(out), **tiny))
    stale = out / "images" / "left-by-a-larger-run.png"
    stale.write_bytes(b"")
    run(DemoConfig(out=str(out), **tiny))
    assert not stale.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo"]
    with output_lock(out), pytest.raises(UserError, match="is being written by another run"):
        run(DemoConfig(out=str(out), **tiny))


def test_every_image_has_its_lesion_mask_beside_it(small_demo):
    table = read(small_demo)
    # Every demo patient has a lesion, and the views keep it inside the field.
    assert (table["lesion_mask"] != "").all()
    for image_path, mask_path in zip(table["image_path"], table["lesion_mask"], strict=True):
        assert mask_path == image_path.replace(".png", "_mask.png")
        image = Image.open(small_demo.parent / image_path)
        mask = np.asarray(Image.open(small_demo.parent / mask_path))
        assert mask.shape == (image.height, image.width) and mask.dtype == bool
        assert 0 < mask.mean() < 0.5


def test_masks_cover_the_drawn_lesion_pixel_for_pixel(monkeypatch):
    """With the lesion painted pure blue (nothing else in a scene is bluer than red), the
    mask is blue inside, and blue pixels lie in it or within its blurred border."""
    monkeypatch.setattr(scenes, "_lesion_colour", lambda severity: np.array([0.0, 0.0, 255.0]))
    patients = plan_site(INTERNAL_SITE, 4, 3, 0) + plan_site(EXTERNAL_SITE, 3, 3, 0)
    for patient in patients:
        for photo in scenes.render_images(patient):
            pixels = np.asarray(photo.image).astype(int)
            blue = pixels[..., 2] > pixels[..., 0]
            mask = np.asarray(photo.lesion_mask)
            near = np.asarray(photo.lesion_mask.convert("L").filter(ImageFilter.MaxFilter(21)))
            assert blue[mask].mean() > 0.95
            assert (near[blue] > 0).mean() > 0.95
