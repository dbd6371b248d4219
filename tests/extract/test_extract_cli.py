"""The real `python -m extract` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    ViTConfig,
    ViTImageProcessorPil,
    ViTModel,
)

from cache.store import read_features
from extract.__main__ import main
from extract.registry import MODEL_CONFIGS, available_encoders
from fuse.schema import read_predictions
from pipeline.keys import text_key

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_encoders_options_and_examples(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in available_encoders())
    for text in ("--weights", "tiny", "hub", "FOLDER", "--num-workers", "accelerate launch"):
        assert text in help_text
    for text in ("--registry", "--list"):
        assert text in help_text


def test_python_dash_m_extract_writes_the_feature_file(
    small_manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "features" / "image.h5"
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "extract", "--model", "blip2-qformer", "--weights", "tiny"]
    command += ["--manifest", str(small_manifest), "--out", str(out), "--num-workers", "2"]
    finished = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert "wrote 4 image vectors" in finished.stdout
    assert read_features(out).vectors.shape[0] == 4
    assert not out.with_name(out.name + ".partial").exists()


def _bert_folder(folder: Path) -> BertModel:
    """A BERT-style checkpoint folder as `save_pretrained` writes one, with its tokenizer."""
    config = BertConfig(vocab_size=803, hidden_size=32, intermediate_size=64)
    config.update({"num_hidden_layers": 2, "num_attention_heads": 2, "initializer_range": 0.2})
    torch.manual_seed(0)
    model = BertModel(config).eval()
    model.save_pretrained(folder)
    shutil.copytree(MODEL_CONFIGS / "tiny-bert-zh-tokenizer", folder, dirs_exist_ok=True)
    return model


def _vit_folder(folder: Path) -> ViTModel:
    """A ViT-style checkpoint folder with its image processor's settings."""
    config = ViTConfig(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64)
    config.update({"num_hidden_layers": 2, "num_attention_heads": 2, "initializer_range": 0.2})
    torch.manual_seed(0)
    model = ViTModel(config).eval()
    model.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    ("name", "modality", "pooling"), [("my-bert", "text", "mean"), ("my-vit", "image", "cls")]
)
def test_user_registry_entry_extracts_from_a_saved_folder_with_no_code(
    name: str,
    modality: str,
    pooling: str,
    small_table: pd.DataFrame,
    small_manifest: Path,
    tmp_path: Path,
) -> None:
    # The entry names only a folder (relative to the YAML file), a modality and a pooling:
    # no loader, no width, no tiny config, no preprocessing.
    model = (_bert_folder if modality == "text" else _vit_folder)(tmp_path / "models" / name)
    registry = tmp_path / "my_encoders.yaml"
    registry.write_text(
        f"{name}:\n  source: models/{name}\n  modality: {modality}\n  pooling: {pooling}\n",
        encoding="utf-8",
    )
    out = tmp_path / "features" / f"{name}.h5"
    command = [sys.executable, "-m", "extract", "--registry", str(registry), "--model", name]
    command += ["--weights", "hub", "--manifest", str(small_manifest), "--out", str(out)]
    command += ["--num-workers", "0"]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    finished = subprocess.run(
        command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr

    features = read_features(out)
    provenance = features.provenance
    assert (provenance["encoder"], provenance["modality"]) == (name, modality)
    assert (provenance["pooling"], provenance["width"]) == (pooling, 32)
    assert provenance["weights_folder"] == str(tmp_path / "models" / name)
    assert provenance["registry_entry"] == str(registry)
    with torch.inference_mode():
        if modality == "text":
            report = small_table["report_text"][1]
            tokens = AutoTokenizer.from_pretrained(MODEL_CONFIGS / "tiny-bert-zh-tokenizer")(
                [report], return_tensors="pt"
            )
            expected = model(**tokens).last_hidden_state.mean(dim=1)[0]
            key = text_key(report)
        else:
            # The preprocessing came from the folder's preprocessor_config.json.
            assert provenance["preprocessing"]["interpolation"] == "bilinear"
            processor = ViTImageProcessorPil.from_pretrained(tmp_path / "models" / name)
            with Image.open(tmp_path / "images" / "b.png") as image:
                pixels = torch.as_tensor(np.asarray(processor(image)["pixel_values"]))
            expected = model(pixel_values=pixels).last_hidden_state[0, 0]
            key = features.sources["images/b.png"]
    stored = features.vectors[features.rows_of([key], name)][0]
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-4, rtol=1e-4)


def test_fuse_trains_on_features_of_user_registry_encoders(tmp_path: Path) -> None:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def run_module(*arguments: str) -> subprocess.CompletedProcess:
        finished = subprocess.run(
            [sys.executable, "-m", *arguments],
            cwd=REPO_ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert finished.returncode == 0, finished.stderr
        return finished

    demo = tmp_path / "demo"
    run_module("pipeline.demo", "--out", str(demo), "--patients", "30", "--images-per-report", "3")
    _bert_folder(tmp_path / "models" / "my-bert")
    _vit_folder(tmp_path / "models" / "my-vit")
    registry = tmp_path / "my_encoders.yaml"
    registry.write_text(
        "my-bert:\n  source: models/my-bert\n  modality: text\n  pooling: mean\n"
        "my-vit:\n  source: models/my-vit\n  modality: image\n  pooling: cls\n",
        encoding="utf-8",
    )
    manifest = str(demo / "manifest.csv")
    features = [str(tmp_path / "features" / f"{name}.h5") for name in ("my-vit", "my-bert")]
    for name, out in zip(("my-vit", "my-bert"), features, strict=True):
        run_module(
            "extract", "--registry", str(registry), "--model", name, "--weights", "hub",
            "--manifest", manifest, "--out", out, "--num-workers", "0",
        )  # fmt: skip

    run_module(
        "fuse", "protocol", "--manifest", manifest, "--features", *features,
        "--image-encoder", "my-vit", "--text-encoder", "my-bert", "--models", "M4", "M1", "M2",
        "--trials", "1", "--epochs", "2", "--warmup-epochs", "1", "--probes", "false",
        "--out", str(tmp_path / "protocol"),
    )  # fmt: skip

    predictions = read_predictions(tmp_path / "protocol", ("VCD", "GC"))
    rows = len(pd.read_csv(manifest))
    assert predictions.groupby("model").size().to_dict() == {"M1": rows, "M2": rows, "M4": rows}
    assert predictions["prob_GC"].between(0, 1).all()
