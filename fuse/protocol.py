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
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from fuse.counterfactual import CONDITIONS, score_conditions
from fuse.data import CachedRows, load_cached_rows
from fuse.exam_model import exam_ids
from fuse.head import FeatureSource, FittedHead
from fuse.processes import Processes, start_processes, stop_processes
from fuse.reuse import Wanted, plan_reuse, reused_fits
from fuse.schema import (
    CURVES_FILE,
    EVALUATED_SETS,
    PREDICTIONS_FILE,
    RUNS_FILE,
    prediction_rows,
)
from fuse.train import HeadSettings, check_settings
from fuse.zoo import FROZEN_NOTE, ModelSpec, protocol_models, select_models
from pipeline.atomic import atomic_folder
from pipeline.clinical import ClinicalColumns, ClinicalSettings
from pipeline.config import config_to_dict, require_paths, setting
from pipeline.errors import UserError
from pipeline.keys import file_key
from pipeline.lock import output_lock
from pipeline.memory import release_freed_memory
from pipeline.splits import SPLIT_MODES, TrialSplit, labelled_subset, plan_trials

OUTPUT_FILES = (PREDICTIONS_FILE, RUNS_FILE, CURVES_FILE)
UNUSED_SPLIT = "unused"  # a training patient outside a head's label fraction


