"""What a fuse run leaves for people and for DVC: metrics.json, ROC curves as CSV and PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: no global state, no display needed

from pipeline.metrics import roc_auc, roc_points

Curves = Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]  # split -> variant -> data


def _json_safe(value: Any) -> Any:
    # JSON has no NaN (an AUC on a one-class split); null is what DVC and browsers read.
    if isinstance(value, Mapping):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_metrics(path: Path, metrics: Mapping[str, Any]) -> None:
    """Write metrics as JSON (a DVC metrics file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(metrics), indent=2) + "\n", encoding="utf-8")


def write_roc(folder: Path, curves: Curves) -> None:
    """Write roc/<split>_<variant>.csv for `dvc plots` and roc.png with a panel per split.

    Args:
        folder: output folder.
        curves: per split and variant, the true labels and the positive-class scores.
    """
    (folder / "roc").mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(5 * len(curves), 4.6), layout="tight")
    axes = figure.subplots(1, len(curves), squeeze=False)
    for axis, (split, by_variant) in zip(axes[0], curves.items(), strict=True):
        for variant, (labels, scores) in by_variant.items():
            false_positive_rate, true_positive_rate = roc_points(labels, scores)
            pd.DataFrame({"fpr": false_positive_rate, "tpr": true_positive_rate}).to_csv(
                folder / "roc" / f"{split}_{variant}.csv", index=False
            )
            axis.plot(
                false_positive_rate,
                true_positive_rate,
                label=f"{variant} (AUC {roc_auc(labels, scores):.3f})",
            )
        axis.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
        axis.set(
            title=f"ROC, {split} set (n={len(labels)} pairs)",
            xlabel="false positive rate",
            ylabel="true positive rate",
            xlim=(0, 1),
            ylim=(0, 1.01),
        )
        axis.legend(loc="lower right")
    figure.savefig(folder / "roc.png", dpi=120)
