"""`python -m fuse page`: everything the pipeline found, on one static HTML page.

Reads what the report, the protocol and (when it ran) the explain stage wrote: tables.json
and the figures beside it, runs.json and the predictions table, explain/explain.json and its
overlays. It computes no metric: every number on the page is one of tables.json (or of
explain.json), printed with what it is (level, set, trials). The figures are embedded in the
page (see fuse.html_page for why); the CSV files of long tables are linked, not loaded.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from fuse import html_page as h
from fuse.analyses.base import SET_TITLES
from fuse.browser import HeadlessChromium
from fuse.evaluate import REFERENCE_MODEL
from fuse.report import (
    ANALYSES_FOLDER,
    FIGURES_FOLDER,
    PLOT_FILES,
    results_preamble,
    results_tables,
)
from fuse.schema import PREDICTIONS_FILE, RUNS_FILE, classes_of, read_predictions, read_runs
from pipeline.atomic import write_atomically, write_text_atomically
from pipeline.config import require_paths, setting
from pipeline.errors import UserError
from pipeline.keys import file_key
from pipeline.lock import output_lock

TABLES_FILE = "tables.json"
TRAINING_PLOT = "training_curves.png"
EXPLAIN_FILE = "explain.json"
EXPLAIN_GRID = "grid.png"
GALLERY_FIELDS = (
    "image",
    "image_path",
    "patient_id",
    "exam_id",
    "split",
    "label",
    "predicted",
    "probability",
    "reason",
)
ANALYSIS_FIELDS = ("title", "notes", "figures", "shown")  # the rest of an entry are tables
SPLIT_TITLES = {"train": "training", "val": "validation", **SET_TITLES}
HEADLINE_METRICS = {
    "auc": "AUC",
    "accuracy": "accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}
HEADLINE_LEVELS = ("image", "exam", "patient")
PAGE_PACKAGES = (
    "torch",
    "transformers",
    "numpy",
    "pandas",
    "scikit-learn",
    "h5py",
    "matplotlib",
    "pyarrow",
    "safetensors",
)
SCREENSHOT_SIZE = (1280, 900)  # a laptop screen, in CSS pixels


@dataclass(frozen=True)
class PageConfig:
    """Where the stages' outputs are, and where the page (and its screenshot) go."""

    report: str = setting("", f"folder of `python -m fuse report`: {TABLES_FILE}, the figures")
    protocol: str = setting(
        "", f"folder of `python -m fuse protocol`: {RUNS_FILE}, {PREDICTIONS_FILE}"
    )
    explain: str = setting(
        "",
        f"folder of the explain stage ({EXPLAIN_FILE}, overlays); empty or absent: the page "
        "says that it did not run",
    )
    out: str = setting("", "the HTML file to write, e.g. reports/index.html")
    screenshot: str = setting(
        "",
        f"also write a PNG of the page as headless Chromium shows it in a "
        f"{SCREENSHOT_SIZE[0]} x {SCREENSHOT_SIZE[1]} window; empty: none",
    )
    screenshot_full_page: bool = setting(False, "the screenshot holds the whole page")
    wait_for_lock: float = setting(
        0,
        "seconds to wait while another run writes the same --out (0: refuse at once)",
        at_least=0,
    )


def _read_json(path: Path, writer: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} does not exist; run `{writer}` first")
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); run `{writer}` again") from None
    if not isinstance(found, dict):
        raise UserError(f"{path} holds no JSON object; run `{writer}` again")
    return found


def _number_or_null(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def _frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    # JSON writes NaN as null: give numeric columns their NaN back, as the report had them
    frame = pd.DataFrame(list(records))
    for column in frame.columns:
        if frame[column].map(_number_or_null).all():
            frame[column] = pd.to_numeric(frame[column])
    return frame


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.3f}"


def _reference_model(runs: Mapping[str, Any]) -> str:
    models = list(runs["models"])
    return REFERENCE_MODEL if REFERENCE_MODEL in models else models[0]


