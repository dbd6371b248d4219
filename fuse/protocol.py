"""The paper's evaluation protocol on cached features: every model, every trial, one table.

For each model and each trial (and fold), a head and a logistic-regression probe train on
that trial's training patients, select on its validation patients, and predict every row.
All of it lands in one predictions table (one row per pair, model, head, trial and fold),
which is the contract with everything downstream: tables, plots and analyses read it and
never retrain.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fuse.data import CachedRows, centre_sites, load_cached_rows, standardise
from fuse.model import FusionHead
from fuse.probe import fit_probe
from fuse.schema import CURVES_FILE, PREDICTIONS_FILE, RUNS_FILE, prediction_rows
from fuse.train import (
    HeadSettings,
    TrainedHead,
    check_settings,
    predict_proba,
    release_freed_memory,
    train_head,
)
from fuse.zoo import FROZEN_NOTE, ModelSpec, protocol_models, select_models
from pipeline.config import config_to_dict, require_paths, setting
from pipeline.errors import UserError
from pipeline.keys import file_key
from pipeline.metrics import choose_threshold
from pipeline.splits import SPLIT_MODES, TrialSplit, plan_trials


@dataclass(frozen=True)
class ProtocolConfig(HeadSettings):
    """Inputs, outputs and choices of a protocol run; the head's settings are inherited."""

    manifest: str = setting("", "manifest CSV/Parquet the features were extracted from")
    features: tuple[str, ...] = setting(
        (), "feature files written by `python -m extract` (each names its encoder and modality)"
    )
    out: str = setting("", f"folder for {PREDICTIONS_FILE}, {RUNS_FILE} and {CURVES_FILE}")
    heads: str = setting("", "folder for the first trial's trained heads (empty: none saved)")
    classes: tuple[str, ...] = setting(
        ("VCD", "GC"), "the two class labels, negative first (the heads are binary)", count=2
    )
    models: tuple[str, ...] = setting(
        ("M4", "M1", "M2", "M3", "CLIP", "ALIGN", "BLIP-2", "ViLT", "Chinese-CLIP"),
        "models to train: M4 (VLMF-Net), ablations M1 image, M2 report, M3 ViT without "
        "Q-Former + report; frozen-feature baselines CLIP, ALIGN, BLIP-2, ViLT, Chinese-CLIP",
    )
    image_encoder: str = setting("blip2-qformer", "encoder of M1's and M4's image features")
    text_encoder: str = setting("llama3", "encoder of M2's, M3's and M4's report features")
    vit_encoder: str = setting("blip2-vit", "encoder of M3's image features (no Q-Former)")
    probes: bool = setting(True, "train a logistic-regression probe beside every head")
    trials: int = setting(5, "trials, each with its own seed (seed + trial)", at_least=1)
    seed: int = setting(0, "seed of the first trial: its split, initialisation and batch order")
    split: str = setting(
        "redraw",
        "; ".join(f"{mode}: {meaning}" for mode, meaning in SPLIT_MODES.items()),
        choices=tuple(SPLIT_MODES),
    )
    folds: int = setting(5, "folds per trial when split is kfold", at_least=2)
    split_fractions: tuple[float, ...] = setting(
        (0.8, 0.1, 0.1), "train/val/test shares of patients (kfold: train:val only)"
    )
    learning_rates: tuple[float, ...] = setting(
        (),
        "learning rates to search per model on the first trial's validation split (lowest "
        "validation loss wins, then used for every trial); empty: use learning_rate",
    )
    standardise: bool = setting(
        True, "z-score every feature with the training rows' mean and SD (not in the paper)"
    )
    centre_external: bool = setting(
        True,
        "shift each external site's vectors so their mean is the training rows' mean (its "
        "own vectors only, no labels): a second hospital's camera and report template move "
        "every vector, which keeps a head's ranking but breaks its 0.5 cut; false: as they are",
    )
    expect_weights: str = setting(
        "", "weights every feature file must come from: tiny, real (hub or folder); empty: any"
    )
    expect_dtype: str = setting(
        "", "dtype every feature file must have been extracted in (e.g. float16); empty: any"
    )
    image_root: str = setting(
        "",
        "folder the manifest's images may lie in, read (when reachable) to check that the "
        "feature files' image keys match their content; empty: the manifest's folder",
    )
    labels_per_exam: bool = setting(
        False, "true: a patient's exams (exam_id) may have different labels"
    )
    wait_for_lock: float = setting(
        0,
        "seconds to wait while another run writes the same --out (0: refuse at once)",
        at_least=0,
    )


@dataclass
class _Job:
    model: ModelSpec
    split: TrialSplit
    rows: dict[str, torch.Tensor]


def _rows_by_split(split: TrialSplit) -> dict[str, torch.Tensor]:
    values = split.splits.to_numpy()
    return {
        name: torch.from_numpy(np.flatnonzero(values == name))
        for name in ("train", "val", "test", "external")
    }


