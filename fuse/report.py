"""`python -m fuse report`: the paper's tables, ROC curves and training curves from the
predictions table, with no training.

Writes tables.md (laid out like the paper's Tables 2, 3 and 4) with tables.json beside it,
roc_internal.png and roc_external.png (every model on one plot per set),
training_curves.png, and one small JSON per model under metrics/ for `dvc metrics show`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no global state, no display needed

from fuse.evaluate import OPERATING_POINTS, REFERENCE_MODEL, evaluate
from fuse.schema import CURVES_FILE, PREDICTIONS_FILE, RUNS_FILE
from fuse.zoo import FROZEN_NOTE
from pipeline.config import require_paths, setting
from pipeline.errors import UserError
from pipeline.metrics import roc_auc, roc_points
from pipeline.stats import format_mean_sd

SET_TITLES = {"test": "internal test set", "external": "external test set"}
PLOT_FILES = {"test": "roc_internal.png", "external": "roc_external.png"}
TABLE_METRICS = ("accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity")
DVC_METRICS = ("auc", "accuracy")


@dataclass(frozen=True)
class ReportConfig:
    """Where the protocol's outputs are and where the report goes."""

    protocol: str = setting("", f"folder holding {PREDICTIONS_FILE} and {RUNS_FILE}")
    out: str = setting("", "folder for tables.md, tables.json, the plots and metrics/")
    bootstrap_resamples: int = setting(
        1000, "patient-bootstrap resamples for the 95% CIs", at_least=1
    )
    seed: int = setting(0, "seed of the bootstrap")
    wait_for_lock: float = setting(
        0,
        "seconds to wait while another run writes the same --out (0: refuse at once)",
        at_least=0,
    )


def _json_safe(value: Any) -> Any:
    # JSON has no NaN (an AUC on a one-class set); null is what DVC and browsers read.
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(_json_safe(value), indent=2, ensure_ascii=False) + "\n", "utf-8")


