"""The pointing game's per-image scores, its random baselines, and how lesions are read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from extract.pointing import describe, lesion_mask, score_map, summarise
from pipeline.errors import UserError


def test_a_peak_inside_the_lesion_is_a_hit_and_its_mass_is_counted():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 10:20] = True
    heatmap = np.ones((20, 30))
    heatmap[7, 12] = 51.0  # total 650: 50 + 50 inside the 50-pixel lesion
    result = score_map(heatmap, mask)
    assert result.hit and result.mass_inside == pytest.approx(100 / 650)
    assert result.area_share == pytest.approx(50 / 600)
    heatmap[7, 12], heatmap[0, 0] = 1.0, 51.0
    assert not score_map(heatmap, mask).hit
    assert score_map(np.zeros((20, 30)), mask) is None  # a map pointing nowhere


def test_the_random_baselines_are_what_random_maps_score():
    """Maps of independent uniform values: their hit rate and mass inside average to the
    lesion's area share, the baseline the output states."""
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 50), dtype=bool)
    mask[10:30, 5:25] = True  # area share 0.2
    results = [score_map(rng.random((40, 50)), mask) for _ in range(2000)]
    assert np.mean([r.hit for r in results]) == pytest.approx(0.2, abs=0.03)
    assert np.mean([r.mass_inside for r in results]) == pytest.approx(0.2, abs=0.005)
    images = pd.DataFrame(
        {
            "set": "test",
            "patient_id": [f"p{i % 50}" for i in range(len(results))],
            "hit": [r.hit for r in results],
            "mass_inside": [r.mass_inside for r in results],
            "area_share": [r.area_share for r in results],
        }
    )
    (row,) = summarise(images, {"head": "h"}, seed=0)
    assert row["random_pointing_accuracy"] == pytest.approx(0.2)
    assert row["pointing_ci_low"] < 0.2 < row["pointing_ci_high"]
    assert row["images"] == 2000 and row["patients"] == 50 and row["head"] == "h"
    assert "near the random baseline" in describe([row])[0]


def test_a_map_on_the_lesion_is_called_above_the_baseline():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:4, 2:4] = True
    heatmap = np.zeros((10, 10))
    heatmap[3, 3] = 1.0
    result = score_map(heatmap, mask)
    images = pd.DataFrame(
        [{"set": "external", "patient_id": f"p{i}", **result.__dict__} for i in range(20)]
    )
    (row,) = summarise(images, {}, seed=0)
    assert row["pointing_accuracy"] == 1.0 and row["mass_inside"] == 1.0
    assert "above the random baseline" in describe([row])[0]


def test_masks_and_boxes_are_read_and_checked(tmp_path):
    Image.fromarray(np.eye(4, 6, dtype=bool)).save(tmp_path / "m.png")
    assert lesion_mask("m.png", tmp_path, (6, 4), "line 2").sum() == 4
    box = lesion_mask("1,2,4,3", tmp_path, (6, 4), "line 2")
    assert box.sum() == 3 and box[2, 1:4].all()
    assert lesion_mask(" ", tmp_path, (6, 4), "line 2") is None
    with pytest.raises(UserError, match="line 2: lesion mask .* is 6x4; its image is 8x4"):
        lesion_mask("m.png", tmp_path, (8, 4), "line 2")
    with pytest.raises(UserError, match="line 3: box 'a,b,c,d' is not four numbers"):
        lesion_mask("a,b,c,d", tmp_path, (6, 4), "line 3")
    with pytest.raises(UserError, match="cannot read the lesion mask"):
        lesion_mask("none.png", tmp_path, (6, 4), "line 4")
