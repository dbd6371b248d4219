"""Cached features and the manifest, joined once into row-aligned tensors.

Each feature file holds one encoder's vectors of unique items (images, reports, or
image-report pairs), keyed by content. Here every file a run needs is read once and
expanded to one row per manifest pair, so training indexes rows and never looks up keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cache.store import read_features, read_provenance
from pipeline.errors import UserError
from pipeline.keys import pair_key, text_key
from pipeline.manifest import load_manifest

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

    def patients(self, rows: torch.Tensor) -> set[str]:
        """The patients of `rows`."""
        return set(self.table["patient_id"].to_numpy()[rows.numpy()])


def index_feature_files(paths: Iterable[str | Path]) -> dict[FeatureId, str]:
    """Map (encoder, modality) to the file holding it, reading provenance only.

    Raises:
        UserError: two files holding the same encoder and modality.
    """
    index: dict[FeatureId, str] = {}
    for path in paths:
        provenance = read_provenance(path)
        feature = (str(provenance.get("encoder")), str(provenance.get("modality")))
        if feature in index:
            raise UserError(
                f"{index[feature]} and {path} both hold {feature[1]} features of encoder "
                f"{feature[0]}; pass one of them"
            )
        index[feature] = str(path)
    return index


def _row_keys(table: pd.DataFrame, modality: str, sources: Mapping[str, str], path: str) -> list:
    report_keys = table["report_text"].map(text_key).tolist()
    if modality == "text":
        return report_keys
    image_paths = table["image_path"].tolist()
    unknown = sorted({image for image in image_paths if image not in sources})
    if unknown:
        raise UserError(
            f"{path} has no vector for {len(unknown)} image(s) of the manifest, e.g. "
            f"{unknown[0]}; re-run extraction on this manifest"
        )
    image_keys = [sources[image] for image in image_paths]
    if modality == "image":
        return image_keys
    return [pair_key(image, report) for image, report in zip(image_keys, report_keys, strict=True)]


def _row_vectors(table: pd.DataFrame, feature: FeatureId, path: str) -> tuple[torch.Tensor, dict]:
    stored = read_features(path)
    modality = feature[1]
    if modality not in MODALITIES:
        raise UserError(f"{path}: modality {modality!r} is not one of {MODALITIES}")
    keys = _row_keys(table, modality, stored.sources, path)
    rows = stored.rows_of(keys, f"{path} against the manifest")
    vectors = np.ascontiguousarray(stored.vectors[rows], dtype=np.float32)
    if not np.isfinite(vectors).all():
        bad = int((~np.isfinite(vectors)).any(axis=1).sum())
        raise UserError(f"{path}: {bad} row(s) hold NaN or infinite values; re-run extraction")
    return torch.from_numpy(vectors), dict(stored.provenance)


def load_cached_rows(
    manifest_path: str | Path,
    feature_paths: Sequence[str | Path],
    needed: Iterable[FeatureId],
    classes: Sequence[str],
) -> CachedRows:
    """Validate the manifest and align the vectors of every needed feature with its rows.

    Images are looked up through each image file's path-to-key table, so this needs the
    manifest and the feature files, not the images.

    Raises:
        UserError: a bad manifest, a needed feature in none of the files, or a pair whose
            image or report has no vector.
    """
    table = load_manifest(manifest_path, classes, check_images=False).reset_index(drop=True)
    index = index_feature_files(feature_paths)
    features, provenance = {}, {}
    for feature in dict.fromkeys(needed):
        if feature not in index:
            held = ", ".join(f"{encoder} ({modality})" for encoder, modality in index) or "none"
            raise UserError(
                f"no feature file holds {feature[1]} features of encoder {feature[0]} "
                f"(the files given hold: {held}); extract them with `python -m extract "
                f"--model {feature[0]} ...` or leave out the models that need them"
            )
        features[feature], provenance[feature] = _row_vectors(table, feature, index[feature])
    report_groups, _ = pd.factorize(table["report_text"].map(text_key))
    class_index = {name: position for position, name in enumerate(classes)}
    return CachedRows(
        table=table,
        labels=torch.tensor(table["label"].map(class_index).to_numpy(), dtype=torch.long),
        report_groups=torch.from_numpy(report_groups.astype(np.int64)),
        features=features,
        provenance=provenance,
        paths={feature: index[feature] for feature in features},
    )


def standardise(
    inputs: Sequence[torch.Tensor], train_rows: torch.Tensor
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Z-score each input with the mean and SD of the training rows only.

    Frozen-encoder vectors share a large common offset (and LLMs have a few huge
    dimensions); after a linear projection and L2-normalisation that offset drowns the
    differences between items. Statistics come from `train_rows` alone, so nothing about
    validation, test or external rows leaks into training.

    Returns:
        The standardised inputs and, per input, the statistics a saved head must keep.
    """
    standardised, statistics = [], []
    for vectors in inputs:
        train = vectors[train_rows]
        mean, sd = train.mean(dim=0), train.std(dim=0).clamp(min=1e-6)
        standardised.append((vectors - mean) / sd)
        statistics.append({"mean": mean, "sd": sd})
    return standardised, statistics
