"""`python -m fuse report`: the paper's tables, ROC curves, training curves and every
analysis of fuse.analyses from the predictions table, with no training.

Writes tables.md (laid out like the paper's Tables 2, 3 and 4, then one section per
analysis) with tables.json beside it, roc_internal.png and roc_external.png (every model on
one plot per set), training_curves.png, one small JSON per model under metrics/ for
`dvc metrics show`, one CSV per analysis table under analyses/ and one PNG per analysis
figure under plots/ (<analysis>_<name>.csv, <analysis>_<name>.png).
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

from fuse.analyses import ANALYSES, AnalysisInputs, AnalysisResult, AnalysisSettings
from fuse.analyses.base import SET_TITLES, trial_counts
from fuse.analyses.calibration import CALIBRATORS
from fuse.evaluate import OPERATING_POINTS, REFERENCE_MODEL, evaluate
from fuse.schema import (
    CONDITION_COLUMN,
    OBSERVED,
    PREDICTIONS_FILE,
    RUNS_FILE,
    classes_of,
    read_curves,
    read_predictions,
    read_runs,
)
from fuse.zoo import EXAM_HEAD, FROZEN_NOTE
from pipeline.atomic import staged_entries
from pipeline.config import config_to_dict, require_paths, setting
from pipeline.errors import UserError
from pipeline.lock import output_lock
from pipeline.metrics import roc_auc, roc_points
from pipeline.stats import format_mean_sd

PLOT_FILES = {"test": "roc_internal.png", "external": "roc_external.png"}
TABLE_METRICS = ("accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity")
DVC_METRICS = ("auc", "accuracy")
ANALYSES_FOLDER = "analyses"  # one CSV per analysis table
FIGURES_FOLDER = "plots"  # one PNG per analysis figure (a dvc plots folder)


@dataclass(frozen=True)
class ReportConfig:
    """Where the protocol's outputs are and where the report goes."""

    protocol: str = setting("", f"folder holding {PREDICTIONS_FILE} and {RUNS_FILE}")
    out: str = setting("", "folder for tables.md, tables.json, the plots and metrics/")
    label_efficiency: str = setting(
        "",
        "protocol folder of a run over label_fractions (under DVC: reports/label_efficiency), "
        "for the label-efficiency curves; empty: that analysis is not run",
    )
    # no per-cent sign in help texts: argparse expands them and --help would crash
    bootstrap_resamples: int = setting(
        1000, "patient-bootstrap resamples of the 95 percent CIs", at_least=1
    )
    seed: int = setting(0, "seed of the bootstrap")
    target_sensitivity: float = setting(
        AnalysisSettings.target_sensitivity,
        "operating point: highest cut with at least this sensitivity on validation",
    )
    target_specificity: float = setting(
        AnalysisSettings.target_specificity,
        "operating point: lowest cut with at least this specificity on validation",
    )
    calibration: str = setting(
        AnalysisSettings.calibration,
        "recalibration fitted on each head's validation rows",
        choices=tuple(CALIBRATORS),
    )
    calibration_bins: int = setting(
        AnalysisSettings.calibration_bins, "equal-width probability bins of the ECE and diagrams"
    )
    decision_thresholds: tuple[float, ...] = setting(
        AnalysisSettings.decision_thresholds, "threshold probabilities of the decision-curve table"
    )
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
    if value is pd.NA:  # a missing count in a nullable integer column
        return None
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
) -> tuple[list[str], list[list[str]]]:
    summary, ci, tested = tables["summary"], tables["ci"], tables["trial_tests"]
    metrics = [*TABLE_METRICS[:5], *(f"recall_{name}" for name in classes), *TABLE_METRICS[5:]]
    header = [
        "model",
        "trials",
        *metrics,
        "AUC 95% CI",
        f"p vs {REFERENCE_MODEL} (paired t, per-trial image AUCs)",
    ]
    rows = []
    for model in models:
        chosen = (summary["model"] == model) & (summary["head"] == "head")
        trials = summary.loc[chosen & (summary["set"] == split), "trials"]
        auc_ci = ci[(ci["model"] == model) & (ci["head"] == "head") & (ci["set"] == split)]
        auc_ci = auc_ci[auc_ci["metric"] == "auc"]
        against = tested[
            (tested["model"] == model) & (tested["set"] == split) & (tested["head"] == "head")
        ]
        rows.append(
            [
                model,
                str(int(trials.iloc[0])) if len(trials) else "–",
                *(_cell(summary, model, "head", split, f"{metric}@{point}") for metric in metrics),
                f"{auc_ci['low'].iloc[0]:.3f}–{auc_ci['high'].iloc[0]:.3f}" if len(auc_ci) else "–",
                _p(against["paired_t_p"].iloc[0]) if len(against) else "–",
            ]
        )
    return header, rows


