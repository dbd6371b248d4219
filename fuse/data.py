"""Cached features and the manifest, joined once into row-aligned tensors.

Each feature file holds one encoder's vectors of unique items (images, reports, or
image-report pairs), keyed by content. Here every file a run needs is read once and
expanded to one row per manifest pair, so training indexes rows and never looks up keys.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cache.store import FeatureSet, read_features, read_provenance
from fuse.identity import check_image_identity, check_weights, image_keys_here
from pipeline.clinical import ClinicalColumns, check_clinical_columns
from pipeline.errors import UserError
from pipeline.keys import pair_key, text_key
from pipeline.manifest import LINE_COLUMN, first_lines, load_manifest

FeatureId = tuple[str, str]  # (encoder, modality) as recorded in a file's provenance
MODALITIES = ("image", "text", "pair")


@dataclass(frozen=True)
class CachedRows:
    """One row per image-report pair; every tensor is aligned with `table`."""

    table: pd.DataFrame  # the validated manifest, index 0..N-1
    labels: torch.Tensor  # [N] class indices
    report_groups: torch.Tensor  # [N]; rows with equal values share one report
    features: Mapping[FeatureId, torch.Tensor]  # [N, width] float32 per encoder and modality
    provenance: Mapping[FeatureId, Mapping[str, Any]]
    paths: Mapping[FeatureId, str]  # the file each feature came from
    notes: tuple[str, ...] = ()  # pairs left out or matched by path only, for the record

    def patients(self, rows: torch.Tensor) -> set[str]:
        """The patients of `rows`."""
        return set(self.table["patient_id"].to_numpy()[rows.numpy()])


FEATURE_FILE_PATTERN = "*.h5"  # what a feature folder's files are named (extract --out)


def expand_feature_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Feature files from files and folders: a folder stands for every `*.h5` file directly
    inside it, in name order (`python -m extract --out FOLDER` writes one per encoder).

    Raises:
        UserError: a folder with no feature file in it.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            files.append(path)
            continue
        inside = sorted(item for item in path.glob(FEATURE_FILE_PATTERN) if item.is_file())
        if not inside:
            raise UserError(
                f"feature folder {path} holds no {FEATURE_FILE_PATTERN} file; extract into it "
                f"with `python -m extract --out {path} ...` or pass the feature files"
            )
        files.extend(inside)
    return files


def index_feature_files(paths: Iterable[str | Path]) -> dict[FeatureId, str]:
    """Map (encoder, modality) to the file holding it, reading provenance only.

    Args:
        paths: feature files, or folders of them (expand_feature_paths).

    Raises:
        UserError: two files holding the same encoder and modality, or an empty folder.
    """
    index: dict[FeatureId, str] = {}
    for path in expand_feature_paths(paths):
        provenance = read_provenance(path)
        feature = (str(provenance.get("encoder")), str(provenance.get("modality")))
        if feature in index:
            raise UserError(
                f"{index[feature]} and {path} both hold {feature[1]} features of encoder "
                f"{feature[0]}; pass one of them"
            )
        index[feature] = str(path)
    return index


def _row_keys(table: pd.DataFrame, modality: str, sources: Mapping[str, str]) -> list:
    """Each row's content key in a file of `modality`; None where its image was not encoded."""
    report_keys = table["report_text"].map(text_key).tolist()
    if modality == "text":
        return report_keys
    image_keys = [sources.get(image) for image in table["image_path"]]
    if modality == "image":
        return image_keys
    return [
        pair_key(image, report) if image is not None else None
        for image, report in zip(image_keys, report_keys, strict=True)
    ]


def _why_absent(table: pd.DataFrame, absent: np.ndarray, skipped: Mapping[str, str]) -> str:
    """Count the absent rows by the reason extraction recorded (an image path, or a report
    key followed by a space and its start), else "not in the extracted manifest"."""
    reason_of_report = {name.split(" ", 1)[0]: reason for name, reason in skipped.items()}
    reasons = [
        skipped.get(image)
        or reason_of_report.get(text_key(report), "not in the extracted manifest")
        for image, report in zip(
            table["image_path"][absent], table["report_text"][absent], strict=True
        )
    ]
    return ", ".join(f"{reason}: {count}" for reason, count in Counter(reasons).most_common())


@dataclass(frozen=True)
class _Stored:
    """One needed feature: the file, and which of its rows each manifest row uses (-1: none)."""

    path: str
    features: FeatureSet
    rows: np.ndarray


def _look_up(table: pd.DataFrame, feature: FeatureId, path: str) -> _Stored:
    stored = read_features(path)
    modality = feature[1]
    if modality not in MODALITIES:
        raise UserError(f"{path}: modality {modality!r} is not one of {MODALITIES}")
    row_of_key = {key: row for row, key in enumerate(stored.keys)}
    keys = _row_keys(table, modality, stored.sources)
    rows = np.fromiter((row_of_key.get(key, -1) for key in keys), np.int64, len(keys))
    return _Stored(path, stored, rows)


