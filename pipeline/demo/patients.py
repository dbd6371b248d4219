"""The demo's hidden truth: who each patient is, and what their image and report can reveal.

Each patient has a class and two latent factors that are independent given the class:
the image factor, which the scenes render as the lesion's colour, bulk and surface, and
the report factor, which the reports verbalise as vocal cord mobility and extent. The
report also names the lesion's appearance, a noisy reading of the image factor, so the
report is not independent of the images but carries information they lack. Age, sex and
smoking carry a modest signal of their own (CLINICAL_* below). Every patient draws from
its own random streams seeded by (seed, site, index), so patients can be rendered in any
order and in parallel with identical results.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = ("VCD", "GC")  # negative class first, as the pipeline's `classes` setting

# The latent signal, all in one place. Each modality alone should be informative but
# imperfect and the two complementary, like the paper's ablation (image-only and
# report-only heads below the fused one), with no perfect score anywhere. A factor
# ~ N(+-shift, 1) separates the classes with AUC Phi(shift * sqrt(2)) at best. Rendering
# (views, lighting, blur, anatomy) and then the tiny random-weight ViT + Q-Former hide far
# more of the image factor than the word categories and the tiny LLaMA hide of the report
# factor, hence the much larger image shift. The paper's image-only and report-only heads
# score alike (accuracy 0.678 and 0.673), so the shifts are set where M1 and M2 do too,
# with the protocol's defaults (5 trials, mean test AUC of the heads): at 2.0/0.8, M1
# 0.878, M2 0.883, M4 0.913. At 2.0/0.5 the image dominated (M1 0.879, M2 0.776) and the
# fused head only tied the image-only one (0.875), though its probe did not (0.899).
IMAGE_FACTOR_SHIFT = 2.0
REPORT_FACTOR_SHIFT = 0.8
# How loosely the report's words follow the factors (standard deviations added before the
# factor is cut into word categories). The appearance reading is deliberately poor: it is
# the report's echo of what the images show, and a clear echo would leave the images
# little to add (at 1.3, report-only bigrams already scored 0.9 with 3,000 patients).
APPEARANCE_READING_NOISE = 4.0
MOBILITY_READING_NOISE = 0.35
EXTENT_READING_NOISE = 0.6
# Cut points on the noisy readings; each reading falls into len(cuts) + 1 categories.
APPEARANCE_CUTS = (-0.7, 0.2, 1.1)  # smooth white plaque, rough plaque, red growth, cauliflower
MOBILITY_CUTS = (-0.2, 0.6, 1.5)  # normal, slightly limited, limited, fixed
EXTENT_CUTS = (0.3, 1.3)  # confined to the cord, reaches the anterior commissure, ventricular fold

# The lesion's length shows in the report (site words, size), so it follows the image
# factor only loosely, for the same reason as the appearance reading.
LENGTH_PER_SEVERITY = 0.2  # cord fraction added from severity 0 to 1
MIN_IMAGES_PER_EXAM = 3
BILATERAL_SHARE = 0.12  # lesions on both cords, independent of class
# Where on the cord a lesion is centred (anterior, middle, posterior third): most sit in
# the anterior two thirds, whatever the class.
THIRD_SHARES = (0.4, 0.4, 0.2)

# Clinical variables, independent of the image and report factors given the class: glottic
# carcinoma patients are on average older and more often male current smokers than those
# with dysplasia, with heavy overlap (both are diseases of older male smokers). Age ~
# N(mean of the class, 9) in whole years within 30-90; sex M with the class's share;
# smoking never/former/current with the class's shares, and blank (not recorded) for a
# share of patients whatever the class. The README gives the AUC this rule allows.
CLINICAL_AGE_MEAN = {"VCD": 57.0, "GC": 62.0}
CLINICAL_AGE_SD = 9.0
CLINICAL_AGE_RANGE = (30, 90)
CLINICAL_MALE_SHARE = {"VCD": 0.78, "GC": 0.90}
SMOKING_LEVELS = ("never", "former", "current")
CLINICAL_SMOKING_SHARES = {"VCD": (0.35, 0.30, 0.35), "GC": (0.20, 0.30, 0.50)}
SMOKING_UNRECORDED_SHARE = 0.06


@dataclass(frozen=True)
class Site:
    """One hospital of the demo: its ids, its split and how its exams were taken."""

    name: str  # the manifest's `site` value
    id_prefix: str  # first letter of patient ids
    split: str  # "" lets the pipeline split patients; "external" holds them out
    vcd_share: float  # share of patients with VCD (the paper's counts)
    images_per_exam_scale: float  # mean images per exam over --images-per-report


# The paper: internal 404 patients (206 VCD), 5,799 pairs; external 47 patients (22 VCD),
# 308 pairs, so the external hospital took fewer images per exam.
INTERNAL_SITE = Site("hospital_a", "A", "", 206 / 404, 1.0)
EXTERNAL_SITE = Site("hospital_b", "B", "external", 22 / 47, (308 / 47) / (5799 / 404))
SITES = (INTERNAL_SITE, EXTERNAL_SITE)

# Separate streams per patient, so that changing how reports are worded leaves the images
# (and the image features cached under their content hash) byte-identical, and vice versa;
# the clinical variables came last with their own stream, so images and reports stayed as
# they were.
STREAMS = ("latent", "scene", "report", "clinical")


@dataclass(frozen=True)
class Lesion:
    """The lesion as drawn and described."""

    sides: tuple[str, ...]  # the patient's "left" and/or "right" cord
    start: float  # along the cord: 0 is the anterior commissure, 1 the vocal process
    end: float
    severity: float  # 0 smooth white plaque .. 1 bulky red irregular mass


@dataclass(frozen=True)
class Patient:
    """One patient with one examination: class, latent factors and what they became."""

    site: Site
    number: int  # 1-based within the site
    label: str
    image_factor: float
    report_factor: float
    image_count: int
    lesion: Lesion
    appearance: int  # category index into APPEARANCE_CUTS
    mobility: int  # category index into MOBILITY_CUTS
    extent: int  # category index into EXTENT_CUTS
    seed_key: tuple[int, int, int]  # (seed, site index, number)
    age: int  # years
    sex: str  # "M" or "F"
    smoking: str  # one of SMOKING_LEVELS, or "" when not recorded

    @property
    def patient_id(self) -> str:
        return f"{self.site.id_prefix}{self.number:04d}"

    @property
    def exam_id(self) -> str:
        return f"{self.patient_id}-E1"

    def rng(self, stream: str) -> np.random.Generator:
        """This patient's random generator for one of STREAMS."""
        return _stream_rng(self.seed_key, stream)