@dataclass(frozen=True)
class ProtocolConfig(ClinicalSettings, HeadSettings):
    """Inputs, outputs and choices of a protocol run; the head's settings and the clinical
    columns' declaration are inherited."""

    manifest: str = setting("", "manifest CSV/Parquet the features were extracted from")
    features: tuple[str, ...] = setting(
        (),
        "feature files written by `python -m extract` (each names its encoder and modality), "
        "or folders of them: a folder means every *.h5 file inside it",
    )
    out: str = setting("", f"folder for {PREDICTIONS_FILE}, {RUNS_FILE} and {CURVES_FILE}")
    heads: str = setting(
        "",
        "folder for the fitted heads and probes of the models save_models names, every "
        "trial and fold (MODEL/trialT-foldF-head.json + .safetensors); empty: none saved",
    )
    save_models: tuple[str, ...] = setting(
        ("M4",), "models whose fitted heads are saved into heads (the paper's model by default)"
    )
    classes: tuple[str, ...] = setting(
        ("VCD", "GC"), "the two class labels, negative first (the heads are binary)", count=2
    )
    models: tuple[str, ...] = setting(
        ("M4", "M1", "M2", "M3", "CLIP", "ALIGN", "BLIP-2", "ViLT", "Chinese-CLIP"),
        "models to train: M4 (VLMF-Net), ablations M1 image, M2 report, M3 ViT without "
        "Q-Former + report; frozen-feature baselines CLIP, ALIGN, BLIP-2, ViLT, Chinese-CLIP; "
        "M4-clinical (M4 + the clinical columns declared below); M4-exam (M4 on whole exams, "
        "attention over their images)",
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
    label_fractions: tuple[float, ...] = setting(
        (1.0,),
        "shares of each trial's training patients to train on (label efficiency), stratified "
        "by class and nested (a smaller share's patients are in every larger one); "
        "validation and test patients stay those of the trial, and each trial draws its "
        "own patients, so the trials are the draws",
    )
    conditions: bool = setting(
        True,
        "score the test and external pairs of every head with both an image and a report "
        "input again with one input replaced (occlusion: another patient's vector, or the "
        "training mean; swap: a report of the other class) and record each input's "
        "attribution share; the modality analyses of the report read them: "
        + "; ".join(f"{name}: {meaning}" for name, meaning in CONDITIONS.items()),
    )
    reuse: str = setting(
        "",
        "another protocol run's output folder: each head and probe it fitted on the same "
        "data with the same settings, model, trial, fold and share is taken from its tables "
        "instead of fitted again (the label-efficiency run takes its 100% share from the "
        "main protocol); a head saved into heads is always fitted, and a run that searches "
        "learning rates takes nothing; empty: fit everything",
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
    fraction: float = 1.0


def _rows_by_split(split: TrialSplit) -> dict[str, torch.Tensor]:
    values = split.splits.to_numpy()
    return {
        name: torch.from_numpy(np.flatnonzero(values == name))
        for name in ("train", "val", "test", "external")
    }


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


def _training_share(
    data: CachedRows, split: TrialSplit, fraction: float
) -> dict[str, torch.Tensor]:
    """The trial's rows, its training rows cut to `fraction` of its training patients."""
    rows = _rows_by_split(split)
    kept = labelled_subset(data.table, rows["train"].numpy(), fraction, split.seed)
    return {**rows, "train": torch.from_numpy(kept)}


def _attributions(
    head: FittedHead, prepared: list[torch.Tensor], exams: np.ndarray
) -> dict[str, np.ndarray]:
    """Each input modality's attribution share per row, for heads of several modalities."""
    modalities = [modality for _, modality in head.model.inputs]
    if head.clinical_ is not None:
        modalities.append("clinical")  # the head's last input
    if len(set(modalities)) < 2:
        return {}
    shares = head.attribution_shares(prepared, exams)
    return {modality: shares[:, position] for position, modality in enumerate(modalities)}


def _sources(data: CachedRows, model: ModelSpec) -> list[FeatureSource]:
    return [
        FeatureSource.from_provenance(data.provenance[feature], data.features[feature].shape[1])
        for feature in model.inputs
    ]


def _external_sites(data: CachedRows, job: _Job) -> dict[str, torch.Tensor]:
    external = job.rows["external"]
    sites = data.table["site"].to_numpy()[external.numpy()]
    return {site: external[torch.from_numpy(sites == site)] for site in dict.fromkeys(sites)}


def _row_sites(data: CachedRows, job: _Job) -> np.ndarray:
    """Each row's site where the head centres it (external rows), None elsewhere."""
    sites = data.table["site"].to_numpy().astype(object)
    sites[job.split.splits.to_numpy() != "external"] = None
    return sites


def _fit(
    job: _Job, data: CachedRows, kind: str, settings: HeadSettings, config: ProtocolConfig
) -> FittedHead:
    head = FittedHead(
        job.model,
        kind,
        settings,
        config.classes,
        standardise=config.standardise,
        centre_external=config.centre_external,
        origin={
            "trial": job.split.trial,
            "fold": job.split.fold,
            "seed": job.split.seed,
            "fraction": job.fraction,
        },
        clinical=ClinicalColumns.from_settings(config),
    )
    return head.fit(
        [data.features[feature] for feature in job.model.inputs],
        data.labels,
        job.rows["train"],
        job.rows["val"],
        job.split.seed,
        sources=_sources(data, job.model),
        report_groups=data.report_groups,
        external_sites=_external_sites(data, job),
        training_sites=data.table["site"].to_numpy()[job.rows["train"].numpy()].tolist(),
        table=data.table,
        exams=exam_ids(data.table),
    )


def _search_learning_rate(
    job: _Job, data: CachedRows, config: ProtocolConfig
) -> tuple[float, list[dict[str, float]], FittedHead]:
    """Fit `job`'s head once per learning rate; the lowest kept validation loss wins.

    Returns:
        The winning rate, what each rate gave, and the winner's head: the same head the
        trial would fit with that rate (same seed and settings), so it is not refitted.
    """
    tried, heads = [], {}
    for learning_rate in config.learning_rates:
        settings = dataclasses.replace(config, learning_rate=learning_rate)
        head = heads[learning_rate] = _fit(job, data, "head", settings, config)
        kept = head.history_[head.training_["best_epoch"] - 1]
        tried.append(
            {
                "learning_rate": learning_rate,
                "val_loss": kept["val_loss"],
                "val_auc": kept["val_auc"],
                "best_epoch": head.training_["best_epoch"],
                "fallback": head.training_["fallback_to_last_epoch"],
            }
        )
    eligible = [entry for entry in tried if not entry["fallback"]] or tried
    winner = min(eligible, key=lambda entry: entry["val_loss"])["learning_rate"]
    return winner, tried, heads[winner]


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
                "device_type": provenance.get("device_type"),
                "package_versions": provenance.get("package_versions"),  # of the extraction
            }
            for (encoder, modality), provenance in data.provenance.items()
        },
        "notes": list(data.notes),  # pairs left out, rows matched by image path only
    }


def head_path(
    folder: str | Path, model: str, kind: str, trial: int, fold: int, fraction: float = 1.0
) -> Path:
    """Where the protocol saves one head: FOLDER/MODEL/trialT-foldF-KIND(.json|.safetensors),
    with -fractionS before KIND when trained on a share S < 1 of the training patients."""
    share = f"-fraction{fraction:g}" if fraction < 1 else ""
    return Path(folder) / model / f"trial{trial}-fold{fold}{share}-{kind}"