def _p(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _cell(summary: pd.DataFrame, model: str, head: str, split: str, metric: str) -> str:
    found = summary[
        (summary["model"] == model)
        & (summary["head"] == head)
        & (summary["set"] == split)
        & (summary["metric"] == metric)
    ]
    if found.empty:
        return "–"
    return format_mean_sd(float(found["mean"].iloc[0]), float(found["sd"].iloc[0]))


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _results_table(
    tables: Mapping[str, pd.DataFrame], models: Sequence[str], split: str, point: str, classes
) -> list[str]:
    summary, ci, compared = tables["summary"], tables["ci"], tables["comparisons"]
    metrics = [*TABLE_METRICS[:5], *(f"recall_{name}" for name in classes), *TABLE_METRICS[5:]]
    header = ["model", *metrics, "AUC 95% CI", f"p DeLong vs {REFERENCE_MODEL}", "p trials"]
    rows = []
    for model in models:
        auc_ci = ci[(ci["model"] == model) & (ci["head"] == "head") & (ci["set"] == split)]
        auc_ci = auc_ci[auc_ci["metric"] == "auc"]
        against = compared[(compared["model"] == model) & (compared["set"] == split)]
        rows.append(
            [
                model,
                *(_cell(summary, model, "head", split, f"{metric}@{point}") for metric in metrics),
                f"{auc_ci['low'].iloc[0]:.3f}–{auc_ci['high'].iloc[0]:.3f}" if len(auc_ci) else "–",
                _p(against["delong_p"].iloc[0]) if len(against) else "–",
                _p(against["paired_t_p"].iloc[0]) if len(against) else "–",
            ]
        )
    return _markdown_table(header, rows)


def _probe_table(summary: pd.DataFrame, models: Sequence[str], sets: Sequence[str]) -> list[str]:
    header = ["model"]
    for split in sets:
        header += [f"head AUC ({split})", f"probe AUC ({split})"]
    rows = [
        [model]
        + [
            _cell(summary, model, head, split, "auc@0.5")
            for split in sets
            for head in ("head", "probe")
        ]
        for model in models
    ]
    return _markdown_table(header, rows)


def _markdown(tables: Mapping[str, pd.DataFrame], runs: Mapping[str, Any], classes) -> str:
    settings = runs["settings"]
    models = list(runs["models"])
    roles = {name: spec["role"] for name, spec in runs["models"].items()}
    sets = [split for split in SET_TITLES if split in set(tables["summary"]["set"])]
    baselines = [m for m in models if roles[m] == "baseline"] + [
        m for m in models if roles[m] == "proposed"
    ]
    ablation = sorted(m for m in models if roles[m] in ("ablation", "proposed"))
    trials = tables["per_trial"]["trial"].nunique()
    lines = [
        "# Results",
        "",
        f"{FROZEN_NOTE} Every number is the mean (SD) over {trials} trial(s) "
        f"(split mode {settings['split']}, first seed {settings['seed']}); "
        "CIs are 95% patient-bootstrap intervals of the trial-averaged scores; DeLong compares "
        f"patient-level scores with {REFERENCE_MODEL} on the same patients; 'p trials' is a "
        "paired t-test over the trials' AUCs. Metrics use the 0.5 cut unless the table says "
        "otherwise."
        + (
            " External rows are centred per site on the training rows' mean (their own "
            "vectors, no labels; centre_external)."
            if settings.get("centre_external") and "external" in sets
            else ""
        ),
        "",
    ]
    numbered = [
        ("Table 2", "test", baselines),
        ("Table 3", "external", baselines),
        ("Table 4", "test", ablation),
    ]
    for title, split, chosen in numbered:
        if split not in sets or not chosen:
            continue
        kind = "ablation" if title == "Table 4" else "baselines"
        lines += [f"## {title}: {kind}, {SET_TITLES[split]}", ""]
        lines += _results_table(tables, chosen, split, "0.5", classes) + [""]
    for split in sets:
        lines += [
            f"## All models at the validation-chosen threshold, {SET_TITLES[split]}",
            "",
            f"{OPERATING_POINTS['val']}.",
            "",
        ]
        lines += _results_table(tables, models, split, "val", classes) + [""]
    if (tables["summary"]["head"] == "probe").any():
        lines += ["## Heads beside logistic-regression probes on the same vectors", ""]
        lines += _probe_table(tables["summary"], models, sets) + [""]
    kept = pd.DataFrame(runs["runs"])
    kept = kept[kept["head"] == "head"]
    lines += [
        "## Training",
        "",
        f"Selection: {settings['selection']} after "
        f"{settings['warmup_epochs']} warm-up epochs, of {settings['epochs']}.",
        "",
    ]
    per_trial = tables["per_trial"]
    one_class = per_trial[(per_trial["head"] == "head") & (per_trial["predicted_classes@0.5"] < 2)]
    one_class_sets = [split for split in SET_TITLES if split in sets]
    lines += _markdown_table(
        [
            "model",
            "learning rate",
            "kept epochs",
            "heads that fell back to the last epoch",
            *(
                f"trials with one class for every {split} pair (0.5 cut)"
                for split in one_class_sets
            ),
        ],
        [
            [
                model,
                f"{rows['learning_rate'].iloc[0]:g}",
                ", ".join(str(int(epoch)) for epoch in rows["best_epoch"]),
                str(int(rows["fallback_to_last_epoch"].sum())),
                *(
                    str(int(((one_class["model"] == model) & (one_class["set"] == split)).sum()))
                    for split in one_class_sets
                ),
            ]
            for model, rows in kept.groupby("model", sort=False)
        ],
    )
    return "\n".join(lines) + "\n"


def _plot_roc(averaged: pd.DataFrame, split: str, path: Path, classes) -> None:
    figure = Figure(figsize=(6.4, 5.6), layout="tight")
    axis = figure.subplots()
    rows_of_set = averaged[(averaged["split"] == split) & (averaged["head"] == "head")]
    for model, rows in rows_of_set.groupby("model", sort=False):
        labels = (rows["label"] == classes[-1]).to_numpy(dtype=int)
        scores = rows["score"].to_numpy()
        false_positive_rate, true_positive_rate = roc_points(labels, scores)
        width = 2.4 if model == REFERENCE_MODEL else 1.2
        axis.plot(
            false_positive_rate,
            true_positive_rate,
            linewidth=width,
            label=f"{model} (AUC {roc_auc(labels, scores):.3f})",
        )
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    axis.set(
        title=f"ROC, {SET_TITLES[split]} (scores averaged over trials)",
        xlabel="false positive rate (1 - specificity)",
        ylabel="true positive rate (sensitivity)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axis.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=120)


def _plot_training(curves: pd.DataFrame, path: Path) -> None:
    models = list(dict.fromkeys(curves["model"]))
    figure = Figure(figsize=(10, 4.2), layout="tight")
    loss_axis, auc_axis = figure.subplots(1, 2)
    for model in models:
        mean = (
            curves[curves["model"] == model]
            .groupby("epoch")[["train_loss", "val_loss", "val_auc"]]
            .mean()
        )
        (line,) = loss_axis.plot(mean.index, mean["val_loss"], label=f"{model} val")
        loss_axis.plot(
            mean.index, mean["train_loss"], linestyle="--", color=line.get_color(), linewidth=0.8
        )
        auc_axis.plot(mean.index, mean["val_auc"], color=line.get_color(), label=model)
    loss_axis.set(title="loss (dashed: train), mean over trials", xlabel="epoch", ylabel="loss")
    auc_axis.set(title="validation AUC, mean over trials", xlabel="epoch", ylabel="AUC")
    loss_axis.legend(fontsize="small", ncols=2)
    figure.savefig(path, dpi=110)


def _write_dvc_metrics(folder: Path, summary: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.json"):
        stale.unlink()
    heads = summary[summary["head"] == "head"]
    for model, rows in heads.groupby("model", sort=False):
        values = {
            f"{split}_{metric}": float(found["mean"].iloc[0])
            for split in SET_TITLES
            for metric in DVC_METRICS
            if len(found := rows[(rows["set"] == split) & (rows["metric"] == f"{metric}@0.5")])
        }
        _write_json(folder / f"{model}.json", values)


def run(config: ReportConfig) -> dict[str, pd.DataFrame]:
    """Compute every table from the protocol's predictions and write the report."""
    require_paths(config, "protocol", "out")
    protocol = Path(config.protocol)
    if not (protocol / PREDICTIONS_FILE).is_file():
        raise UserError(
            f"{protocol / PREDICTIONS_FILE} does not exist; run `python -m fuse protocol` first"
        )
    predictions = pd.read_parquet(protocol / PREDICTIONS_FILE)
    runs = json.loads((protocol / RUNS_FILE).read_text(encoding="utf-8"))
    classes = tuple(runs["settings"]["classes"])
    tables = evaluate(predictions, classes, config.bootstrap_resamples, config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(_markdown(tables, runs, classes), encoding="utf-8")
    _write_json(
        out / "tables.json",
        {
            "note": FROZEN_NOTE,
            "settings": runs["settings"],
            "data": runs["data"],
            **{
                name: table.to_dict(orient="records")
                for name, table in tables.items()
                if name != "averaged"
            },
        },
    )
    for split in SET_TITLES:
        if (tables["averaged"]["split"] == split).any():
            _plot_roc(tables["averaged"], split, out / PLOT_FILES[split], classes)
    _plot_training(pd.read_csv(protocol / CURVES_FILE), out / "training_curves.png")
    _write_dvc_metrics(out / "metrics", tables["summary"])
    return tables
