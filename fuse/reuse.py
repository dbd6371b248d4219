"""Heads and probes another protocol run already fitted, taken from its tables.

A label-efficiency run trains M4 on shares of each trial's training patients; its 100%
share is the main protocol's M4 head of the same trial: same data, seed, split and
settings. Given that run's folder (`reuse`), a protocol run takes each such head's and
probe's rows of the predictions table, its training curve and its record from there
instead of fitting it again. Only the tables are read: they hold everything a head adds
to a run's outputs, so nothing needs the saved head itself.

A fit is taken only when it is the one this run would make: the same manifest and feature
files (by content), the same model, trial, fold, seed and share, and every setting that
shapes a head equal (JOB_SETTINGS leaves out those that only say where files are or which
jobs run). The copy differs from a fit made here only by the rounding of other thread
counts, and its record names the folder it came from.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fuse.schema import (
    CONDITION_COLUMN,
    OBSERVED,
    attribution_column,
    read_curves,
    read_predictions,
    read_runs,
)
from fuse.zoo import ModelSpec
from pipeline.clinical import ClinicalSettings

# Settings that do not change a job's head: where inputs and outputs are, which models,
# trials, shares and kinds run, the checks made on reading, and the encoders (the models'
# inputs, compared as part of each model).
_NOT_SHAPING = frozenset(
    {
        "manifest",
        "features",
        "out",
        "heads",
        "save_models",
        "models",
        "probes",
        "trials",
        "label_fractions",
        "conditions",
        "wait_for_lock",
        "reuse",
        "expect_weights",
        "expect_dtype",
        "image_root",
        "image_encoder",
        "text_encoder",
        "vit_encoder",
    }
)
_CLINICAL = frozenset(field.name for field in dataclasses.fields(ClinicalSettings))
REUSED_FROM = "reused_from"  # the record's key naming the folder a fit was taken from


@dataclass(frozen=True)
class Wanted:
    """One fit a run plans: the job's position, the kind, and what identifies the fit."""

    job: int
    kind: str  # "head" or "probe"
    model: ModelSpec
    trial: int
    fold: int
    seed: int
    fraction: float


@dataclass
class Reused:
    """One fit taken from another run, as the run's outputs take it."""

    record: dict[str, Any]
    frames: list[pd.DataFrame]
    curve: pd.DataFrame | None


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _setting_difference(
    theirs: Mapping[str, Any], ours: Mapping[str, Any], model: ModelSpec
) -> str | None:
    for name, value in ours.items():
        if name in _NOT_SHAPING or (name in _CLINICAL and not model.clinical):
            continue
        if _plain(value) != theirs.get(name):
            return f"{name} is {theirs.get(name)!r} there and {_plain(value)!r} here"
    return None


def _data_difference(
    theirs: Mapping[str, Any], ours: Mapping[str, Any], model: ModelSpec
) -> str | None:
    if theirs["manifest"]["sha256"] != ours["manifest"]["sha256"]:
        return "its manifest's content differs"
    for encoder, modality in model.inputs:
        feature = f"{encoder}/{modality}"
        if theirs["features"].get(feature, {}).get("sha256") != ours["features"][feature]["sha256"]:
            return f"its {feature} features differ"
    return None


def _fit_key(model: str, kind: str, trial: int, fold: int, fraction: float) -> tuple:
    return (model, kind, int(trial), int(fold), float(fraction))


def plan_reuse(
    folder: str | Path,
    settings: Mapping[str, Any],
    identity: Mapping[str, Any],
    wanted: Sequence[Wanted],
    conditions: bool,
) -> tuple[dict[tuple[int, str], dict[str, Any]], list[str]]:
    """Which of the `wanted` fits the run in `folder` made, and why the others are not taken.

    Args:
        folder: another protocol run's output folder.
        settings: this run's settings (pipeline.config.config_to_dict).
        identity: this run's data identity (runs.json's "data").
        wanted: every fit this run plans.
        conditions: whether this run scores the conditions (then the other run must have).

    Returns:
        The other run's record of each fit taken, by (job, kind), and one line per model
        saying why its fits were not taken.

    Raises:
        UserError: the folder lacks a readable runs.json.
    """
    runs = read_runs(folder)
    theirs = {
        _fit_key(r["model"], r["head"], r["trial"], r["fold"], r.get("fraction", 1.0)): r
        for r in runs["runs"]
    }
    taken: dict[tuple[int, str], dict[str, Any]] = {}
    reasons: dict[str, str] = {}
    for fit in wanted:
        name = fit.model.name
        if name in reasons:
            continue
        why = None
        if len(settings.get("learning_rates") or ()) > 1:
            why = "this run searches learning rates"
        elif conditions and not runs["settings"].get("conditions", False):
            why = "it did not score the conditions"
        elif runs["models"].get(name) != _plain(dataclasses.asdict(fit.model)):
            why = "its model differs"
        else:
            why = _setting_difference(runs["settings"], settings, fit.model) or _data_difference(
                runs["data"], identity, fit.model
            )
        if why:
            reasons[name] = f"{name}: none taken from {folder}: {why}"
            continue
        record = theirs.get(_fit_key(name, fit.kind, fit.trial, fit.fold, fit.fraction))
        if record is not None and record["seed"] == fit.seed:
            taken[(fit.job, fit.kind)] = record
    return taken, list(reasons.values())


# The columns naming one fit in the predictions table and in the curves (heads only).
_ROW_KEYS = ("model", "head", "trial", "fold", "fraction")
_CURVE_KEYS = ("model", "trial", "fold", "fraction")


def _of_fit(frame: pd.DataFrame, record: Mapping[str, Any], keys: Sequence[str]) -> pd.DataFrame:
    selected = np.logical_and.reduce([frame[key].to_numpy() == record[key] for key in keys])
    return frame[selected]


def _without_empty(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    # The other run's table holds the columns of all its models (a clinical model's
    # attribution, say); a fit made here writes only its own.
    empty = [column for column in columns if frame[column].isna().all()]
    return frame.drop(columns=empty).reset_index(drop=True)


def reused_fits(
    folder: str | Path,
    taken: Mapping[tuple[int, str], Mapping[str, Any]],
    classes: Sequence[str],
    conditions: bool,
) -> dict[tuple[int, str], Reused]:
    """The table rows, curve and record of each fit `plan_reuse` took, by (job, kind)."""
    if not taken:
        return {}
    predictions = read_predictions(folder, classes, conditions=conditions)
    curves = read_curves(folder)
    attributions = [column for column in predictions if column.startswith(attribution_column(""))]
    fits: dict[tuple[int, str], Reused] = {}
    for key, record in taken.items():
        rows = _without_empty(_of_fit(predictions, record, _ROW_KEYS), attributions)
        # Observed rows first, then each condition's, as a fit made here writes them.
        frames = [rows[rows[CONDITION_COLUMN] == OBSERVED].reset_index(drop=True)]
        for condition in dict.fromkeys(rows[CONDITION_COLUMN]):
            if condition != OBSERVED:
                frames.append(rows[rows[CONDITION_COLUMN] == condition].reset_index(drop=True))
        curve = None
        if record["head"] == "head":
            curve = _of_fit(curves, record, _CURVE_KEYS)
            curve = _without_empty(curve, list(curve.columns))
        fits[key] = Reused({**record, REUSED_FROM: str(folder)}, frames, curve)
    return fits