def _record(job: _Job, head: FittedHead, seconds: float, training_patients: int) -> dict[str, Any]:
    training = {
        "learning_rate": None,
        "best_epoch": None,
        "first_eligible_epoch": None,
        "epochs_trained": None,
        "fallback_to_last_epoch": None,
        **head.training_,
    }
    if head.kind == "head":
        training["learning_rate"] = head.settings.learning_rate
    return {
        "model": job.model.name,
        "head": head.kind,
        "trial": job.split.trial,
        "fold": job.split.fold,
        "seed": job.split.seed,
        "fraction": job.fraction,
        "training_patients": training_patients,
        **training,
        "threshold": head.threshold_,
        "seconds": round(seconds, 3),
    }


def run(config: ProtocolConfig) -> dict[str, Any] | None:
    """Fit and apply every requested model's head (and probe) on every trial; write the
    predictions table, and save the heads of the models `save_models` names.

    Under torchrun or accelerate launch each process fits its share of the jobs and the
    main one writes everything, equal to what one process writes (fuse.processes).

    Returns:
        The run records written to runs.json (None on the processes that do not write).
    """
    require_paths(config, "manifest", "features", "out")
    try:
        check_settings(config)
    except ValueError as error:
        raise UserError(str(error)) from None
    for fraction in config.label_fractions or (0.0,):
        if not 0 < fraction <= 1:  # before any data is read
            raise UserError(f"label fraction {fraction}: give a share of patients in (0, 1]")
    models = select_models(
        protocol_models(config.image_encoder, config.text_encoder, config.vit_encoder),
        config.models,
    )
    clinical = ClinicalColumns.from_settings(config)
    takes_clinical = [model.name for model in models if model.clinical]
    if takes_clinical and not clinical.columns:
        raise UserError(
            f"model(s) {', '.join(takes_clinical)} take clinical variables, but none are "
            "declared: name manifest columns with clinical_numeric and/or "
            "clinical_categorical, or leave the model(s) out"
        )
    unknown = sorted(set(config.save_models) - {model.name for model in models})
    if config.heads and unknown:
        raise UserError(
            f"save_models {unknown} are not among the models trained ({list(config.models)})"
        )
    processes = start_processes()
    try:
        if not processes.main:
            _fit_share(config, models, processes)
            return None
        out = Path(config.out)
        with ExitStack() as outputs:
            outputs.enter_context(output_lock(out, config.wait_for_lock))
            staging = outputs.enter_context(atomic_folder(out, owned=OUTPUT_FILES))
            heads = None
            if config.heads:
                outputs.enter_context(output_lock(Path(config.heads), config.wait_for_lock))
                heads = outputs.enter_context(
                    atomic_folder(Path(config.heads), owned=tuple(protocol_models("", "", "")))
                )
            return _write(config, models, _fit_share(config, models, processes), staging, heads)
    finally:
        stop_processes(processes)


@dataclass
class _Fitted:
    """One job's head or probe, as the table and runs.json take it."""

    job: int
    kind: str
    record: dict[str, Any]
    frames: list[pd.DataFrame]
    curve: pd.DataFrame | None
    saved: FittedHead | None  # kept for --heads (models in save_models only)


@dataclass
class _Share:
    """What one process fitted, and the data every process read alike."""

    fitted: list[_Fitted]
    searches: dict[str, list]
    # The main process's, for runs.json; not sent between processes.
    data: CachedRows | None = None
    identity: dict[str, Any] | None = None


def _plan_jobs(config: ProtocolConfig, models: list[ModelSpec], data: CachedRows) -> list[_Job]:
    plan = plan_trials(
        data.table, config.split, config.trials, config.folds, config.split_fractions, config.seed
    )
    for split in plan:
        check_split_classes(
            _rows_by_split(split), data.labels, f"trial {split.trial}", config.classes
        )
    # Largest share first, so a learning-rate search runs on a model's full training set.
    fractions = sorted(set(config.label_fractions), reverse=True)
    return [
        _Job(model, split, _training_share(data, split, fraction), fraction)
        for model in models
        for split in plan
        for fraction in fractions
    ]