def load_cached_rows(
    manifest_path: str | Path,
    feature_paths: Sequence[str | Path],
    needed: Iterable[FeatureId],
    classes: Sequence[str],
    *,
    image_root: str | Path | None = None,
    labels_per_exam: bool = False,
    expect_weights: str = "",
    expect_dtype: str = "",
    labels_required: bool = True,
    clinical: ClinicalColumns | None = None,
) -> CachedRows:
    """Validate the manifest and align the vectors of every needed feature with its rows.

    Images are looked up through each image file's path-to-key table, so this needs the
    manifest and the feature files, not the images; where the images are here, their
    content is checked against that table (fuse.identity has the rules).

    A pair without a vector in some needed file (skipped at extraction, or absent from
    the manifest extracted from) is left out of every model, so all models see the same
    rows; a note says how many and why.

    Args:
        feature_paths: feature files, or folders of them (every `*.h5` inside).
        image_root: where images may be read to check their content; None: the
            manifest's folder.
        labels_per_exam: a patient's exams may have different labels (see load_manifest).
        expect_weights: "" (any), "tiny" or "real": the weights every file must come from.
        expect_dtype: "" (any) or the dtype every file must have been extracted in.
        labels_required: false for rows to predict: a blank or absent label is read as
            unknown (class index -1).
        clinical: clinical columns the manifest must hold, with valid values
            (pipeline.clinical); None: none are read.

    Raises:
        UserError: a bad manifest (or bad clinical values), a needed feature in none of
            the files, vectors of other images or of another data set, files whose weights
            or dtype disagree, or no pair with a vector in every file.
    """
    table = load_manifest(
        manifest_path,
        classes,
        check_images=False,
        labels_per_exam=labels_per_exam,
        allow_empty_reports=True,  # extraction skipped them: their pairs are left out
        labels_required=labels_required,
    ).reset_index(drop=True)
    if clinical is not None:
        check_clinical_columns(manifest_path, table, clinical)
    index = index_feature_files(feature_paths)
    stored: dict[FeatureId, _Stored] = {}
    for feature in dict.fromkeys(needed):
        if feature not in index:
            held = ", ".join(f"{encoder} ({modality})" for encoder, modality in index) or "none"
            raise UserError(
                f"no feature file holds {feature[1]} features of encoder {feature[0]} "
                f"(the files given hold: {held}); extract them with `python -m extract "
                f"--model {feature[0]} ...` or leave out the models that need them"
            )
        stored[feature] = _look_up(table, feature, index[feature])
    check_weights(
        {item.path: item.features.provenance for item in stored.values()},
        expect_weights,
        expect_dtype,
    )
    notes = _check_images(table, manifest_path, stored, image_root)
    keep = np.ones(len(table), dtype=bool)
    for item in stored.values():
        absent = item.rows < 0
        if absent.any():
            notes.append(
                f"{item.path}: {int(absent.sum())} of {len(table)} pair(s) have no vector "
                f"({_why_absent(table, absent, item.features.skipped)}), at line(s) "
                f"{first_lines(pd.Series(absent), table[LINE_COLUMN])}; left out of every model"
            )
        keep &= ~absent
    if not keep.any():
        raise UserError(
            f"no pair of {manifest_path} has a vector in every feature file ({'; '.join(notes)}); "
            "the files were extracted from other data: re-run extraction on this manifest"
        )
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    table = table[keep].reset_index(drop=True)
    features = {
        feature: torch.from_numpy(
            np.ascontiguousarray(item.features.vectors[item.rows[keep]], dtype=np.float32)
        )
        for feature, item in stored.items()
    }
    report_groups, _ = pd.factorize(table["report_text"].map(text_key))
    class_index = {name: position for position, name in enumerate(classes)}
    return CachedRows(
        table=table,
        labels=torch.tensor(
            table["label"].map(class_index).fillna(-1).to_numpy(), dtype=torch.long
        ),
        report_groups=torch.from_numpy(report_groups.astype(np.int64)),
        features=features,
        provenance={feature: dict(item.features.provenance) for feature, item in stored.items()},
        paths={feature: item.path for feature, item in stored.items()},
        notes=tuple(notes),
    )


def _check_images(
    table: pd.DataFrame,
    manifest_path: str | Path,
    stored: Mapping[FeatureId, _Stored],
    image_root: str | Path | None,
) -> list[str]:
    """Check every image or pair file against the images (or the recorded manifest)."""
    with_images = [item for feature, item in stored.items() if feature[1] != "text"]
    if not with_images:
        return []
    keys_here = image_keys_here(table, manifest_path, image_root)
    notes = [
        check_image_identity(
            table,
            manifest_path,
            item.features.sources,
            item.features.provenance,
            item.path,
            keys_here,
        )
        for item in with_images
    ]
    return [note for note in notes if note]
