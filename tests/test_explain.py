"""`python -m extract.explain` on a tiny demo: the files the HTML report reads, model
randomisation, and a head whose image encoder has no patch tokens."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from tiny_m4 import train_tiny_m4

from extract.explain import Explainer, load_image_encoder
from extract.preprocess import decode_image
from fuse.data import load_cached_rows
from fuse.head import FittedHead
from fuse.protocol import head_path

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny demo, its tiny-encoder features and one saved M4 head."""
    folder = tmp_path_factory.mktemp("explain")
    run = train_tiny_m4(
        folder,
        20,
        4,
        trials=1,
        epochs=4,
        probes=False,
        # On 24 patients, input selection may leave the image out of the head; these
        # tests explain a head that reads it.
        modality_dropout=0.0,
    )
    head = head_path(folder / "models", "M4", "head", 0, 0).with_suffix(".json")
    return {**run, "head": head}


def explain(trained: dict, *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "extract.explain",
            *("--manifest", str(trained["manifest"]), "--features", *trained["features"]),
            *arguments,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_explain_writes_what_the_report_reads(trained):
    out = trained["folder"] / "explain"
    done = explain(
        trained,
        *("--head", str(trained["folder"] / "models" / "M4")),
        *("--protocol", str(trained["folder"] / "protocol"), "--out", str(out)),
        *("--confident-right", "1", "--confident-wrong", "1", "--random", "1"),
        *("--pointing-images", "4"),
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "explain.json").read_text(encoding="utf-8"))
    assert summary["target_class"] == "GC" and summary["encoder"]["name"] == "blip2-qformer"
    assert summary["head"]["description"] == "M4 head (trial 0, fold 0)"
    manifest = pd.read_csv(trained["manifest"], dtype=str, keep_default_na=False)
    for entry in summary["gallery"]:
        assert entry["reason"] in ("confident right", "confident wrong", "random")
        assert entry["split"] in ("test", "external") and 0 <= entry["probability"] <= 1
        row = manifest[manifest["image_path"] == entry["image_path"]].iloc[0]
        assert (entry["patient_id"], entry["label"]) == (row["patient_id"], row["label"])
        picture = Image.open(out / entry["image"])
        assert picture.width == Image.open(trained["manifest"].parent / row["image_path"]).width
    assert {entry["split"] for entry in summary["gallery"]} == {"test", "external"}
    assert len(summary["gallery"]) <= 6 and Image.open(out / "grid.png").width > 0
    table = pd.read_csv(out / "pointing_game.csv")
    assert table["set"].tolist() == ["test", "external"]
    assert table.to_dict(orient="records") == pytest.approx(summary["pointing_game"])
    per_image = pd.read_csv(out / "pointing_game_images.csv")
    assert (per_image.groupby("set", sort=False).size() <= 4).all()
    assert table["images"].tolist() == per_image.groupby("set", sort=False).size().tolist()
    assert "tiny random weights" in " ".join(summary["notes"])
    assert any("random baseline" in note for note in summary["notes"])


def test_randomising_the_heads_weights_changes_the_map(trained):
    """Model randomisation (Adebayo et al., 2018): a map that survives it explains nothing."""
    head = FittedHead.load(trained["head"])
    data = load_cached_rows(
        trained["manifest"], trained["features"], head.model.inputs, head.classes
    )
    encoder = load_image_encoder(head, device="cpu")
    rows = list(range(0, len(data.table), max(1, len(data.table) // 8)))[:8]
    images = [
        decode_image(trained["manifest"].parent / data.table.at[row, "image_path"]) for row in rows
    ]
    trained_maps, _ = Explainer(head, data, encoder, target=1).maps(rows, images)
    again, _ = Explainer(head, data, encoder, target=1).maps(rows, images)
    assert all(np.array_equal(a, b) for a, b in zip(trained_maps, again, strict=True))
    torch.manual_seed(1)
    for parameter in head.network_.parameters():
        torch.nn.init.normal_(parameter, std=float(parameter.detach().std()) or 0.05)
    random_maps, _ = Explainer(head, data, encoder, target=1).maps(rows, images)
    correlations = [
        spearmanr(a.ravel(), b.ravel())[0] for a, b in zip(trained_maps, random_maps, strict=True)
    ]
    assert np.median(correlations) < 0.5


def test_a_head_on_an_encoder_without_patch_tokens_is_refused_in_one_line(trained, tmp_path):
    config = json.loads(trained["head"].read_text(encoding="utf-8"))
    config["sources"][0].update(encoder="align-image", pooling="projection")
    edited = tmp_path / "align-head.json"
    edited.write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "align-head.safetensors").write_bytes(
        trained["head"].with_suffix(".safetensors").read_bytes()
    )
    done = explain(trained, "--head", str(edited), "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "encoder align-image" in done.stderr
    assert "has no patch tokens" in done.stderr and not (tmp_path / "out").exists()
