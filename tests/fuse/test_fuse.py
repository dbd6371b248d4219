import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cache.store import FeatureSet, read_features, write_features
from fuse.run import FuseConfig, run
from pipeline.errors import UserError

REPO = Path(__file__).parents[2]


def config_for(files: dict[str, Path], out: Path, **overrides) -> FuseConfig:
    settings = {"epochs": 8, "learning_rate": 1e-3, "warmup_epochs": 1, **overrides}
    return FuseConfig(
        manifest=str(files["manifest"]),
        image_features=str(files["image"]),
        text_features=str(files["text"]),
        metrics=str(out / "metrics.json"),
        plots=str(out),
        models=str(out / "models"),
        **settings,
    )


def test_run_writes_metrics_curves_and_heads(synthetic_cache, tmp_path):
    metrics = run(config_for(synthetic_cache, tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    for variant in ("fusion", "image", "report"):
        for split in ("test", "external"):
            assert set(written[variant][split]) >= {
                "accuracy",
                "precision",
                "recall",
                "f1",
                "auc",
                "recall_VCD",
                "recall_GC",
            }
            roc = pd.read_csv(tmp_path / "out" / "roc" / f"{split}_{variant}.csv")
            assert list(roc.columns) == ["fpr", "tpr"] and roc["tpr"].iloc[-1] == 1.0
        head = torch.load(tmp_path / "out" / "models" / f"head_{variant}.pt", weights_only=False)
        assert head["variant"] == variant and 1 <= head["best_epoch"] <= 8
        assert head["feature_provenance"]["text"]["encoder"] == "llama3"
    # Separable synthetic features: every head must learn something.
    assert all(written[variant]["test"]["auc"] > 0.8 for variant in written)
    assert (tmp_path / "out" / "roc.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "models" / "fuse_config.yaml").is_file()


def test_same_seed_same_result_other_seed_other_result(synthetic_cache, tmp_path):
    first = run(config_for(synthetic_cache, tmp_path / "a", variants=("fusion",)))
    again = run(config_for(synthetic_cache, tmp_path / "b", variants=("fusion",)))
    other = run(config_for(synthetic_cache, tmp_path / "c", variants=("fusion",), seed=1))
    assert first == again
    assert first != other


def test_image_only_head_ignores_the_report(synthetic_cache, tmp_path):
    run(config_for(synthetic_cache, tmp_path, variants=("image",), epochs=1))
    head = torch.load(tmp_path / "models" / "head_image.pt", weights_only=False)
    assert not any(name.startswith("text") for name in head["state_dict"])


def test_features_with_other_pooling_are_refused(synthetic_cache, tmp_path):
    text = read_features(synthetic_cache["text"])
    write_features(
        synthetic_cache["text"],
        FeatureSet(text.keys, text.vectors, {**text.provenance, "pooling": "last"}),
    )
    with pytest.raises(
        UserError, match="pooling is 'last' in the file but this run asks for 'mean'"
    ):
        run(config_for(synthetic_cache, tmp_path))


def test_image_missing_from_the_feature_file(synthetic_cache, tmp_path):
    table = pd.read_csv(synthetic_cache["manifest"], dtype=str, keep_default_na=False)
    table.loc[0, "image_path"] = "images/new.png"
    table.to_csv(synthetic_cache["manifest"], index=False)
    with pytest.raises(UserError, match="no vector for 1 image.*images/new.png"):
        run(config_for(synthetic_cache, tmp_path))


def test_cli_trains_and_reports_user_errors(synthetic_cache, tmp_path):
    out = tmp_path / "out"
    arguments = [
        sys.executable,
        "-m",
        "fuse",
        "--manifest",
        str(synthetic_cache["manifest"]),
        "--image-features",
        str(synthetic_cache["image"]),
        "--text-features",
        str(synthetic_cache["text"]),
        "--metrics",
        str(out / "metrics.json"),
        "--plots",
        str(out),
        "--models",
        str(out / "m"),
        "--epochs",
        "2",
        "--variants",
        "fusion",
    ]
    result = subprocess.run(arguments, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(json.loads((out / "metrics.json").read_text())) == {"fusion"}
    wrong = subprocess.run(
        [*arguments, "--text-encoder", "qwen"], cwd=REPO, capture_output=True, text=True
    )
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("error: ") and "Traceback" not in wrong.stderr
    assert "encoder is 'llama3' in the file but this run asks for 'qwen'" in wrong.stderr


def test_heads_keep_the_train_statistics_they_were_standardised_with(synthetic_cache, tmp_path):
    run(config_for(synthetic_cache, tmp_path, variants=("fusion",), epochs=1))
    head = torch.load(tmp_path / "models" / "head_fusion.pt", weights_only=False)
    image_statistics = head["standardisation"]["image"]
    assert image_statistics["mean"].shape == image_statistics["sd"].shape == (12,)
    assert (image_statistics["sd"] > 0).all()
    run(
        config_for(
            synthetic_cache, tmp_path / "raw", variants=("fusion",), epochs=1, standardise=False
        )
    )
    raw = torch.load(tmp_path / "raw" / "models" / "head_fusion.pt", weights_only=False)
    assert raw["standardisation"] is None
