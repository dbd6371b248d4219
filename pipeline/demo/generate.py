"""The demo stage: write synthetic laryngoscopy images, reports and their manifest.

Output folder layout: `images/*.png` with each image's lesion mask beside it
(`images/<stem>_mask.png`, white where the lesion is), `manifest.csv` (one row per
image-report pair, image and mask paths relative to the folder; the mask column is empty
where the lesion lies outside the endoscope's field) and `demo_config.yaml` (the resolved
settings). The folder is written whole as `OUT.partial` and renamed into place
(pipeline.atomic), under the lock `OUT.lock`, so a folder at OUT is always one complete demo.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.atomic import atomic_folder
from pipeline.config import check_declared, require_paths, save_config, setting
from pipeline.demo.patients import EXTERNAL_SITE, INTERNAL_SITE, Patient, plan_site
from pipeline.demo.reports import write_report
from pipeline.demo.scenes import render_images
from pipeline.errors import UserError
from pipeline.lock import output_lock

MANIFEST_NAME = "manifest.csv"
IMAGES_FOLDER = "images"
CONFIG_NAME = "demo_config.yaml"
OUTPUT_NAMES = (IMAGES_FOLDER, MANIFEST_NAME, CONFIG_NAME)
MANIFEST_COLUMNS = (
    "image_path",
    "report_text",
    "label",
    "patient_id",
    "exam_id",
    "split",
    "site",
    "lesion_mask",
    "age",  # clinical variables (pipeline.demo.patients: CLINICAL_*)
    "sex",
    "smoking",
)
MASK_SUFFIX = "_mask"  # images/A0001_01.png -> images/A0001_01_mask.png
# zlib's run-length strategy at level 1: on the demo's images it took 4.9 ms per image
# against 8.8 ms at level 4 (the previous setting) and 15 ms at the default 6, for files
# 6% larger than level 4's (64 against 60 KiB); PNG is lossless, so the pixels are the same.
# Most of what is left is Pillow's per-row choice of PNG filter (2.9 ms at level 0).
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_TYPE = zlib.Z_RLE


@dataclass(frozen=True)
class DemoConfig:
    """What demo data set to generate, and where."""

    out: str = setting("", "output folder; gets images/, manifest.csv and demo_config.yaml")
    patients: int = setting(
        404,
        "internal patients (hospital_a), one exam and report each; 206/404 of them VCD",
        at_least=2,
    )
    external_patients: int = setting(
        47,
        "external patients (hospital_b, split 'external'; 0 for none); 22/47 of them VCD",
        at_least=0,
    )
    images_per_report: int = setting(
        14,
        "mean images per internal exam (at least 3 each); the external site takes fewer",
        at_least=1,
    )
    seed: int = setting(0, "random seed; the same seed gives byte-identical files", at_least=0)
    wait_for_lock: float = setting(
        0, "seconds to wait while another run writes the same --out (0: refuse at once)", at_least=0
    )


def _check(config: DemoConfig) -> None:
    require_paths(config, "out")
    check_declared(config)  # also when called with a config made in Python
    if Path(config.out).exists() and not Path(config.out).is_dir():
        raise UserError(f"--out {config.out} is a file; give a folder (it is created if absent)")


def _image_paths(patient: Patient) -> list[str]:
    return [
        f"{IMAGES_FOLDER}/{patient.patient_id}_{index:02d}.png"
        for index in range(1, patient.image_count + 1)
    ]


def mask_path(image_path: str) -> str:
    """Where the demo writes the lesion mask of the image at `image_path`."""
    path = Path(image_path)
    return path.with_name(path.stem + MASK_SUFFIX + path.suffix).as_posix()


def _render_patient(job: tuple[Patient, Path]) -> dict[str, str]:
    """Render and save one patient's images and lesion masks (runs in a worker).

    Returns:
        Each image path -> its mask's path, or "" where no lesion is visible (no file).
    """
    patient, out = job
    masks = {}
    for photo, relative_path in zip(render_images(patient), _image_paths(patient), strict=True):
        photo.image.save(
            out / relative_path,
            format="PNG",
            compress_level=PNG_COMPRESS_LEVEL,
            compress_type=PNG_COMPRESS_TYPE,
        )
        masks[relative_path] = ""
        if photo.lesion_mask.getbbox() is not None:
            masks[relative_path] = mask_path(relative_path)
            photo.lesion_mask.save(out / masks[relative_path], format="PNG")
    return masks


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
                    "lesion_mask": "",  # filled once the images are drawn
                    "age": patient.age,
                    "sex": patient.sex,
                    "smoking": patient.smoking,
                }
            )
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def run(config: DemoConfig) -> Path:
    """Generate the demo data set described by `config`.

    Returns:
        The path of the written manifest.csv.

    Raises:
        UserError: no output folder (or a file in its place, or a folder holding other
            files), counts out of range, or another run writing the same folder.
    """
    _check(config)
    out = Path(config.out)
    with output_lock(out, config.wait_for_lock), atomic_folder(out, OUTPUT_NAMES) as staging:
        _generate(config, staging)
    return out / MANIFEST_NAME


def _generate(config: DemoConfig, out: Path) -> None:
    (out / IMAGES_FOLDER).mkdir()
    patients = plan_site(INTERNAL_SITE, config.patients, config.images_per_report, config.seed)
    patients += plan_site(
        EXTERNAL_SITE, config.external_patients, config.images_per_report, config.seed
    )
    table = _manifest_rows(patients)
    masks: dict[str, str] = {}
    jobs = [(patient, out) for patient in patients]
    # One process per core; each patient has its own seeds, so the files do not depend on
    # how many workers there are or in which order they finish.
    with (
        Pool() as pool,
        tqdm(total=len(table), unit="image", desc="demo images") as progress,
    ):
        for rendered in pool.imap_unordered(_render_patient, jobs, chunksize=4):
            masks.update(rendered)
            progress.update(len(rendered))
    table["lesion_mask"] = table["image_path"].map(masks)
    save_config(config, out / CONFIG_NAME)
    table.to_csv(out / MANIFEST_NAME, index=False, encoding="utf-8", lineterminator="\n")
