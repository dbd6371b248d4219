"""How long does each analysis of the report take on a paper-size predictions table?

A synthetic table of the paper's shape (5,799 pairs from 404 internal + 47 external
patients, one exam each of ~14 images on average; 9 models x 2 heads x 5 trials, every
split scored, ~522k rows; plus the modality conditions of the six models with an image and
a report input on test and external rows, and a label-efficiency table of M4 over six
fractions x 3 trials) is built in memory; then `fuse.evaluate.evaluate` (Tables 2-4, with
the patient bootstrap) and every entry of `fuse.analyses.ANALYSES` are timed, each once,
with the report's default settings (1000 bootstrap resamples). The protocol's own share of
the modality analyses is timed too: one M4 head at the paper's widths (1024-d image,
4096-d report; one epoch of training, which the timing leaves out) scoring every
condition of its test and external rows and the attribution shares of every row. Prints
one line per step in seconds and the CPU it ran on; the last line says whether all stayed
under a minute (exit code 1 if not). Writes bench/results/analyses.json (not in --smoke
mode).

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

import torch  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from fuse.analyses import ANALYSES, AnalysisInputs, AnalysisSettings  # noqa: E402
from fuse.counterfactual import CONDITIONS, conditions_of, score_conditions  # noqa: E402
from fuse.evaluate import evaluate  # noqa: E402
from fuse.head import FeatureSource, FittedHead  # noqa: E402
from fuse.schema import OBSERVED, prediction_rows  # noqa: E402
from fuse.train import HeadSettings  # noqa: E402
from fuse.zoo import protocol_models  # noqa: E402

PAPER = {
    "pairs": 5799,
    "internal": 404,
    "external": 47,
    "trials": 5,
    "resamples": 1000,
    "widths": (1024, 4096),
}
SMOKE = {
    "pairs": 400,
    "internal": 32,
    "external": 8,
    "trials": 2,
    "resamples": 50,
    "widths": (16, 32),
}
FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
TWO_MODALITY = {
    name
    for name, spec in protocol_models("blip2-qformer", "llama3", "blip2-vit").items()
    if conditions_of([modality for _, modality in spec.inputs])
}
MODELS = ("M4", "M1", "M2", "M3", "CLIP", "ALIGN", "BLIP-2", "ViLT", "Chinese-CLIP")
CLASSES = ("VCD", "GC")
LIMIT_SECONDS = 60.0
RESULTS = Path(__file__).parent / "results" / "analyses.json"


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
                if model in TWO_MODALITY:
                    frames += condition_frames(rows, splits, logits, model, head, trial, rng)
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


def condition_frames(
    rows: pd.DataFrame,
    splits: np.ndarray,
    logits: np.ndarray,
    model: str,
    head: str,
    trial: int,
    rng: np.random.Generator,
) -> list[pd.DataFrame]:
    """Rows of every modality condition on the test and external rows: the observed logit
    weakened (an informative input replaced) plus noise."""
    evaluated = np.flatnonzero(np.isin(splits, ("test", "external")))
    frames = []
    for condition in CONDITIONS:
        if condition == OBSERVED:
            continue
        changed = 0.5 * logits[evaluated] + rng.normal(0, 0.5, len(evaluated))
        scores = 1 / (1 + np.exp(-changed))
        frames.append(
            prediction_rows(
                rows.iloc[evaluated],
                splits[evaluated],
                model=model,
                head=head,
                trial=trial,
                fold=0,
                threshold=0.5,
                probabilities=np.c_[1 - scores, scores],
                classes=CLASSES,
                condition=condition,
                source_rows=rng.permutation(evaluated),
            )
        )
    return frames


def label_efficiency_table(table: pd.DataFrame) -> pd.DataFrame:
    """M4's observed rows of 3 trials, once per fraction, scores noisier at smaller shares."""
    m4 = table[(table["model"] == "M4") & (table["condition"] == OBSERVED) & (table["trial"] < 3)]
    rng = np.random.default_rng(1)
    frames = []
    for fraction in FRACTIONS:
        noisy = m4.assign(fraction=fraction)
        noise = rng.normal(0, 0.3 / fraction**0.5, len(noisy))
        noisy["prob_GC"] = np.clip(noisy["prob_GC"] + noise, 0, 1).astype(np.float32)
        noisy["prob_VCD"] = 1 - noisy["prob_GC"]
        frames.append(noisy)
    return pd.concat(frames, ignore_index=True)


def protocol_share(shape: dict) -> dict[str, float]:
    """Seconds of one paper-width M4 head scoring its conditions and attribution shares."""
    rows = shape["pairs"]
    patients = np.sort(np.arange(rows) % (shape["internal"] + shape["external"]))
    labels = torch.from_numpy(patients % 2)
    inputs = [torch.randn(rows, width) + labels[:, None] * 0.1 for width in shape["widths"]]
    order = np.random.default_rng(0).permutation(rows)
    train, val, test = np.split(order, [int(0.8 * rows), int(0.9 * rows)])
    spec = protocol_models("blip2-qformer", "llama3", "blip2-vit")["M4"]
    head = FittedHead(spec, "head", HeadSettings(epochs=2, warmup_epochs=1, patience=0))
    head.fit(
        inputs,
        labels,
        torch.from_numpy(train),
        torch.from_numpy(val),
        0,
        sources=[
            FeatureSource(encoder, modality, width, "tiny", None, "mean", "float32", {})
            for (encoder, modality), width in zip(spec.inputs, shape["widths"], strict=True)
        ],
    )
    prepared = head.prepared(inputs)
    return {
        "protocol_conditions_per_head": timed(
            lambda: score_conditions(
                head, prepared, {"test": test}, patients.astype(str), labels.numpy(), 0
            )
        ),
        "protocol_attributions_per_head": timed(lambda: head.attribution_shares(prepared)),
    }


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
    observed = table["condition"] == OBSERVED
    inputs = AnalysisInputs(
        table[observed].reset_index(drop=True),
        runs,
        CLASSES,
        settings,
        conditions=table[~observed].reset_index(drop=True),
        label_efficiency=label_efficiency_table(table),
    )
    table = inputs.predictions
    seconds = {
        "evaluate": timed(lambda: evaluate(table, CLASSES, settings.resamples, settings.seed))
    }
    print(f"evaluate: {seconds['evaluate']:.1f} s")
    for name, analyse in ANALYSES.items():
        seconds[name] = timed(lambda analyse=analyse: analyse(inputs))
        print(f"{name}: {seconds[name]:.1f} s")
    for name, value in protocol_share(shape).items():
        seconds[name] = value
        print(f"{name}: {value:.1f} s")
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
