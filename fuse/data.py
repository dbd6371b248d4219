"""Cached features and the manifest, joined once into in-memory tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cache.store import FeatureSet, check_provenance, read_features
from pipeline.errors import UserError
from pipeline.keys import text_key
from pipeline.manifest import load_manifest
from pipeline.splits import assign_splits


@dataclass(frozen=True)
class FusionData:
    """One row per image-report pair, every tensor aligned with `table`."""

    table: pd.DataFrame  # the manifest with its final `split`
    image: torch.Tensor  # [N, image width] float32
    text: torch.Tensor  # [N, text width] float32
    labels: torch.Tensor  # [N] class indices
    report_groups: torch.Tensor  # [N] rows with equal values share one report
    provenance: Mapping[str, Mapping[str, Any]]  # "image" and "text" feature provenance

    def rows(self, split: str) -> torch.Tensor:
        """Indices of the rows in `split`."""
        return torch.from_numpy(np.flatnonzero(self.table["split"].to_numpy() == split))


def _vectors_for(features: FeatureSet, keys: list[str], path: str) -> torch.Tensor:
    rows = features.rows_of(keys, f"{path} against the manifest")
    return torch.from_numpy(np.ascontiguousarray(features.vectors[rows], dtype=np.float32))


def load_fusion_data(
    manifest_path: str | Path,
    image_features_path: str | Path,
    text_features_path: str | Path,
    *,
    classes: Sequence[str],
    image_expected: Mapping[str, str],
    text_expected: Mapping[str, str],
    split_fractions: Sequence[float],
    split_seed: int,
) -> FusionData:
    """Validate the manifest, check both feature files' provenance and align their vectors.

    Images are looked up through the image file's path-to-key table, so this needs the
    manifest and the two feature files but not the images themselves.

    Raises:
        UserError: a bad manifest, a feature file that does not match the run, or a pair
            whose image or report has no vector.
    """
    table = load_manifest(manifest_path, classes, check_images=False)
    table["split"] = assign_splits(table, split_fractions, split_seed)
    image_features = read_features(image_features_path)
    text_features = read_features(text_features_path)
    check_provenance(image_features_path, image_features.provenance, image_expected)
    check_provenance(text_features_path, text_features.provenance, text_expected)

    image_paths = table["image_path"].tolist()
    unknown_paths = [path for path in image_paths if path not in image_features.sources]
    if unknown_paths:
        raise UserError(
            f"{image_features_path} has no vector for {len(unknown_paths)} image(s) of "
            f"{manifest_path}, e.g. {unknown_paths[0]}; re-run image extraction on this manifest"
        )
    image_keys = [image_features.sources[path] for path in image_paths]
    report_keys = table["report_text"].map(text_key).tolist()
    report_groups, _ = pd.factorize(pd.Series(report_keys))
    class_index = {name: index for index, name in enumerate(classes)}
    return FusionData(
        table=table.reset_index(drop=True),
        image=_vectors_for(image_features, image_keys, str(image_features_path)),
        text=_vectors_for(text_features, report_keys, str(text_features_path)),
        labels=torch.tensor(table["label"].map(class_index).to_numpy(), dtype=torch.long),
        report_groups=torch.from_numpy(report_groups.astype(np.int64)),
        provenance={"image": image_features.provenance, "text": text_features.provenance},
    )


def standardise(data: FusionData) -> tuple[FusionData, dict[str, dict[str, torch.Tensor]]]:
    """Z-score each feature with the train split's mean and SD.

    Frozen-encoder vectors share a large common offset (and LLMs have a few huge
    dimensions); after a linear projection and L2-normalisation that offset drowns the
    differences between items, and at the paper's learning rate the projector's bias
    takes most of training to remove it.

    Returns:
        The standardised data and the statistics, which a saved head must keep.
    """
    train = data.rows("train")
    statistics = {}
    for modality in ("image", "text"):
        vectors = getattr(data, modality)
        mean, sd = vectors[train].mean(dim=0), vectors[train].std(dim=0).clamp(min=1e-6)
        statistics[modality] = {"mean": mean, "sd": sd}
    return (
        dataclasses.replace(
            data,
            image=(data.image - statistics["image"]["mean"]) / statistics["image"]["sd"],
            text=(data.text - statistics["text"]["mean"]) / statistics["text"]["sd"],
        ),
        statistics,
    )


def expected_provenance(encoder: str, modality: str, pooling: str) -> dict[str, str]:
    """The provenance entries a fusion run requires of one feature file."""
    return {"encoder": encoder, "modality": modality, "pooling": pooling}
