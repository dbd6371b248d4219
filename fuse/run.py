"""The fuse stage: train VLMF-Net heads (and ablations) on cached features, then evaluate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fuse.data import FusionData, expected_provenance, load_fusion_data, standardise
from fuse.model import MODALITY_SETS
from fuse.report import write_metrics, write_roc
from fuse.train import HeadSettings, TrainedHead, predict_proba, train_head
from pipeline.config import config_to_dict, require_paths, save_config, setting
from pipeline.errors import UserError
from pipeline.metrics import classification_metrics

EVALUATED_SPLITS = ("val", "test", "external")
PLOTTED_SPLITS = ("test", "external")  # val chose the epoch, so its curve flatters


@dataclass(frozen=True)
class FuseConfig(HeadSettings):
    """Inputs, outputs and choices of one fuse run; the head's settings are inherited."""

    manifest: str = setting("", "manifest CSV/Parquet the features were extracted from")
    image_features: str = setting("", "HDF5 image feature file written by `python -m extract`")
    text_features: str = setting("", "HDF5 report feature file written by `python -m extract`")
    metrics: str = setting("", "where to write metrics.json (test, external and val metrics)")
    plots: str = setting("", "folder for roc.png and the ROC curves as CSV (for `dvc plots`)")
    models: str = setting("", "folder for the trained heads and the resolved config")
    classes: tuple[str, ...] = setting(("VCD", "GC"), "class labels, negative first")
    image_encoder: str = setting("blip2-qformer", "encoder the image features must come from")
    image_pooling: str = setting("mean", "pooling the image features must have used")
    text_encoder: str = setting("llama3", "encoder the report features must come from")
    text_pooling: str = setting("mean", "pooling the report features must have used")
    split_fractions: tuple[float, ...] = setting(
        (0.8, 0.1, 0.1), "train/val/test shares of patients without a split in the manifest"
    )
    split_seed: int = setting(0, "seed of the patient-level split")
    variants: tuple[str, ...] = setting(
        ("fusion", "image", "report"),
        "heads to train: fusion (image+report, the paper's M4), image (M1), report (M2)",
    )
    seed: int = setting(0, "seed of weight initialisation and batch order")
    standardise: bool = setting(
        True, "z-score every feature with the train split's mean and SD before the projectors"
    )


def _check_splits(data: FusionData, classes: tuple[str, ...]) -> None:
    for split in ("train", "val"):
        present = set(data.labels[data.rows(split)].tolist())
        if len(present) < len(classes):
            raise UserError(
                f"the {split} split has {len(data.rows(split))} pairs covering classes "
                f"{sorted(classes[index] for index in present)}; it needs every class of "
                f"{list(classes)}: add patients or set split fractions/seed differently"
            )


def _save_head(
    path: Path,
    trained: TrainedHead,
    config: FuseConfig,
    data: FusionData,
    statistics: dict[str, dict[str, torch.Tensor]] | None,
) -> None:
    torch.save(
        {
            "variant": trained.model.variant,
            "state_dict": trained.model.state_dict(),
            "config": config_to_dict(config),
            "best_epoch": trained.best_epoch,
            "history": trained.history,
            "feature_provenance": data.provenance,
            "widths": {"image": data.image.shape[1], "text": data.text.shape[1]},
            "standardisation": statistics,  # apply to new features before the head
        },
        path,
    )


def run(config: FuseConfig) -> dict[str, Any]:
    """Train every requested variant, evaluate it on each split and write the reports.

    Returns:
        The metrics written to `config.metrics`, keyed by variant then split.
    """
    require_paths(
        config, "manifest", "image_features", "text_features", "metrics", "plots", "models"
    )
    unknown = sorted(set(config.variants) - set(MODALITY_SETS))
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; choose from {sorted(MODALITY_SETS)}")
    data = load_fusion_data(
        config.manifest,
        config.image_features,
        config.text_features,
        classes=config.classes,
        image_expected=expected_provenance(config.image_encoder, "image", config.image_pooling),
        text_expected=expected_provenance(config.text_encoder, "text", config.text_pooling),
        split_fractions=config.split_fractions,
        split_seed=config.split_seed,
    )
    _check_splits(data, config.classes)
    statistics = None
    if config.standardise:
        data, statistics = standardise(data)
    models = Path(config.models)
    models.mkdir(parents=True, exist_ok=True)
    save_config(config, models / "fuse_config.yaml")
    metrics: dict[str, Any] = {}
    curves: dict[str, dict[str, tuple]] = {}
    for variant in tqdm(config.variants, desc="training heads", unit="head"):
        trained = train_head(data, variant, config, config.seed, len(config.classes))
        _save_head(models / f"head_{variant}.pt", trained, config, data, statistics)
        metrics[variant] = {"best_epoch": trained.best_epoch}
        for split in EVALUATED_SPLITS:
            rows = data.rows(split)
            if len(rows) == 0:
                continue
            labels = data.labels[rows].numpy()
            probabilities = predict_proba(trained.model, data, rows)
            metrics[variant][split] = classification_metrics(labels, probabilities, config.classes)
            if split in PLOTTED_SPLITS:
                curves.setdefault(split, {})[variant] = (labels, probabilities[:, -1])
    write_metrics(Path(config.metrics), metrics)
    write_roc(Path(config.plots), curves)
    return metrics