def _external_sites(data: CachedRows, job: _Job) -> list[torch.Tensor]:
    external = job.rows["external"]
    sites = data.table["site"].to_numpy()[external.numpy()]
    return [external[torch.from_numpy(sites == site)] for site in dict.fromkeys(sites)]


def check_split_classes(
    rows: dict[str, torch.Tensor], labels: torch.Tensor, job: str, classes
) -> None:
    """Raise a UserError when the train or val split lacks a class (nothing to select on)."""
    for split in ("train", "val"):
        present = set(labels[rows[split]].tolist())
        if len(present) < len(classes):
            raise UserError(
                f"{job}: the {split} split has {len(rows[split])} pairs of classes "
                f"{sorted(classes[index] for index in present)}; it needs every class of "
                f"{list(classes)}: add patients or change the split settings"
            )


def build_head(
    spec: ModelSpec, widths: list[int], settings: HeadSettings, classes: int
) -> FusionHead:
    """A fresh head of `spec`'s kind for inputs of `widths`."""
    names = [f"{modality}{position}" for position, (_, modality) in enumerate(spec.inputs)]
    projection_of = {"image": settings.image_projection, "text": settings.text_projection}
    projections = (
        {
            name: projection_of[modality]
            for name, (_, modality) in zip(names, spec.inputs, strict=True)
        }
        if spec.head == "vlmf"
        else {}
    )
    return FusionHead(
        input_widths=dict(zip(names, widths, strict=True)),
        projections=projections,
        hidden_widths=settings.hidden_widths,
        dropout=settings.dropout,
        num_classes=classes,
        contrastive_width=settings.contrastive_width if spec.head == "vlmf" else 0,
    )


def _train(
    job: _Job, data: CachedRows, inputs: list[torch.Tensor], settings: HeadSettings
) -> TrainedHead:
    torch.manual_seed(job.split.seed)
    model = build_head(
        job.model, [x.shape[1] for x in inputs], settings, int(data.labels.max()) + 1
    )
    return train_head(
        model,
        inputs,
        data.labels,
        data.report_groups,
        job.rows["train"],
        job.rows["val"],
        settings,
        job.split.seed,
    )


def _search_learning_rate(
    job: _Job, data: CachedRows, inputs: list[torch.Tensor], config: ProtocolConfig
) -> tuple[float, list[dict[str, float]], TrainedHead]:
    """Train `job` once per learning rate; the lowest kept validation loss wins.

    Returns:
        The winning rate, what each rate gave, and the winner's head: the same head the
        trial would train with that rate (same seed and settings), so it is not retrained.
    """
    tried, heads = [], {}
    for learning_rate in config.learning_rates:
        settings = dataclasses.replace(config, learning_rate=learning_rate)
        trained = heads[learning_rate] = _train(job, data, inputs, settings)
        kept = trained.history[trained.best_epoch - 1]
        tried.append(
            {
                "learning_rate": learning_rate,
                "val_loss": kept["val_loss"],
                "val_auc": kept["val_auc"],
                "best_epoch": trained.best_epoch,
                "fallback": trained.fallback,
            }
        )
    eligible = [entry for entry in tried if not entry["fallback"]] or tried
    winner = min(eligible, key=lambda entry: entry["val_loss"])["learning_rate"]
    return winner, tried, heads[winner]


def _prediction_frame(
    data: CachedRows, job: _Job, head: str, probabilities: np.ndarray, threshold: float, classes
) -> pd.DataFrame:
    return prediction_rows(
        data.table,
        job.split.splits.to_numpy(),
        model=job.model.name,
        head=head,
        trial=job.split.trial,
        fold=job.split.fold,
        threshold=threshold,
        probabilities=probabilities,
        classes=classes,
    )


def _data_identity(config: ProtocolConfig, data: CachedRows) -> dict[str, Any]:
    return {
        "manifest": {"path": config.manifest, "sha256": file_key(config.manifest)},
        "features": {
            f"{encoder}/{modality}": {
                "path": data.paths[(encoder, modality)],
                "sha256": file_key(data.paths[(encoder, modality)]),
                "weights": provenance.get("weights"),
                "weights_fingerprint": provenance.get("weights_fingerprint"),
                "pooling": provenance.get("pooling"),
                "dtype": provenance.get("dtype"),
            }
            for (encoder, modality), provenance in data.provenance.items()
        },
        "notes": list(data.notes),  # pairs left out, rows matched by image path only
    }


def _save_head(
    path: Path, trained: TrainedHead, job: _Job, statistics, config: ProtocolConfig
) -> None:
    torch.save(
        {
            "model": dataclasses.asdict(job.model),
            "state_dict": trained.model.state_dict(),
            "config": config_to_dict(config),
            "best_epoch": trained.best_epoch,
            "standardisation": statistics,  # apply to new features before the head
            "seed": job.split.seed,
        },
        path,
    )


