"""The pointing game: does a heatmap look at the lesion? (Zhang et al., 2018)

Per image: whether the map's peak falls inside the lesion (a hit), and the share of the
map's mass inside it. Against a random map: a peak drawn uniformly over the image hits
with probability equal to the lesion's share of the image's pixels, and a map of
independent, identically distributed values puts that same share of its mass inside in
expectation; so both baselines are the mean area share of the lesions scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.errors import UserError
from pipeline.stats import bootstrap_weights, percentile_interval

BOOTSTRAP_RESAMPLES = 1000  # patient resamples of each set's means (a matrix product: cheap)
# A set whose hit rate lies within this of its random baseline, or whose CI holds it, is
# called "near the baseline" in the notes.
NEAR_BASELINE = 0.05


def lesion_mask(value: str, folder: Path, size: tuple[int, int], where: str) -> np.ndarray | None:
    """The lesion of one image as booleans [height, width], from a manifest cell.

    Args:
        value: a mask image's path (relative to `folder`; nonzero pixels are the lesion), a
            box "x0,y0,x1,y1" in the image's pixels (x1, y1 exclusive), or "" for none.
        size: the image's (width, height), which a mask must have.
        where: the manifest line, for messages.

    Raises:
        UserError: a mask that cannot be read or has another size, or a malformed box.
    """
    value = value.strip()
    if not value:
        return None
    width, height = size
    parts = value.split(",")
    if len(parts) == 4:
        try:
            x0, y0, x1, y1 = (round(float(part)) for part in parts)
        except ValueError:
            raise UserError(f"{where}: box {value!r} is not four numbers x0,y0,x1,y1") from None
        mask = np.zeros((height, width), dtype=bool)
        mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = True
        return mask
    path = folder / value
    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
    except (OSError, ValueError) as error:
        raise UserError(f"{where}: cannot read the lesion mask {path}: {error}") from None
    if mask.shape != (height, width):
        raise UserError(
            f"{where}: lesion mask {path} is {mask.shape[1]}x{mask.shape[0]}; its image is "
            f"{width}x{height} (a mask must align pixel for pixel with its image)"
        )
    return mask


@dataclass(frozen=True)
class PointingScore:
    """One image's pointing-game result."""

    hit: bool  # the map's peak is inside the lesion
    mass_inside: float  # share of the map's total inside the lesion
    area_share: float  # the lesion's share of the image: the random map's expected value


def score_map(heatmap: np.ndarray, mask: np.ndarray) -> PointingScore | None:
    """Score one map against one lesion mask of the same shape; None for a map that is zero
    everywhere (it points nowhere) or an empty mask."""
    total = float(heatmap.sum())
    if total <= 0 or not mask.any():
        return None
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return PointingScore(
        hit=bool(mask[peak]),
        mass_inside=float(heatmap[mask].sum() / total),
        area_share=float(mask.mean()),
    )


def _mean_ci(values: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    return percentile_interval(weights @ values / weights.sum(axis=1))


def summarise(images: pd.DataFrame, about: Mapping[str, Any], seed: int) -> list[dict[str, Any]]:
    """One row per set: counts, hit rate and mass inside with patient-bootstrap 95% CIs,
    and their random-map baselines.

    Args:
        images: one row per scored image with columns set, patient_id, hit, mass_inside,
            area_share (rows with a zero map have NaN there and are counted apart).
        about: columns copied into every row (which head, trial, fold).
    """
    rows = []
    for name, group in images.groupby("set", sort=False):
        scored = group.dropna(subset=["mass_inside"])
        row: dict[str, Any] = {
            "set": name,
            "level": "image",
            **about,
            "images": len(scored),
            "patients": scored["patient_id"].nunique(),
            "zero_maps": len(group) - len(scored),
        }
        if len(scored):
            hits = scored["hit"].to_numpy(dtype=float)
            mass = scored["mass_inside"].to_numpy(dtype=float)
            area = scored["area_share"].to_numpy(dtype=float)
            weights = bootstrap_weights(scored["patient_id"].to_numpy(), BOOTSTRAP_RESAMPLES, seed)
            low, high = _mean_ci(hits, weights)
            mass_low, mass_high = _mean_ci(mass, weights)
            excess_low, excess_high = _mean_ci(hits - area, weights)
            row |= {
                "pointing_accuracy": hits.mean(),
                "pointing_ci_low": low,
                "pointing_ci_high": high,
                "random_pointing_accuracy": area.mean(),
                "mass_inside": mass.mean(),
                "mass_ci_low": mass_low,
                "mass_ci_high": mass_high,
                "random_mass_inside": area.mean(),
                "excess_ci_low": excess_low,
                "excess_ci_high": excess_high,
            }
        rows.append(row)
    return rows


def near_baseline(row: Mapping[str, Any]) -> bool:
    """Whether a set's hit rate is within NEAR_BASELINE of the random map's, or its CI of
    the excess over it holds 0."""
    if "pointing_accuracy" not in row:
        return True
    close = abs(row["pointing_accuracy"] - row["random_pointing_accuracy"]) < NEAR_BASELINE
    return close or row["excess_ci_low"] <= 0 <= row["excess_ci_high"]


def describe(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One sentence per set, saying when it is near the random baseline."""
    sentences = []
    for row in rows:
        if "pointing_accuracy" not in row:
            sentences.append(f"{row['set']}: no image with a lesion and a nonzero map to score.")
            continue
        verdict = (
            "near the random baseline"
            if near_baseline(row)
            else (
                "above the random baseline"
                if row["pointing_accuracy"] > row["random_pointing_accuracy"]
                else "below the random baseline"
            )
        )
        sentences.append(
            f"{row['set']}: the peak fell inside the lesion in {row['pointing_accuracy']:.1%} "
            f"of {row['images']} images ({row['patients']} patients; 95% CI "
            f"{row['pointing_ci_low']:.1%}-{row['pointing_ci_high']:.1%}) against "
            f"{row['random_pointing_accuracy']:.1%} for a random map; {row['mass_inside']:.1%} "
            f"of the map's mass lay inside (random: {row['random_mass_inside']:.1%}): {verdict}."
        )
    return sentences