def _headline_record(
    tables: Mapping[str, Any], model: str, split: str, level: str, metric: str
) -> Mapping[str, Any] | None:
    """The tables.json record of one headline number: a trained head's mean (SD) over trials
    at the 0.5 cut; image level from the main summary, exam and patient level from the
    levels analysis (each unit's score the mean of its images'). None: not computed."""
    if level == "image":
        records, aggregate = tables["summary"], "none"
    else:
        records = tables.get("analyses", {}).get("levels", {}).get("summary", [])
        aggregate = "mean"
    return next(
        (
            record
            for record in records
            if record["model"] == model
            and record["head"] == "head"
            and record["set"] == split
            and record["level"] == level
            and record["metric"] == f"{metric}@0.5"
            and record.get("aggregate", "none") == aggregate
        ),
        None,
    )


def _headline(tables: Mapping[str, Any], model: str, sets: Sequence[str]) -> str:
    rows = []
    for level in HEADLINE_LEVELS:
        for metric, title in HEADLINE_METRICS.items():
            if level != "image" and metric != "auc":
                continue  # exam and patient level: the AUC here, the rest in their tables
            cells = []
            for split in sets:
                record = _headline_record(tables, model, split, level, metric)
                if record is None:
                    cells.append("–")
                    continue
                interval = next(
                    (
                        f", 95% CI {_number(ci['low'])}–{_number(ci['high'])}"
                        for ci in tables["ci"]
                        if level == "image"
                        and (ci["model"], ci["head"], ci["set"], ci["metric"])
                        == (model, "head", split, metric)
                    ),
                    "",
                )
                cells.append(
                    h.element(
                        "span",
                        h.escape(_number(record["mean"])),
                        class_="value",
                        data_headline=f"{model}/{split}/{level}/{metric}",
                    )
                    + h.element(
                        "span",
                        h.escape(
                            f" SD {_number(record['sd'])}, {record['trials']} trials{interval}"
                        ),
                        class_="muted",
                    )
                )
            if any(cell != "–" for cell in cells):
                rows.append([h.escape(f"{title}, {level} level"), *cells])
    return h.element(
        "div",
        h.table(
            [f"{model}, trained heads, 0.5 cut", *(SET_TITLES[split] for split in sets)],
            rows,
            caption="Mean over trials (SD over trials, number of trials; image level: the 95% "
            "patient-bootstrap CI of the trial-averaged scores). Exam and patient scores are "
            "the mean of their images' scores.",
        ),
        class_="headline",
    )


def _data_set(predictions: pd.DataFrame, runs: Mapping[str, Any], model: str) -> str:
    classes = classes_of(runs)
    rows = predictions[(predictions["model"] == model) & (predictions["head"] == "head")]
    trial, fold = min(zip(rows["trial"], rows["fold"], strict=True))
    first = rows[(rows["trial"] == trial) & (rows["fold"] == fold)]
    header = [
        "split",
        "patients",
        "exams",
        "image-report pairs",
        "sites",
        *(f"{name}: patients / pairs" for name in classes),
    ]
    splits = [split for split in SPLIT_TITLES if split in set(first["split"])]

    def counts(part: pd.DataFrame, title: str) -> list[str]:
        return [
            h.escape(title),
            str(part["patient_id"].nunique()),
            str(part.groupby(["patient_id", "exam_id"]).ngroups),
            str(len(part)),
            h.escape(", ".join(sorted(set(part["site"])))),
            *(
                f"{part.loc[part['label'] == name, 'patient_id'].nunique()} / "
                f"{int((part['label'] == name).sum())}"
                for name in classes
            ),
        ]

    body = [counts(first[first["split"] == split], SPLIT_TITLES[split]) for split in splits]
    body.append(counts(first, "all"))
    settings = runs["settings"]
    heads = rows.groupby(["trial", "fold"]).ngroups
    ranges = []
    for split in splits:
        patients = rows[rows["split"] == split].groupby(["trial", "fold"])["patient_id"].nunique()
        if patients.min() != patients.max():
            ranges.append(f"{SPLIT_TITLES[split]} {patients.min()}–{patients.max()}")
    notes = list(runs["data"].get("notes", []))
    return (
        h.paragraphs(
            [
                f"The pairs the protocol scored, counted from {PREDICTIONS_FILE} (the rows of "
                f"{model}'s trained head in trial {trial}, fold {fold}). Split mode "
                f"{settings['split']}, {heads} trial(s) x fold(s) of {model}; patients never "
                "cross splits. A patient counts under a class when one of their pairs has it.",
                (
                    "The split is drawn again for every trial and fold; patients per split over "
                    "them: " + ", ".join(ranges) + "."
                )
                if ranges
                else "Every trial and fold has these counts per split.",
            ]
        )
        + h.table(header, body, "Patients, exams, pairs and sites per split", text_columns={4})
        + h.element("h3", "Pairs left out, and why")
        + (
            h.element(
                "ul",
                "".join(h.element("li", h.escape(note)) for note in notes),
            )
            if notes
            else h.paragraphs(
                [
                    f"The protocol recorded no note in {RUNS_FILE}: every pair of the manifest "
                    "had a vector in every feature file and was scored."
                ]
            )
        )
    )


