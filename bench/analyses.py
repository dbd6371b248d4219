"""How long does each analysis of the report take on a paper-size predictions table?

A synthetic table of the paper's shape (5,799 pairs from 404 internal + 47 external
patients, one exam each of ~14 images on average; 9 models x 2 heads x 5 trials, every
split scored, ~522k rows) is built in memory; then `fuse.evaluate.evaluate` (Tables 2-4,
with the patient bootstrap) and every entry of `fuse.analyses.ANALYSES` are timed, each
once, with the report's default settings (1000 bootstrap resamples). Prints one line per
step in seconds and the CPU it ran on; the last line says whether all stayed under a minute
(exit code 1 if not). Writes bench/results/analyses.json (not in --smoke mode).

    python bench/analyses.py           # paper size
    python bench/analyses.py --smoke   # seconds: 40 patients, 2 models, 2 trials (tests)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuse.analyses import ANALYSES, AnalysisInputs, AnalysisSettings  # noqa: E402
from fuse.evaluate import evaluate  # noqa: E402
from fuse.schema import prediction_rows  # noqa: E402

PAPER = {"pairs": 5799, "internal": 404, "external": 47, "trials": 5, "resamples": 1000}
SMOKE = {"pairs": 400, "internal": 32, "external": 8, "trials": 2, "resamples": 50}
MODELS = ("M4", "M1", "M2", "M3", "CLIP", "ALIGN", "BLIP-2", "ViLT", "Chinese-CLIP")
CLASSES = ("VCD", "GC")
LIMIT_SECONDS = 60.0
RESULTS = Path(__file__).parent / "results" / "analyses.json"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def manifest_rows(shape: dict, rng: np.random.Generator) -> pd.DataFrame:
    """One exam per patient, images shared out so the total is shape['pairs'] (>= 3 each)."""
    patients = shape["internal"] + shape["external"]
    images = 3 + rng.multinomial(shape["pairs"] - 3 * patients, np.ones(patients) / patients)
    patient_of_row = np.repeat(np.arange(patients), images)
    names = np.array([f"P{index:04d}" for index in range(patients)])[patient_of_row]
    return pd.DataFrame(
        {
            "image_path": [f"images/{index}.png" for index in range(len(names))],
            "patient_id": names,
            "exam_id": [f"{name}-E1" for name in names],
            "site": np.where(patient_of_row < shape["internal"], "hospital_a", "hospital_b"),
            "label": np.where(patient_of_row % 2 == 1, "GC", "VCD"),
            "patient": patient_of_row,
        }
    )


def synthetic_table(
    shape: dict, models: tuple[str, ...], seed: int = 0
) -> tuple[pd.DataFrame, dict]:
    """The predictions table and run records of every model, head and trial."""
    rng = np.random.default_rng(seed)
    rows = manifest_rows(shape, rng)
    positive = (rows["label"] == "GC").to_numpy()
    internal = np.arange(shape["internal"])
    frames, records = [], []
    for trial in range(shape["trials"]):
        order = rng.permutation(internal)
        cut_train, cut_val = int(0.8 * len(order)), int(0.9 * len(order))
        split_of_patient = np.full(shape["internal"] + shape["external"], "external", dtype=object)
        split_of_patient[order[:cut_train]] = "train"
        split_of_patient[order[cut_train:cut_val]] = "val"
        split_of_patient[order[cut_val:]] = "test"
        splits = split_of_patient[rows["patient"].to_numpy()]
        for position, model in enumerate(models):
            for head in ("head", "probe"):
                strength = 1.5 - 0.1 * position
                patient_effect = rng.normal(0, 0.8, shape["internal"] + shape["external"])
                logits = (
                    strength * (2 * positive - 1)
                    + patient_effect[rows["patient"].to_numpy()]
                    + rng.normal(0, 1.0, len(rows))
                )
                scores = 1 / (1 + np.exp(-logits))
                frames.append(
                    prediction_rows(
                        rows,
                        splits,
                        model=model,
                        head=head,
                        trial=trial,
                        fold=0,
                        threshold=0.5,
                        probabilities=np.c_[1 - scores, scores],
                        classes=CLASSES,
                    )
                )
                best = int(rng.integers(6, 40)) if head == "head" else None
                records.append(
                    {
                        "model": model,
                        "head": head,
                        "trial": trial,
                        "fold": 0,
                        "learning_rate": 1e-4 if head == "head" else None,
                        "best_epoch": best,
                        "first_eligible_epoch": 6 if head == "head" else None,
                        "fallback_to_last_epoch": False if head == "head" else None,
                    }
                )
    runs = {
        "settings": {
            "classes": list(CLASSES),
            "selection": "val_loss",
            "warmup_epochs": 5,
            "epochs": 80,
            "split": "redraw",
            "seed": seed,
        },
        "models": {model: {"role": "proposed" if model == "M4" else "other"} for model in models},
        "runs": records,
    }
    return pd.concat(frames, ignore_index=True), runs


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small table, in seconds")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else PAPER
    models = MODELS[:2] if args.smoke else MODELS
    built = time.perf_counter()
    table, runs = synthetic_table(shape, models)
    print(
        f"table: {len(table):,} rows ({shape['pairs']:,} pairs, {len(models)} models x 2 heads x "
        f"{shape['trials']} trials), built in {time.perf_counter() - built:.1f} s"
    )
    print(f"cpu: {cpu_name()}, python {platform.python_version()}")
    settings = AnalysisSettings(resamples=shape["resamples"])
    inputs = AnalysisInputs(table, runs, CLASSES, settings)
    seconds = {
        "evaluate": timed(lambda: evaluate(table, CLASSES, settings.resamples, settings.seed))
    }
    print(f"evaluate: {seconds['evaluate']:.1f} s")
    for name, analyse in ANALYSES.items():
        seconds[name] = timed(lambda analyse=analyse: analyse(inputs))
        print(f"{name}: {seconds[name]:.1f} s")
    slowest = max(seconds, key=seconds.get)
    within = seconds[slowest] <= LIMIT_SECONDS
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            json.dumps(
                {
                    "cpu": cpu_name(),
                    "rows": len(table),
                    "resamples": settings.resamples,
                    "seconds": seconds,
                },
                indent=2,
            )
            + "\n"
        )
    print(
        f"total {sum(seconds.values()):.1f} s; slowest {slowest} {seconds[slowest]:.1f} s; "
        f"every step under {LIMIT_SECONDS:.0f} s: {'yes' if within else 'no'}"
    )
    raise SystemExit(0 if within else 1)


if __name__ == "__main__":
    main()
