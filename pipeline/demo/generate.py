"""The demo stage: write synthetic laryngoscopy images, reports and their manifest.

Output folder layout: `images/*.png`, `manifest.csv` (one row per image-report pair, image
paths relative to the folder) and `demo_config.yaml` (the resolved settings). The manifest
is written last, through a `.partial` file renamed into place, so a folder whose
manifest.csv exists holds every image it names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.config import require_paths, save_config, setting
from pipeline.demo.patients import EXTERNAL_SITE, INTERNAL_SITE, Patient, plan_site
from pipeline.demo.reports import write_report
from pipeline.demo.scenes import render_images
from pipeline.errors import UserError

MANIFEST_NAME = "manifest.csv"
IMAGES_FOLDER = "images"
CONFIG_NAME = "demo_config.yaml"
MANIFEST_COLUMNS = (
    "image_path",
    "report_text",
    "label",
    "patient_id",
    "exam_id",
    "split",
    "site",
)
# Level 4 of zlib's 0-9: about half the time of the default 6 for 7% larger files, which
# keeps the full demo within its time budget on two cores.
PNG_COMPRESS_LEVEL = 4


@dataclass(frozen=True)
class DemoConfig:
    """What demo data set to generate, and where."""

    out: str = setting("", "output folder; gets images/, manifest.csv and demo_config.yaml")
    patients: int = setting(
        404, "internal patients (hospital_a), one exam and report each; 206/404 of them VCD"
    )
    external_patients: int = setting(
        47, "external patients (hospital_b, split 'external'; 0 for none); 22/47 of them VCD"
    )
    images_per_report: int = setting(
        14, "mean images per internal exam (at least 3 each); the external site takes fewer"
    )
    seed: int = setting(0, "random seed (0 or more); the same seed gives byte-identical files")


def _check(config: DemoConfig) -> None:
    require_paths(config, "out")
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise UserError(f"--out {config.out} is a file; give a folder (it is created if absent)")
    if config.patients < 2:
        raise UserError(f"--patients is {config.patients}; it must be at least 2 (one per class)")
    if config.external_patients < 0:
        raise UserError(f"--external-patients is {config.external_patients}; use 0 or more")
    if config.images_per_report < 1:
        raise UserError(f"--images-per-report is {config.images_per_report}; use 1 or more")
    if config.seed < 0:
        raise UserError(f"--seed is {config.seed}; seeds are 0 or more")


def _image_paths(patient: Patient) -> list[str]:
    return [
        f"{IMAGES_FOLDER}/{patient.patient_id}_{index:02d}.png"
        for index in range(1, patient.image_count + 1)
    ]


def _render_patient(job: tuple[Patient, Path]) -> int:
    """Render and save one patient's images (runs in a worker); returns how many."""
    patient, out = job
    images = render_images(patient)
    for image, relative_path in zip(images, _image_paths(patient), strict=True):
        image.save(out / relative_path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return len(images)


def _manifest_rows(patients: list[Patient]) -> pd.DataFrame:
    rows = []
    for patient in patients:
        report = write_report(patient)
        for image_path in _image_paths(patient):
            rows.append(
                {
                    "image_path": image_path,
                    "report_text": report,
                    "label": patient.label,
                    "patient_id": patient.patient_id,
                    "exam_id": patient.exam_id,
                    "split": patient.site.split,
                    "site": patient.site.name,
                }
            )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def _write_manifest(table: pd.DataFrame, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    table.to_csv(partial, index=False, encoding="utf-8", lineterminator="\n")
    os.replace(partial, path)


def run(config: DemoConfig) -> Path:
    """Generate the demo data set described by `config`.

    Returns:
        The path of the written manifest.csv.

    Raises:
        UserError: no output folder (or a file in its place), or counts out of range.
    """
    _check(config)
    out = Path(config.out)
    manifest_path = out / MANIFEST_NAME
    # An old manifest must not survive next to images this run is replacing.
    manifest_path.unlink(missing_ok=True)
    (out / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
    patients = plan_site(INTERNAL_SITE, config.patients, config.images_per_report, config.seed)
    patients += plan_site(
        EXTERNAL_SITE, config.external_patients, config.images_per_report, config.seed
    )
    table = _manifest_rows(patients)
    jobs = [(patient, out) for patient in patients]
    # One process per core; each patient has its own seeds, so the files do not depend on
    # how many workers there are or in which order they finish.
    with (
        Pool() as pool,
        tqdm(total=len(table), unit="image", desc="demo images") as progress,
    ):
        for rendered in pool.imap_unordered(_render_patient, jobs, chunksize=4):
            progress.update(rendered)
    save_config(config, out / CONFIG_NAME)
    _write_manifest(table, manifest_path)
    return manifest_path