def _probe_table(
    summary: pd.DataFrame, models: Sequence[str], sets: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
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
    return header, rows


def format_value(column: str, value: Any) -> str:
    """A table cell as the report prints it: floats to 3 decimals, p-values as `_p`, "–"
    for missing."""
    if value is pd.NA or value is None:
        return "–"
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "–"
        if column == "p_value" or column.endswith("_p"):
            return _p(float(value))
        return f"{value:.3f}"
    return str(value)


def frame_markdown(frame: pd.DataFrame) -> list[str]:
    """A table as markdown lines: floats to 3 decimals, p-values as the tables print them,
    NaN as "–"."""
    return _markdown_table(
        [str(column) for column in frame.columns],
        [
            [format_value(str(column), value) for column, value in row.items()]
            for _, row in frame.iterrows()
        ],
    )


def _analysis_markdown(name: str, result: AnalysisResult) -> list[str]:
    lines = [f"## {result.title}", "", *(f"{note}\n" for note in result.notes)]
    shown = result.shown if result.shown is not None else tuple(result.tables)
    for table in shown:
        lines += [f"{name}: {table} ({ANALYSES_FOLDER}/{name}_{table}.csv)", ""]
        lines += frame_markdown(result.tables[table]) + [""]
    for figure in result.figures:
        lines += [f"![{name} {figure}]({FIGURES_FOLDER}/{name}_{figure}.png)", ""]
    return lines


@dataclass(frozen=True)
class ResultsTable:
    """One of the report's main tables: its heading, a sentence under it, header and cells."""

    title: str
    note: str
    header: list[str]
    rows: list[list[str]]


def results_preamble(tables: Mapping[str, pd.DataFrame], runs: Mapping[str, Any]) -> str:
    """What every number of the main tables is: trials, split mode, level, CIs, tests.

    Args:
        tables: the evaluation's tables ("summary" and "pooled" are read).
        runs: the protocol's run records.
    """
    settings = runs["settings"]
    sets = set(tables["summary"]["set"])
    return (
        f"{FROZEN_NOTE} Every number is the mean (SD) over the trials of its model, counted "
        f"from the predictions table (trained heads: {trial_counts(tables['pooled'])}; each "
        "table's 'trials' column gives its own), split mode "
        f"{settings['split']}, first seed {settings['seed']}. Tables 2-4 are at image level: "
        "CIs are 95% patient-bootstrap intervals of the trial-averaged image scores, and their "
        f"p-value is a paired t-test of the per-trial image AUCs against {REFERENCE_MODEL}, "
        "the values the AUC column averages; exam- and patient-level numbers and their own "
        "tests are in the sections after them. Metrics use the 0.5 cut unless the table says "
        "otherwise."
        + (
            " External rows are centred per site on the training rows' mean (their own "
            "vectors, no labels; centre_external)."
            if settings.get("centre_external") and "external" in sets
            else ""
        )
        + _exam_level_note(runs)
    )


def _exam_level_note(runs: Mapping[str, Any]) -> str:
    """What the image-level rows of exam-level models are, when the run has any."""
    exam_models = [name for name, spec in runs["models"].items() if spec.get("head") == EXAM_HEAD]
    if not exam_models:
        return ""
    return (
        f" Exam-level models ({', '.join(exam_models)}) score whole exams: every image row "
        "repeats its exam's probability, so their image-level numbers weight each exam by its "
        "image count; their comparable level is the exam level (section 'Image, exam and "
        "patient level'). Their probe is a logistic regression on each exam's mean vectors, "
        "and the table's attention column holds each image's weight in its exam."
    )


def results_tables(
    tables: Mapping[str, pd.DataFrame], runs: Mapping[str, Any], classes
) -> list[ResultsTable]:
    """The paper's Tables 2-4, every model at the validation-chosen cut, heads beside probes.

    Args:
        tables: the evaluation's tables ("summary", "ci" and "trial_tests" are read).
        runs: the protocol's run records (its models and their roles).
        classes: class names, negative first.
    """
    models = list(runs["models"])
    roles = {name: spec["role"] for name, spec in runs["models"].items()}
    sets = [split for split in SET_TITLES if split in set(tables["summary"]["set"])]
    baselines = [m for m in models if roles[m] == "baseline"] + [
        m for m in models if roles[m] == "proposed"
    ]
    ablation = sorted(m for m in models if roles[m] in ("ablation", "proposed"))
    found = []
    numbered = [
        ("Table 2", "test", baselines),
        ("Table 3", "external", baselines),
        ("Table 4", "test", ablation),
    ]
    for title, split, chosen in numbered:
        if split not in sets or not chosen:
            continue
        kind = "ablation" if title == "Table 4" else "baselines"
        found.append(
            ResultsTable(
                f"{title}: {kind}, {SET_TITLES[split]} (image level)",
                "",
                *_results_table(tables, chosen, split, "0.5", classes),
            )
        )
    for split in sets:
        found.append(
            ResultsTable(
                f"All models at the validation-chosen threshold, {SET_TITLES[split]} (image level)",
                f"{OPERATING_POINTS['val']}.",
                *_results_table(tables, models, split, "val", classes),
            )
        )
    if (tables["summary"]["head"] == "probe").any():
        found.append(
            ResultsTable(
                "Heads beside logistic-regression probes on the same vectors",
                "",
                *_probe_table(tables["summary"], models, sets),
            )
        )
    return found


def _markdown(
    tables: Mapping[str, pd.DataFrame],
    results: Mapping[str, AnalysisResult],
    not_run: Mapping[str, str],
    runs: Mapping[str, Any],
    classes,
) -> str:
    lines = [
        "# Results",
        "",
        results_preamble(tables, runs),
        "",
        "Analyses run: " + ", ".join(results) + ".",
        "",
        *(f"- {name}: {reason}" for name, reason in not_run.items()),
        *([""] if not_run else []),
    ]
    for table in results_tables(tables, runs, classes):
        lines += [f"## {table.title}", ""]
        lines += [table.note, ""] if table.note else []
        lines += _markdown_table(table.header, table.rows) + [""]
    for name, result in results.items():
        lines += _analysis_markdown(name, result)
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


def _write_analyses(out: Path, results: Mapping[str, AnalysisResult]) -> None:
    tables, figures = out / ANALYSES_FOLDER, out / FIGURES_FOLDER
    for folder, suffix in ((tables, "csv"), (figures, "png")):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"*.{suffix}"):
            stale.unlink()
    for name, result in results.items():
        for table, frame in result.tables.items():
            frame.to_csv(tables / f"{name}_{table}.csv", index=False)
        for figure_name, figure in result.figures.items():
            figure.savefig(figures / f"{name}_{figure_name}.png", dpi=110)


