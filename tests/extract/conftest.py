"""A small manifest with shared images and reports, for extraction tests."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPORTS = (
    "左侧声带前中段可见白色斑块样新生物，表面粗糙，边界欠清。",
    "右侧声带全长黏膜增厚，表面见菜花样新生物，累及前联合。",
    "双侧声带运动正常，声门闭合可。NBI下Ni分型Ⅳ型。",
)


def _write_image(path: Path, seed: int) -> None:
    """A flat colour with a differently coloured block: distinct content per seed."""
    rng = np.random.default_rng(seed)
    height, width = 300 + 10 * seed, 400
    pixels = np.zeros((height, width, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    pixels[80:200, 60 + 30 * seed : 300] = rng.integers(0, 256, 3, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def small_table(tmp_path: Path) -> pd.DataFrame:
    """Write images to tmp_path/images and return their manifest table.

    Rows 0 and 4 share one image; images/copy.png has the same bytes as images/a.png (one
    key, two paths); rows 0 and 3 share one report (row 3 with extra outer whitespace,
    which normalisation removes).
    """
    images = tmp_path / "images"
    images.mkdir(parents=True)
    for seed, name in enumerate(("a", "b", "c", "d")):
        _write_image(images / f"{name}.png", seed)
    shutil.copyfile(images / "a.png", images / "copy.png")
    return pd.DataFrame(
        {
            "image_path": [f"images/{name}.png" for name in ("a", "b", "c", "d", "a", "copy")],
            "report_text": [REPORTS[0], REPORTS[1], REPORTS[2], f"  {REPORTS[0]}\n", *REPORTS[1:]],
            "label": ["VCD", "GC", "GC", "VCD", "VCD", "VCD"],
            # copy.png is a's bytes, so it belongs to a's patient: one image, one patient
            "patient_id": ["p1", "p2", "p3", "p1", "p1", "p1"],
        }
    )


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[[pd.DataFrame], Path]:
    """Save a (possibly altered) manifest table as tmp_path/manifest.csv."""

    def write(table: pd.DataFrame) -> Path:
        path = tmp_path / "manifest.csv"
        table.to_csv(path, index=False)
        return path

    return write


@pytest.fixture
def small_manifest(small_table: pd.DataFrame, write_manifest) -> Path:
    """tmp_path/manifest.csv: 6 rows, 4 unique image contents, 3 unique reports."""
    return write_manifest(small_table)