def run(config: ProtocolConfig) -> dict[str, Any]:
    """Train and evaluate every requested model on every trial; write the predictions table.

    Returns:
        The run records written to runs.json.
    """
    require_paths(config, "manifest", "features", "out")
    try:
        check_settings(config)
    except ValueError as error:
        raise UserError(str(error)) from None
    models = select_models(
        protocol_models(config.image_encoder, config.text_encoder, config.vit_encoder),
        config.models,
    )
    data = load_cached_rows(
        config.manifest,
        config.features,
        [feature for model in models for feature in model.inputs],
        config.classes,
        expect_weights=config.expect_weights,
        expect_dtype=config.expect_dtype,
        image_root=config.image_root or None,
        labels_per_exam=config.labels_per_exam,
    )
    plan = plan_trials(
        data.table, config.split, config.trials, config.folds, config.split_fractions, config.seed
    )
    jobs = [_Job(model, split, _rows_by_split(split)) for model in models for split in plan]
    for split in plan:
        check_split_classes(
            _rows_by_split(split), data.labels, f"trial {split.trial}", config.classes
        )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    heads_folder = Path(config.heads) if config.heads else None
    if heads_folder:
        heads_folder.mkdir(parents=True, exist_ok=True)
    frames, curves, records = [], [], []
    learning_rate_of: dict[str, float] = {}
    searches: dict[str, list] = {}
    for job in tqdm(jobs, desc="protocol", unit="head"):
        raw = [data.features[feature] for feature in job.model.inputs]
        inputs, statistics = (
            standardise(raw, job.rows["train"]) if config.standardise else (raw, None)
        )
        if config.centre_external and len(job.rows["external"]):
            inputs = centre_sites(inputs, job.rows["train"], _external_sites(data, job))
        name = job.model.name
        started = time.perf_counter()
        trained = None
        if name not in learning_rate_of:
            if len(config.learning_rates) > 1:
                learning_rate_of[name], searches[name], trained = _search_learning_rate(
                    job, data, inputs, config
                )
            else:
                learning_rate_of[name] = (config.learning_rates or (config.learning_rate,))[0]
        settings = dataclasses.replace(config, learning_rate=learning_rate_of[name])
        if trained is None:
            trained = _train(job, data, inputs, settings)
        probabilities = predict_proba(trained.model, inputs, settings.precision)
        head_seconds = time.perf_counter() - started
        val = job.rows["val"].numpy()
        labels = data.labels.numpy()
        record = {
            "model": name,
            "head": "head",
            "trial": job.split.trial,
            "fold": job.split.fold,
            "seed": job.split.seed,
            "learning_rate": settings.learning_rate,
            "best_epoch": trained.best_epoch,
            "first_eligible_epoch": trained.first_eligible_epoch,
            "epochs_trained": trained.epochs_trained,
            "fallback_to_last_epoch": trained.fallback,
            "threshold": choose_threshold(labels[val], probabilities[val, -1]),
            "seconds": round(head_seconds, 3),
        }
        records.append(record)
        frames.append(
            _prediction_frame(
                data, job, "head", probabilities, record["threshold"], config.classes
            )
        )
        curves.append(
            pd.DataFrame(trained.history).assign(
                model=name, trial=job.split.trial, fold=job.split.fold
            )
        )
        if heads_folder and job.split.trial == 0 and job.split.fold == 0:
            _save_head(heads_folder / f"{name}.pt", trained, job, statistics, settings)
        del trained
        release_freed_memory()  # before the probe, which needs its own float64 copy
        if config.probes:
            started = time.perf_counter()
            probe = fit_probe(
                inputs, data.labels, job.rows["train"], job.rows["val"], job.split.seed
            )
            probe_seconds = time.perf_counter() - started
            records.append(
                {
                    **record,
                    "head": "probe",
                    "learning_rate": None,
                    "best_epoch": None,
                    "first_eligible_epoch": None,
                    "epochs_trained": None,
                    "fallback_to_last_epoch": None,
                    "probe_c": probe.c,
                    "threshold": choose_threshold(labels[val], probe.probabilities[val, -1]),
                    "seconds": round(probe_seconds, 3),
                }
            )
            frames.append(
                _prediction_frame(
                    data,
                    job,
                    "probe",
                    probe.probabilities,
                    records[-1]["threshold"],
                    config.classes,
                )
            )
        del inputs
        release_freed_memory()
    predictions = pd.concat(frames, ignore_index=True)
    predictions.to_parquet(out / PREDICTIONS_FILE, index=False)
    pd.concat(curves, ignore_index=True).to_csv(out / CURVES_FILE, index=False)
    result = {
        "note": FROZEN_NOTE,
        "settings": config_to_dict(config),
        "models": {model.name: dataclasses.asdict(model) for model in models},
        "learning_rate_search": searches,
        "data": _data_identity(config, data),
        "runs": records,
    }
    (out / RUNS_FILE).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return result