def _analysis_settings(config: ReportConfig) -> AnalysisSettings:
    if config.calibration not in CALIBRATORS:
        raise UserError(
            f"calibration {config.calibration!r} is not one of {list(CALIBRATORS)}; "
            "set fuse_report.calibration in params.yaml or --calibration"
        )
    return AnalysisSettings(
        resamples=config.bootstrap_resamples,
        seed=config.seed,
        target_sensitivity=config.target_sensitivity,
        target_specificity=config.target_specificity,
        calibration=config.calibration,
        calibration_bins=config.calibration_bins,
        decision_thresholds=tuple(config.decision_thresholds),
    )


def run(config: ReportConfig) -> dict[str, pd.DataFrame]:
    """Compute every table from the protocol's predictions, run every analysis, write it all.

    Returns:
        The evaluation's tables by name, and each analysis table as "<analysis>.<table>".
    """
    require_paths(config, "protocol", "out")
    settings = _analysis_settings(config)
    protocol = Path(config.protocol)
    runs = read_runs(protocol)
    classes = classes_of(runs)
    every_row = read_predictions(protocol, classes, conditions=True)
    observed = every_row[CONDITION_COLUMN] == OBSERVED
    predictions = every_row[observed].reset_index(drop=True)
    tables = evaluate(predictions, classes, config.bootstrap_resamples, config.seed)
    inputs = AnalysisInputs(
        predictions,
        runs,
        classes,
        settings,
        conditions=every_row[~observed].reset_index(drop=True),
        label_efficiency=(
            read_predictions(config.label_efficiency, classes) if config.label_efficiency else None
        ),
    )
    every_result = {name: analyse(inputs) for name, analyse in ANALYSES.items()}
    # An analysis with nothing to analyse (no label-efficiency run, ...) says why instead.
    results = {name: result for name, result in every_result.items() if result.tables}
    not_run = {
        name: " ".join(result.notes) for name, result in every_result.items() if not result.tables
    }
    curves = read_curves(protocol)
    out = Path(config.out)
    # The report shares reports/ with the protocol's folder: each file it writes is moved
    # in whole, under its own lock.
    with output_lock(out, config.wait_for_lock), staged_entries(out) as staging:
        (staging / "tables.md").write_text(
            _markdown(tables, results, not_run, runs, classes), encoding="utf-8"
        )
        _write_json(
            staging / "tables.json",
            {
                "note": FROZEN_NOTE,
                "settings": runs["settings"],
                "report_settings": config_to_dict(config),
                "data": runs["data"],
                **{
                    name: table.to_dict(orient="records")
                    for name, table in tables.items()
                    if name not in ("averaged", "pooled")
                },
                "analyses_run": list(results),
                "analyses_not_run": not_run,
                "analyses": {
                    name: {
                        "title": result.title,
                        "notes": result.notes,
                        # the page finds each figure at plots/<name>_<figure>.png
                        "figures": list(result.figures),
                        "shown": list(result.tables if result.shown is None else result.shown),
                        **{
                            table: frame.to_dict(orient="records")
                            for table, frame in result.tables.items()
                        },
                    }
                    for name, result in results.items()
                },
            },
        )
        for split in SET_TITLES:
            if (tables["averaged"]["split"] == split).any():
                _plot_roc(tables["averaged"], split, staging / PLOT_FILES[split], classes)
        _plot_training(curves, staging / "training_curves.png")
        _write_dvc_metrics(staging / "metrics", tables["summary"])
        _write_analyses(staging, results)
    return tables | {
        f"{name}.{table}": frame
        for name, result in results.items()
        for table, frame in result.tables.items()
    }