def _head_weights(model: ModelSpec, data: CachedRows, config: ProtocolConfig) -> int:
    """How many weights `model`'s head has on these features (a step reads and writes each
    several times): counted on a network built on the meta device, which allocates none."""
    head = FittedHead(model, "head", config, config.classes)
    with torch.device("meta"):
        network = head.network_for([data.features[name].shape[1] for name in model.inputs])
    return sum(weight.numel() for weight in network.parameters())


def _fit_share(
    config: ProtocolConfig, models: list[ModelSpec], processes: Processes
) -> list[_Share] | None:
    """Fit this process's share of the jobs; on the main process, every process's share."""
    data = load_cached_rows(
        config.manifest,
        config.features,
        [feature for model in models for feature in model.inputs],
        config.classes,
        expect_weights=config.expect_weights,
        expect_dtype=config.expect_dtype,
        image_root=config.image_root or None,
        labels_per_exam=config.labels_per_exam,
        clinical=ClinicalColumns.from_settings(config)
        if any(model.clinical for model in models)
        else None,
    )
    jobs = _plan_jobs(config, models, data)
    kinds = ("head", "probe") if config.probes else ("head",)
    identity = _data_identity(config, data) if processes.main or config.reuse else None
    taken = _plan_reuse(config, jobs, kinds, identity, processes.main) if config.reuse else {}
    pending = [
        (index, job)
        for index, job in enumerate(jobs)
        if any((index, kind) not in taken for kind in kinds)
    ]
    # Largest first: the run ends when its last job does, and a large head taken last
    # keeps the other processes idle while it trains (on the demo, about 20 s of 500 on
    # two processes). Which process fits a job, and when, does not change its result.
    # A job's cost is taken as its head's weights times its share of the training patients
    # (the epochs are not known before); a model's trials tie, so its first job, where a
    # learning-rate search runs, stays its first.
    weights = {model.name: _head_weights(model, data, config) for model in models}
    pending.sort(key=lambda item: item[1].fraction * weights[item[1].model.name], reverse=True)
    fitted: list[_Fitted] = []
    learning_rate_of: dict[str, float] = {}
    searches: dict[str, list] = {}
    first_job_of: dict[str, int] = {}
    for index, job in enumerate(jobs):
        first_job_of.setdefault(job.model.name, index)
    exams = exam_ids(data.table)
    progress = tqdm(total=len(pending), desc=f"protocol{processes.describe()}", unit="job")
    for _, (index, job) in processes.claim(pending, progress):
        name = job.model.name
        searched = None
        if name not in learning_rate_of:
            if len(config.learning_rates) > 1:
                # Every process searches on the model's first job, so each uses the rate
                # one process would; the winner's head is that job's head.
                learning_rate_of[name], searches[name], searched = _search_learning_rate(
                    jobs[first_job_of[name]], data, config
                )
                if index != first_job_of[name]:
                    searched = None
            else:
                learning_rate_of[name] = (config.learning_rates or (config.learning_rate,))[0]
        for kind in kinds:
            if (index, kind) in taken:
                continue
            started = time.perf_counter()
            head = searched if kind == "head" else None
            if head is None:
                settings = dataclasses.replace(config, learning_rate=learning_rate_of[name])
                head = _fit(job, data, kind, settings, config)
            fitted.append(_applied(job, index, kind, head, data, exams, config, started))
            del head
            release_freed_memory()  # a head's copies of the inputs, before the next one
    progress.close()
    gathered = processes.gather(_Share(fitted, searches))
    if gathered is None:
        return None
    gathered[0].data, gathered[0].identity = data, identity
    for (index, kind), fit in reused_fits(
        config.reuse, taken, config.classes, config.conditions
    ).items():
        gathered[0].fitted.append(_Fitted(index, kind, fit.record, fit.frames, fit.curve, None))
    return gathered


def _plan_reuse(
    config: ProtocolConfig,
    jobs: list[_Job],
    kinds: tuple[str, ...],
    identity: dict[str, Any],
    say: bool,
) -> dict[tuple[int, str], dict[str, Any]]:
    """The fits config.reuse's run already made (fuse.reuse), by (job, kind); a head this
    run saves is fitted here, as the saved file needs the head itself. `say`: print what
    is taken and why the rest is not (the main process; every process plans the same)."""
    saved = set(config.save_models) if config.heads else set()
    wanted = [
        Wanted(
            index, kind, job.model, job.split.trial, job.split.fold, job.split.seed, job.fraction
        )
        for index, job in enumerate(jobs)
        if job.model.name not in saved
        for kind in kinds
    ]
    taken, reasons = plan_reuse(
        config.reuse, config_to_dict(config), identity, wanted, config.conditions
    )
    if say:
        for reason in reasons:
            tqdm.write(reason, file=sys.stderr)
        tqdm.write(
            f"taken from {config.reuse}: {len(taken)} of {len(wanted)} fits "
            "(same data, settings, model, trial, fold and share); the rest are fitted here",
            file=sys.stderr,
        )
    return taken