def _results(
    tables: Mapping[str, Any], runs: Mapping[str, Any], predictions: pd.DataFrame, report: Path
) -> str:
    frames = {name: _frame(tables[name]) for name in ("summary", "ci", "trial_tests")}
    # the preamble counts each model's trials from rows with model, head and trial columns
    preamble = results_preamble({"summary": frames["summary"], "pooled": predictions}, runs)
    parts = [h.paragraphs([preamble])]
    for found in results_tables(frames, runs, classes_of(runs)):
        parts.append(h.element("h3", h.escape(found.title)))
        if found.note:
            parts.append(h.paragraphs([found.note], class_="muted"))
        parts.append(h.table(found.header, [[h.escape(c) for c in row] for row in found.rows]))
    figures = [
        h.figure(
            h.image(report / file, f"ROC curves, {SET_TITLES[split]}", TABLES_FILE),
            f"ROC curves, {SET_TITLES[split]}, image level: each model's scores averaged over "
            "its trials per pair (the legend's AUC is of those averages, not the mean over "
            "trials of the tables).",
        )
        for split, file in PLOT_FILES.items()
        if any(record["set"] == split for record in tables["summary"])
    ]
    training = h.figure(
        h.image(report / TRAINING_PLOT, "training curves", TABLES_FILE),
        "Training curves: loss (dashed: training) and validation AUC per epoch, mean over trials.",
    )
    return "".join(parts) + h.element("div", "".join(figures), class_="figures") + training


def _analysis(name: str, entry: Mapping[str, Any], report: Path, page_folder: Path) -> str:
    tables = {key: value for key, value in entry.items() if key not in ANALYSIS_FIELDS}
    parts = [h.paragraphs(entry["notes"])]
    for table in entry["shown"]:
        parts.append(
            h.records_table(
                tables[table],
                caption=f"{name}: {table} (also {ANALYSES_FOLDER}/{name}_{table}.csv)",
            )
        )
    hidden = [table for table in tables if table not in entry["shown"]]
    if hidden:
        links = ", ".join(
            h.element(
                "a",
                h.escape(f"{table} ({len(tables[table])} rows)"),
                href=os.path.relpath(report / ANALYSES_FOLDER / f"{name}_{table}.csv", page_folder),
            )
            for table in hidden
        )
        parts.append(
            h.element("p", f"Long tables, in CSV files beside this page: {links}.", class_="muted")
        )
    figures = [
        h.figure(
            h.image(
                report / FIGURES_FOLDER / f"{name}_{figure}.png", f"{name} {figure}", TABLES_FILE
            ),
            f"{entry['title']}: {figure.replace('_', ' ')}",
        )
        for figure in entry["figures"]
    ]
    return "".join(parts) + h.element("div", "".join(figures), class_="figures")