def _stream_rng(seed_key: tuple[int, int, int], stream: str) -> np.random.Generator:
    return np.random.default_rng([*seed_key, STREAMS.index(stream)])


def _category(reading: float, cuts: tuple[float, ...]) -> int:
    return int(np.searchsorted(cuts, reading))


def _severity(image_factor: float) -> float:
    # A logistic squash: the factor's sign decides white vs red, its size how far.
    return float(1.0 / (1.0 + np.exp(-1.5 * image_factor)))


def _lesion(rng: np.random.Generator, severity: float, extent: int) -> Lesion:
    bilateral = rng.random() < BILATERAL_SHARE
    sides = ("left", "right") if bilateral else (str(rng.choice(["left", "right"])),)
    length = float(np.clip(0.22 + LENGTH_PER_SEVERITY * severity + rng.normal(0, 0.1), 0.12, 0.85))
    third = rng.choice(3, p=THIRD_SHARES)
    centre = (third + rng.uniform(0.25, 0.75)) / 3
    start = max(0.04, centre - length / 2)
    if extent > 0:
        start = 0.0  # a lesion reaching the anterior commissure starts there
    end = min(0.95, start + length)
    return Lesion(sides, round(start, 3), round(end, 3), severity)


def _clinical(seed_key: tuple[int, int, int], label: str) -> dict[str, int | str]:
    rng = _stream_rng(seed_key, "clinical")
    age = rng.normal(CLINICAL_AGE_MEAN[label], CLINICAL_AGE_SD)
    male = rng.random() < CLINICAL_MALE_SHARE[label]
    smoking = str(rng.choice(SMOKING_LEVELS, p=CLINICAL_SMOKING_SHARES[label]))
    recorded = rng.random() >= SMOKING_UNRECORDED_SHARE
    return {
        "age": int(np.clip(round(age), *CLINICAL_AGE_RANGE)),
        "sex": "M" if male else "F",
        "smoking": smoking if recorded else "",
    }


def _plan_patient(
    site: Site, seed_key: tuple[int, int, int], label: str, images_per_report: int
) -> Patient:
    rng = _stream_rng(seed_key, "latent")
    sign = 1.0 if label == CLASSES[1] else -1.0
    image_factor = float(rng.normal(sign * IMAGE_FACTOR_SHIFT, 1.0))
    report_factor = float(rng.normal(sign * REPORT_FACTOR_SHIFT, 1.0))
    appearance = _category(image_factor + rng.normal(0, APPEARANCE_READING_NOISE), APPEARANCE_CUTS)
    mobility = _category(report_factor + rng.normal(0, MOBILITY_READING_NOISE), MOBILITY_CUTS)
    extent = _category(report_factor + rng.normal(0, EXTENT_READING_NOISE), EXTENT_CUTS)
    image_count = max(
        MIN_IMAGES_PER_EXAM, int(rng.poisson(images_per_report * site.images_per_exam_scale))
    )
    return Patient(
        site=site,
        number=seed_key[2],
        label=label,
        image_factor=image_factor,
        report_factor=report_factor,
        image_count=image_count,
        lesion=_lesion(rng, _severity(image_factor), extent),
        appearance=appearance,
        mobility=mobility,
        extent=extent,
        seed_key=seed_key,
        **_clinical(seed_key, label),
    )


def plan_site(site: Site, patients: int, images_per_report: int, seed: int) -> list[Patient]:
    """Draw every patient of one site.

    Args:
        site: one of SITES.
        patients: how many patients; round(patients * site.vcd_share) of them have VCD.
        images_per_report: mean images per exam before the site's scale (minimum 3).
        seed: the demo's seed.

    Returns:
        The patients numbered from 1, classes shuffled so ids say nothing about labels.
    """
    site_index = SITES.index(site)
    vcd_count = round(patients * site.vcd_share)
    labels = np.array([CLASSES[0]] * vcd_count + [CLASSES[1]] * (patients - vcd_count))
    np.random.default_rng([seed, site_index]).shuffle(labels)
    return [
        _plan_patient(site, (seed, site_index, number), str(label), images_per_report)
        for number, label in enumerate(labels, start=1)
    ]
