"""`python -m fuse predict`: saved heads applied to the cached vectors of new exams.

A head (or an ensemble of heads: every trial's head of one model, averaged) scores each
image-report pair of a manifest whose features were extracted with the head's encoders,
and decides at an operating point the head chose on its validation patients. Images are
then aggregated per exam. Labels are optional; when given they are echoed beside the
decision, never used.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuse.data import CachedRows, load_cached_rows
from fuse.exam_model import exam_ids
from fuse.head import CENTRING, KINDS, FeatureSource, FittedHead
from fuse.schema import probability_column
from pipeline.config import require_paths, setting
from pipeline.errors import UserError

OPERATING_POINTS = {
    "youden": "the cut that maximised Youden's J on the head's validation patients",
    "0.5": "probability 0.5",
    "sensitivity": "the highest cut reaching the head's target sensitivity on validation",
    "specificity": "the lowest cut reaching the head's target specificity on validation",
}
EXAM_AGGREGATES = {
    "mean": "mean of the exam's image probabilities (every image counts; robust to one odd image)",
    "max": "the exam's most suspicious image (more sensitive, less specific)",
}
IMAGE_COLUMNS = ("image_path", "patient_id", "exam_id", "site", "label")


@dataclass(frozen=True)
class DecisionSettings:
    """Which heads decide, at which operating point, and how the answer is printed."""

    head: tuple[str, ...] = setting(
        (),
        "saved heads: NAME.json files, or folders whose *-KIND.json heads form an ensemble "
        "(their probabilities and thresholds averaged), e.g. models/M4 for every trial's head",
    )
    kind: str = setting("head", "in head folders, which kind to use", choices=KINDS)
    operating_point: str = setting(
        "youden",
        "; ".join(f"{name}: {meaning}" for name, meaning in OPERATING_POINTS.items()),
        choices=tuple(OPERATING_POINTS),
    )
    json: bool = setting(False, "print one JSON document instead of text (for machines)")


@dataclass(frozen=True)
class PredictConfig(DecisionSettings):
    """Which heads, which rows, and how to decide."""

    manifest: str = setting("", "manifest CSV/Parquet of the exams to score; labels optional")
    features: tuple[str, ...] = setting(
        (),
        "feature files of that manifest from the head's encoders (python -m extract), or "
        "folders of them: a folder means every *.h5 file inside it",
    )
    out: str = setting("", "CSV file for the per-image table (empty: print only)")
    centring: str = setting(
        "stored",
        "; ".join(f"{name}: {meaning}" for name, meaning in CENTRING.items()),
        choices=tuple(CENTRING),
    )
    exam_aggregate: str = setting(
        "mean",
        "; ".join(f"{name}: {meaning}" for name, meaning in EXAM_AGGREGATES.items()),
        choices=tuple(EXAM_AGGREGATES),
    )
    image_root: str = setting(
        "", "folder the manifest's images may lie in (see python -m fuse protocol --help)"
    )


def load_heads(paths: Sequence[str | Path], kind: str = "head") -> list[FittedHead]:
    """The heads that `paths` name (files, or folders of one model's heads).

    Raises:
        UserError: nothing found, or heads that cannot be averaged (other models' inputs,
            clinical columns or classes).
    """
    heads = []
    for path in map(Path, paths):
        files = sorted(path.glob(f"*-{kind}.json")) if path.is_dir() else [path]
        if not files:
            raise UserError(f"{path} holds no saved {kind} (*-{kind}.json); name a head file")
        heads += [FittedHead.load(file) for file in files]
    if not heads:
        raise UserError("no head given: pass --head FILE.json or a folder of heads")
    first = heads[0]
    for other in heads[1:]:
        if (other.model.inputs, other.clinical, other.classes) != (
            first.model.inputs,
            first.clinical,
            first.classes,
        ):
            raise UserError(
                f"{first.describe()} and {other.describe()} take other features, clinical "
                "columns or classes; an ensemble averages heads of one model"
            )
    return heads


def describe_heads(heads: Sequence[FittedHead]) -> str:
    """Which head or ensemble decides, e.g. "ensemble of 5 M4 heads (trials 0-4)"."""
    if len(heads) == 1:
        return heads[0].describe()
    trials = sorted({head.origin.get("trial") for head in heads}, key=str)
    return (
        f"ensemble of {len(heads)} {heads[0].model.name} {heads[0].kind}s (trials "
        f"{', '.join(map(str, trials))}; mean probability, mean threshold)"
    )


def row_sites(table: pd.DataFrame, head: FittedHead, centring: str) -> list[str | None]:
    """Which rows a head centres, by site: a stored site's rows unless the site also trained
    the head and the row is not marked external; for a batch, every site (the head leaves
    its training sites out)."""
    sites = table["site"].tolist()
    external = (table["split"] == "external").tolist()
    if centring == "batch":
        return sites
    return [
        site
        if site in head.site_shifts_ and (is_external or site not in head.training_sites_)
        else None
        for site, is_external in zip(sites, external, strict=True)
    ]


def score(
    heads: Sequence[FittedHead], data: CachedRows, centring: str, operating_point: str
) -> tuple[np.ndarray, float]:
    """Mean class probabilities of `heads` on every row of `data`, and the mean threshold.

    Raises:
        UserError: features whose provenance differs from a head's.
    """
    if operating_point not in OPERATING_POINTS:
        raise UserError(
            f"operating_point {operating_point!r}: choose from {', '.join(OPERATING_POINTS)}"
        )
    probabilities, thresholds = [], []
    for head in heads:
        head.check_sources(
            [
                FeatureSource.from_provenance(
                    data.provenance[feature], data.features[feature].shape[1]
                )
                for feature in head.model.inputs
            ],
            [data.paths[feature] for feature in head.model.inputs],
        )
        inputs = [data.features[feature] for feature in head.model.inputs]
        probabilities.append(
            head.predict_proba(
                inputs,
                row_sites(data.table, head, centring),
                centring,
                exams=exam_ids(data.table),
                table=data.table,
            )
        )
        thresholds.append(head.thresholds_[operating_point])
    return np.mean(probabilities, axis=0), float(np.mean(thresholds))


def _warn_of_unseen_levels(heads: Sequence[FittedHead], data: CachedRows) -> None:
    """Name category values that some head's training rows never had (they set no level)."""
    unseen: dict[str, dict[str, int]] = {}
    for head in heads:
        if head.clinical_ is not None:
            for column, counts in head.clinical_.unseen_levels(data.table).items():
                unseen.setdefault(column, {}).update(counts)
    for column, counts in unseen.items():
        values = ", ".join(f"{value!r} ({rows} rows)" for value, rows in counts.items())
        print(
            f"warning: clinical column '{column}': {values} never seen in the training rows "
            "of the head(s); those rows get no level of it (see pipeline/clinical.py)",
            file=sys.stderr,
        )


def decide(positive: np.ndarray, threshold: float, classes: Sequence[str]) -> np.ndarray:
    """The class of each positive probability at `threshold` (positive when >= it)."""
    return np.where(positive >= threshold, classes[-1], classes[0])


def run(config: PredictConfig) -> dict[str, Any]:
    """Score the manifest's rows with the heads; print and return images and exams."""
    require_paths(config, "head", "manifest", "features")
    heads = load_heads(config.head, config.kind)
    classes = heads[0].classes
    data = load_cached_rows(
        config.manifest,
        config.features,
        heads[0].model.inputs,
        classes,
        image_root=config.image_root or None,
        labels_required=False,
        clinical=heads[0].clinical,
    )
    _warn_of_unseen_levels(heads, data)
    probabilities, threshold = score(heads, data, config.centring, config.operating_point)
    images = data.table.loc[:, list(IMAGE_COLUMNS)].copy()
    for position, name in enumerate(classes):
        images[probability_column(name)] = probabilities[:, position]
    positive = probability_column(classes[-1])
    images["threshold"] = threshold
    images["decision"] = decide(images[positive].to_numpy(), threshold, classes)
    exams = (
        images.groupby(["patient_id", "exam_id"], sort=False)
        .agg(
            images=("image_path", "size"),
            label=("label", "first"),
            **{
                probability_column(name): (probability_column(name), config.exam_aggregate)
                for name in classes
            },
        )
        .reset_index()
    )
    if config.exam_aggregate == "max":  # the other classes' columns no longer add up to 1
        exams[probability_column(classes[0])] = 1 - exams[positive]
    exams["decision"] = decide(exams[positive].to_numpy(), threshold, classes)
    result = {
        "decided_by": describe_heads(heads),
        "operating_point": {
            "name": config.operating_point,
            "meaning": OPERATING_POINTS[config.operating_point],
            "threshold": threshold,
        },
        "centring": config.centring,
        "exam_aggregate": config.exam_aggregate,
        "images": images.to_dict(orient="records"),
        "exams": exams.to_dict(orient="records"),
    }
    if config.out:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        partial = Path(config.out + ".partial")
        images.to_csv(partial, index=False)
        partial.replace(config.out)
    print(
        json.dumps(result, indent=2, ensure_ascii=False) if config.json else _text(result, classes)
    )
    return result


def _text(result: dict[str, Any], classes: Sequence[str]) -> str:
    point = result["operating_point"]
    lines = [
        f"decided by: {result['decided_by']}",
        f"operating point: {point['name']} ({point['meaning']}): {classes[-1]} when "
        f"P({classes[-1]}) >= {point['threshold']:.3f}; centring: {result['centring']}",
        "",
        "per image:",
    ]
    columns = [probability_column(name) for name in classes]
    for image in result["images"]:
        probabilities = "  ".join(
            f"P({name}) {image[column]:.3f}" for name, column in zip(classes, columns, strict=True)
        )
        known = f"  (label {image['label']})" if image["label"] else ""
        lines.append(f"  {image['image_path']}: {probabilities} -> {image['decision']}{known}")
    lines += ["", f"per exam ({result['exam_aggregate']} of its images):"]
    for exam in result["exams"]:
        probabilities = "  ".join(
            f"P({name}) {exam[column]:.3f}" for name, column in zip(classes, columns, strict=True)
        )
        known = f"  (label {exam['label']})" if exam["label"] else ""
        lines.append(
            f"  patient {exam['patient_id']}, exam {exam['exam_id']} ({exam['images']} "
            f"image(s)): {probabilities} -> {exam['decision']}{known}"
        )
    return "\n".join(lines)