def _explain(folder: Path | None) -> str:
    explained = folder / EXPLAIN_FILE if folder else None
    if explained is None or not explained.is_file():
        where = f"{explained} does not exist" if explained else "no explain folder was given"
        return h.element(
            "p",
            h.escape(
                f"The explain stage did not run ({where}): this page has no heatmaps and no "
                "pointing game. Run the explain stage of dvc.yaml (Grad-CAM on a saved head), "
                "then this page again."
            ),
            class_="notice",
        )
    found = _read_json(explained, "the explain stage")
    missing = [key for key in ("head", "encoder", "target_class", "gallery") if key not in found]
    if missing:
        raise UserError(f"{explained} lacks {missing}; run the explain stage again")
    parts = [
        h.paragraphs(
            [
                f"Grad-CAM of head {found['head']} through image encoder {found['encoder']}, "
                f"for class {found['target_class']}; the report's vector is held fixed.",
                *found.get("notes", []),
            ]
        )
    ]
    if found.get("pointing_game"):
        parts.append(h.element("h3", "Pointing game"))
        parts.append(
            h.records_table(
                found["pointing_game"],
                caption="How often the heatmap's peak falls inside the lesion, and the share "
                "of its mass there, beside a random map's",
            )
        )
    if (folder / EXPLAIN_GRID).is_file():
        parts.append(
            h.figure(
                h.image(folder / EXPLAIN_GRID, "Grad-CAM grid", str(explained)),
                "The explain stage's grid: most confident right, most confident wrong, random.",
            )
        )
    cards = []
    for position, item in enumerate(found["gallery"]):
        absent = [key for key in GALLERY_FIELDS if key not in item]
        if absent:
            raise UserError(
                f"{explained}: gallery entry {position} lacks {absent}; run the explain stage again"
            )
        cards.append(
            h.figure(
                h.image(folder / item["image"], f"heatmap of {item['image_path']}", str(explained)),
                f"{item['image_path']} (patient {item['patient_id']}, exam {item['exam_id']}, "
                f"{SPLIT_TITLES.get(item['split'], item['split'])}): label {item['label']}, "
                f"predicted {item['predicted']}, P({found['target_class']}) "
                f"{_number(item['probability'])}; {item['reason']}",
            )
        )
    if cards:
        parts += [h.element("h3", "Gallery"), h.element("div", "".join(cards), class_="gallery")]
    return "".join(parts)