def _applied(
    job: _Job,
    index: int,
    kind: str,
    head: FittedHead,
    data: CachedRows,
    exams: np.ndarray,
    config: ProtocolConfig,
    started: float,
) -> _Fitted:
    """`head` (already fitted on `job`) applied to every row, and its record."""
    name = job.model.name
    raw = [data.features[feature] for feature in job.model.inputs]
    splits = job.split.splits.to_numpy().copy()
    # Training patients left out of this job's share are not its training rows.
    training = np.zeros(len(splits), dtype=bool)
    training[job.rows["train"].numpy()] = True
    splits[(splits == "train") & ~training] = UNUSED_SPLIT
    prepared = head.prepared(raw, _row_sites(data, job), table=data.table)
    probabilities, attention = head.scores_of_prepared(prepared, exams)
    record = _record(
        job, head, time.perf_counter() - started, len(data.patients(job.rows["train"]))
    )
    if record["fallback_to_last_epoch"]:
        tqdm.write(
            f"warning: {head.describe()}: no epoch after warm-up predicted both classes "
            "on validation; its last epoch was kept (see the report's Training table)",
            file=sys.stderr,
        )
    row_of = {
        "model": name,
        "head": kind,
        "trial": job.split.trial,
        "fold": job.split.fold,
        "threshold": head.threshold_,
        "classes": config.classes,
        "fraction": job.fraction,
    }
    frames = [
        prediction_rows(
            data.table,
            splits,
            probabilities=probabilities,
            attributions=_attributions(head, prepared, exams),
            attention=attention,
            **row_of,
        )
    ]
    if config.conditions:
        for condition in score_conditions(
            head,
            prepared,
            {split: job.rows[split].numpy() for split in EVALUATED_SETS},
            data.table["patient_id"].to_numpy(),
            data.labels.numpy(),
            job.split.seed,
            exams,
        ):
            frames.append(
                prediction_rows(
                    data.table.iloc[condition.rows],
                    splits[condition.rows],
                    probabilities=condition.probabilities,
                    condition=condition.name,
                    source_rows=condition.source_rows,
                    **row_of,
                )
            )
    curve = None
    if kind == "head":
        curve = pd.DataFrame(head.history_).assign(
            model=name, trial=job.split.trial, fold=job.split.fold, fraction=job.fraction
        )
    saved = head if config.heads and name in config.save_models else None
    return _Fitted(index, kind, record, frames, curve, saved)


def _write(
    config: ProtocolConfig,
    models: list[ModelSpec],
    shares: list[_Share],
    out: Path,
    heads: Path | None,
) -> dict[str, Any]:
    """The predictions table, curves, runs.json and saved heads, in job order: the same
    files whichever process fitted which job."""
    kinds = ("head", "probe")
    fitted = sorted(
        (item for share in shares for item in share.fitted),
        key=lambda item: (item.job, kinds.index(item.kind)),
    )
    searches: dict[str, list] = {}
    for share in shares:
        searches.update(share.searches)
    for item in fitted:
        if heads and item.saved is not None:
            split = item.saved.origin
            item.saved.save(
                head_path(
                    heads,
                    item.record["model"],
                    item.kind,
                    split["trial"],
                    split["fold"],
                    split["fraction"],
                )
            )
    predictions = pd.concat([frame for item in fitted for frame in item.frames], ignore_index=True)
    predictions.to_parquet(out / PREDICTIONS_FILE, index=False)
    pd.concat([item.curve for item in fitted if item.curve is not None], ignore_index=True).to_csv(
        out / CURVES_FILE, index=False
    )
    result = {
        "note": FROZEN_NOTE,
        "settings": config_to_dict(config),
        "models": {model.name: dataclasses.asdict(model) for model in models},
        "learning_rate_search": {
            model.name: searches[model.name] for model in models if model.name in searches
        },
        "data": shares[0].identity,
        "runs": [item.record for item in fitted],
    }
    (out / RUNS_FILE).write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return result