def _git_revision() -> str:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not run from a git checkout)"
    return revision + (" with uncommitted changes" if changed else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _settings_table(settings: Mapping[str, Any], caption: str) -> str:
    rows = [
        [h.escape(key), h.escape(json.dumps(value, ensure_ascii=False))]
        for key, value in settings.items()
    ]
    return h.table(["setting", "value"], rows, caption, range(2))


def _provenance(
    runs: Mapping[str, Any], report_settings: Mapping[str, Any], inputs: Mapping[str, Path]
) -> str:
    data = runs["data"]
    model_rows = [
        [
            h.escape(name),
            h.escape(spec.get("role", "")),
            h.escape(spec.get("description", "")),
            h.escape(", ".join("/".join(source) for source in spec.get("inputs", []))),
        ]
        for name, spec in runs["models"].items()
    ]
    feature_rows = [
        [
            h.escape(name),
            h.escape(feature.get("weights") or "–"),
            h.element("span", h.escape(feature.get("weights_fingerprint") or "–"), class_="wrap"),
            h.escape(feature.get("pooling") or "–"),
            h.escape(feature.get("dtype") or "–"),
            h.escape(feature.get("device_type") or "–"),
            h.escape(
                ", ".join(f"{k} {v}" for k, v in (feature.get("package_versions") or {}).items())
                or "not recorded"
            ),
            h.element(
                "span", h.escape(f"{feature['path']} (sha256 {feature['sha256']})"), class_="wrap"
            ),
        ]
        for name, feature in data["features"].items()
    ]
    read = [
        [
            h.escape(what),
            h.escape(str(path)),
            h.element("span", h.escape(file_key(path)), class_="wrap"),
        ]
        for what, path in inputs.items()
    ]
    read.append(
        [
            h.escape("manifest"),
            h.escape(data["manifest"]["path"]),
            h.element("span", h.escape(data["manifest"]["sha256"]), class_="wrap"),
        ]
    )
    environment = [
        ["python", h.escape(platform.python_version())],
        *([h.escape(name), h.escape(_version(name))] for name in PAGE_PACKAGES),
    ]
    return (
        h.table(
            ["model", "role", "what", "inputs (encoder/modality)"],
            model_rows,
            "Models",
            text_columns=range(4),
        )
        + h.table(
            [
                "feature file",
                "weights",
                "weights fingerprint",
                "pooling",
                "dtype",
                "device",
                "packages of the extraction",
                "file",
            ],
            feature_rows,
            "Encoders, as recorded in each feature file and copied into runs.json",
            text_columns=range(8),
        )
        + h.table(["input", "path", "sha256"], read, "Files this page was built from", range(3))
        + _settings_table(runs["settings"], f"The protocol's resolved settings ({RUNS_FILE})")
        + (
            _settings_table(report_settings, f"The report's settings ({TABLES_FILE})")
            if report_settings
            else ""
        )
        + h.paragraphs([f"Git revision of the checkout that built this page: {_git_revision()}."])
        + h.table(
            ["package", "version"], environment, "Packages of the environment that built this page"
        )
    )


def build_page(config: PageConfig) -> str:
    """The page's HTML from the stages' outputs named in `config`.

    Raises:
        UserError: an input is missing or damaged, or names a figure that is missing.
    """
    require_paths(config, "report", "protocol", "out")
    report, protocol = Path(config.report), Path(config.protocol)
    tables = _read_json(report / TABLES_FILE, "python -m fuse report")
    for name, entry in tables.get("analyses", {}).items():
        if not all(field in entry for field in ANALYSIS_FIELDS):
            raise UserError(
                f"{report / TABLES_FILE}: analysis {name!r} lacks some of "
                f"{list(ANALYSIS_FIELDS)}; it was written by an older `python -m fuse report`: "
                "run it again"
            )
    runs = read_runs(protocol)
    predictions = read_predictions(protocol, classes_of(runs))
    model = _reference_model(runs)
    sets = [split for split in SET_TITLES if any(r["set"] == split for r in tables["summary"])]
    page_folder = Path(config.out).resolve().parent
    tiny = sorted(
        name
        for name, feature in runs["data"]["features"].items()
        if feature.get("weights") == "tiny"
    )
    intro = [
        f"Built {datetime.now(UTC).isoformat(timespec='seconds')} from {report / TABLES_FILE} "
        f"and {protocol}. Every number is computed by `python -m fuse report` (this page only "
        "prints it) and says its level (image, exam or patient), its set and its number of "
        "trials. Figures are embedded in this file, so it stands alone (mail it, print it); "
        "long tables are linked as CSV files beside it.",
    ]
    header = h.paragraphs(intro, class_="muted")
    if tiny:
        header += h.element(
            "p",
            h.escape(
                f"Encoders with random tiny weights ({', '.join(tiny)}): these numbers test the "
                "pipeline, not the method."
            ),
            class_="notice",
        )
    header += h.element("h3", f"Headline: {model}, trained heads") + _headline(tables, model, sets)
    sections = [
        ("data", "Data set", _data_set(predictions, runs, model)),
        ("results", "Results", _results(tables, runs, predictions, report)),
        *(
            (f"analysis-{name}", entry["title"], _analysis(name, entry, report, page_folder))
            for name, entry in tables["analyses"].items()
        ),
        (
            "explain",
            "Where the model looks: Grad-CAM",
            _explain(Path(config.explain) if config.explain else None),
        ),
        (
            "provenance",
            "Provenance",
            _provenance(
                runs,
                tables.get("report_settings", {}),
                {
                    TABLES_FILE: report / TABLES_FILE,
                    RUNS_FILE: protocol / RUNS_FILE,
                    PREDICTIONS_FILE: protocol / PREDICTIONS_FILE,
                },
            ),
        ),
    ]
    return h.document("VLMF-Net: results on one page", header, sections)


def take_screenshot(page: Path, png: Path, full_page: bool = False) -> Path:
    """A PNG of `page` as headless Chromium shows it in a SCREENSHOT_SIZE window.

    Raises:
        UserError: no Chromium, or it does not answer.
    """
    with HeadlessChromium(*SCREENSHOT_SIZE) as browser:
        browser.open(page)
        return write_atomically(png, lambda temporary: browser.screenshot(temporary, full_page))


def run(config: PageConfig) -> Path:
    """Write the page (and its screenshot when asked for).

    Returns:
        The page's path.
    """
    page_html = build_page(config)
    out = Path(config.out)
    with output_lock(out, config.wait_for_lock):
        write_text_atomically(out, page_html)
        if config.screenshot:
            take_screenshot(out, Path(config.screenshot), config.screenshot_full_page)
    return out
