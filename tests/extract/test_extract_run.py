"""run(): one vector per unique content, sources, provenance, weight sources, errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from huggingface_hub import constants as hub_constants
from PIL import Image

from cache.store import read_features, read_provenance
from extract.__main__ import main
from extract.loaders import load_encoder
from extract.preprocess import image_transform
from extract.registry import built_in_entry, get_spec
from extract.run import ExtractConfig, run
from pipeline.errors import UserError
from pipeline.keys import KEY_SCHEMES, file_key, pair_key, text_key
from pipeline.manifest import image_file

PROVENANCE_FIELDS = (
    "encoder",
    "modality",
    "source",
    "weights",
    "weights_fingerprint",
    "model_config",
    "pooling",
    "dtype",
    "preprocessing",
    "width",
    "key_scheme",
    "package_versions",
    "created_utc",
    "extract_config",
    "manifest",
)


def _config(model: str, manifest: Path, out: Path, **overrides) -> ExtractConfig:
    # num_workers=0: worker start-up would dominate a 6-image test (the CLI test uses workers).
    return ExtractConfig(
        model=model, manifest=str(manifest), out=str(out), batch_size=2, num_workers=0, **overrides
    )


def _image_key(manifest: Path, path: str) -> str:
    return file_key(image_file(manifest, path))


def _expected_keys(model: str, table: pd.DataFrame, manifest: Path) -> set[str]:
    modality = get_spec(model).modality
    if modality == "image":
        return {_image_key(manifest, path) for path in table["image_path"]}
    if modality == "pair":
        return {
            pair_key(_image_key(manifest, path), text_key(report))
            for path, report in zip(table["image_path"], table["report_text"], strict=True)
        }
    return {text_key(report) for report in table["report_text"]}


UNIQUE_ITEMS = {"image": 4, "text": 3, "pair": 6}  # of the small manifest (see conftest)


@pytest.mark.parametrize("model", ["blip2-qformer", "llama3", "vilt"])
def test_run_writes_one_vector_per_unique_content(
    model: str, small_table: pd.DataFrame, small_manifest: Path, tmp_path: Path
) -> None:
    first = run(_config(model, small_manifest, tmp_path / "first.h5"))
    again = run(_config(model, small_manifest, tmp_path / "again.h5"))

    features = read_features(first)
    spec = get_spec(model)
    assert set(features.keys) == _expected_keys(model, small_table, small_manifest)
    assert len(features.keys) == UNIQUE_ITEMS[spec.modality]
    assert features.vectors.dtype == np.float32
    assert features.vectors.shape == (len(features.keys), features.provenance["width"])
    repeated = read_features(again)
    assert repeated.keys == features.keys
    np.testing.assert_array_equal(repeated.vectors, features.vectors)

    if spec.modality in ("image", "pair"):
        assert features.sources == {
            path: file_key(image_file(small_manifest, path)) for path in small_table["image_path"]
        }
        assert features.sources["images/copy.png"] == features.sources["images/a.png"]
    else:
        assert features.sources == {}

    provenance = features.provenance
    assert all(name in provenance for name in PROVENANCE_FIELDS)
    assert provenance["encoder"] == model
    assert provenance["modality"] == spec.modality
    assert provenance["pooling"] == spec.pooling
    assert provenance["key_scheme"] == KEY_SCHEMES[spec.modality]
    assert provenance["source"] == spec.source
    assert provenance["weights"] == "tiny"
    assert provenance["manifest"]["sha256"] == file_key(small_manifest)
    assert provenance["extract_config"]["model"] == [model]  # as a run of it alone
    assert set(provenance["package_versions"]) >= {"torch", "transformers", "accelerate"}


def test_pooling_override_is_recorded(small_manifest: Path, tmp_path: Path) -> None:
    out = run(_config("blip2-qformer", small_manifest, tmp_path / "f.h5", pooling="first"))
    assert read_provenance(out)["pooling"] == "first"


@pytest.mark.parametrize("model", ["blip2-qformer", "llama3", "blip2-vit", "clip-text", "vilt"])
def test_folder_weights_give_the_tiny_vectors(
    model: str, small_manifest: Path, tmp_path: Path
) -> None:
    tiny = load_encoder(get_spec(model), "tiny", torch.device("cpu"), torch.float32)
    folder = tmp_path / "checkpoint"
    tiny.model.save_pretrained(folder)
    if tiny.tokenizer is not None:
        tiny.tokenizer.save_pretrained(folder)

    from_tiny = read_features(run(_config(model, small_manifest, tmp_path / "tiny.h5")))
    from_folder = read_features(
        run(_config(model, small_manifest, tmp_path / "folder.h5", weights=str(folder)))
    )
    assert from_folder.keys == from_tiny.keys
    np.testing.assert_allclose(from_folder.vectors, from_tiny.vectors, atol=1e-6, rtol=0)
    assert from_folder.provenance["weights"] == str(folder)
    assert from_folder.provenance["weights_folder"] == str(folder)


def _cli(model: str, manifest: Path, out: Path, *flags: str) -> list[str]:
    return ["--model", model, "--manifest", str(manifest), "--out", str(out), *flags]


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hugging Face cache with nothing in it, whatever this machine has cached."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def test_hub_weights_not_cached_fail_naming_the_hub_id(
    small_manifest: Path, tmp_path: Path, empty_hub_cache: None, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(_cli("llama3", small_manifest, tmp_path / "f.h5", "--weights", "hub"))
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert get_spec("llama3").source in message
    assert "--weights /path/to/downloaded/folder" in message
    assert not (tmp_path / "f.h5").exists()


def _without_patient(table: pd.DataFrame) -> pd.DataFrame:
    # not the label: encoders never read it, so data without labels can be extracted
    return table.drop(columns="patient_id")


def _with_empty_report(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(report_text=["", *table["report_text"][1:]])


def _with_missing_image(table: pd.DataFrame) -> pd.DataFrame:
    return table.assign(image_path=["images/absent.png", *table["image_path"][1:]])


@pytest.mark.parametrize(
    ("model", "break_manifest", "expected"),
    [
        ("llama3", _without_patient, "missing column(s) patient_id"),
        ("llama3", _with_empty_report, "column 'report_text': empty value"),
        ("blip2-qformer", _with_missing_image, "column 'image_path': image file not found"),
    ],
)
def test_bad_manifest_is_reported_before_any_encoder_loads(
    model: str,
    break_manifest: Callable[[pd.DataFrame], pd.DataFrame],
    expected: str,
    small_table: pd.DataFrame,
    write_manifest: Callable[[pd.DataFrame], Path],
    tmp_path: Path,
    empty_hub_cache: None,
    capsys: pytest.CaptureFixture,
) -> None:
    # With --weights hub and an empty cache, loading any encoder would fail: getting the
    # manifest's error instead proves validation comes first.
    manifest = write_manifest(break_manifest(small_table))
    with pytest.raises(SystemExit) as exited:  # --strict: a missing image is not skipped
        main(_cli(model, manifest, tmp_path / "f.h5", "--weights", "hub", "--strict", "true"))
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert expected in message
    assert get_spec(model).source not in message
    assert message.count("\n") == 1


def test_reports_are_encoded_without_the_images(
    small_table: pd.DataFrame, write_manifest: Callable[[pd.DataFrame], Path], tmp_path: Path
) -> None:
    manifest = write_manifest(_with_missing_image(small_table))
    assert read_features(run(_config("llama3", manifest, tmp_path / "text.h5"))).keys


def test_pooling_must_suit_the_loader(small_manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--pooling last: blip2-qformer is a blip2-qformer encoder"):
        run(_config("blip2-qformer", small_manifest, tmp_path / "f.h5", pooling="last"))


def test_unknown_model_lists_the_available_names(
    small_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(_cli("vilt-large", small_manifest, tmp_path / "f.h5"))
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert "unknown encoder 'vilt-large'" in message
    assert "blip2-qformer" in message and "llama3" in message


def test_params_section_configures_the_run(small_manifest: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "extract_text:\n  model: llama3\n  weights: tiny\n  batch_size: 2\n", encoding="utf-8"
    )
    out = main(
        [
            "--params",
            str(params),
            "--section",
            "extract_text",
            "--manifest",
            str(small_manifest),
            "--out",
            str(tmp_path / "text.h5"),
        ]
    )
    provenance = read_provenance(out)
    assert provenance["encoder"] == "llama3"
    assert provenance["extract_config"]["batch_size"] == 2


def test_half_precision_on_cpu_is_refused(small_manifest: Path, tmp_path: Path) -> None:
    config = dataclasses.replace(
        _config("llama3", small_manifest, tmp_path / "f.h5"), device="cpu", dtype="float16"
    )
    with pytest.raises(UserError, match="needs a GPU"):
        run(config)


def test_pair_vectors_are_read_back_by_image_and_report(
    small_table: pd.DataFrame, small_manifest: Path, tmp_path: Path
) -> None:
    # What a reader does without the images: image_path -> image key from the file's
    # sources, the report's key from its text, the pair's key from both.
    features = read_features(run(_config("vilt", small_manifest, tmp_path / "vilt.h5")))
    assert features.provenance["modality"] == "pair"
    assert features.provenance["key_scheme"] == KEY_SCHEMES["pair"]
    keys = [
        pair_key(features.sources[path], text_key(report))
        for path, report in zip(small_table["image_path"], small_table["report_text"], strict=True)
    ]
    vectors = features.vectors[features.rows_of(keys, "vilt.h5")]

    # Row 4 pairs image a with report 1; encoded alone it gives the stored vector.
    encoder = load_encoder(get_spec("vilt"), "tiny", torch.device("cpu"), torch.float32)
    image = image_transform(encoder.preprocessing)
    with Image.open(image_file(small_manifest, "images/a.png")) as picture:
        pixels = image(picture)[None]
    with torch.inference_mode():
        alone = encoder.encode((pixels, [small_table["report_text"][4].strip()]))
    np.testing.assert_allclose(vectors[4], alone[0].numpy(), atol=1e-5, rtol=1e-5)
    # The same image with another report is another vector.
    assert not np.allclose(vectors[4], vectors[0])
    # A copy of image a (row 5) is keyed by content: the pair (a, report 2).
    assert keys[5] == pair_key(
        features.sources["images/a.png"], text_key(small_table["report_text"][5])
    )


def test_tiny_weights_for_an_entry_without_tiny_config_say_what_to_pass(
    small_manifest: Path, tmp_path: Path
) -> None:
    registry = tmp_path / "mine.yaml"
    registry.write_text("my-bert:\n  source: some/bert\n  modality: text\n  pooling: mean\n")
    config = _config("my-bert", small_manifest, tmp_path / "f.h5", registry=str(registry))
    with pytest.raises(
        UserError, match="has no tiny_config, which --weights tiny needs: pass --weights hub"
    ):
        run(config)


def test_an_entry_s_width_is_checked_against_its_source_folder(
    small_manifest: Path, tmp_path: Path
) -> None:
    tiny = load_encoder(get_spec("llama3"), "tiny", torch.device("cpu"), torch.float32)
    tiny.model.save_pretrained(tmp_path / "llm")
    tiny.tokenizer.save_pretrained(tmp_path / "llm")
    registry = tmp_path / "mine.yaml"
    registry.write_text(
        "my-llm:\n  source: llm\n  modality: text\n  loader: decoder-text\n"
        "  pooling: last\n  width: 4096\n"
    )
    config = _config(
        "my-llm", small_manifest, tmp_path / "f.h5", registry=str(registry), weights="hub"
    )
    with pytest.raises(
        UserError, match="gives 64-d vectors but .*mine.yaml, encoder 'my-llm' says 4096"
    ):
        run(config)


def test_a_broken_user_entry_leaves_the_others_usable_with_a_warning(
    small_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    entries = {"my-llama": built_in_entry("llama3"), "broken": {"modality": "text"}}
    registry = tmp_path / "mine.yaml"
    registry.write_text(yaml.safe_dump(entries, allow_unicode=True), encoding="utf-8")
    out = run(_config("my-llama", small_manifest, tmp_path / "f.h5", registry=str(registry)))
    assert read_provenance(out)["encoder"] == "my-llama"
    err = capsys.readouterr().err.splitlines()
    (warning,) = [line for line in err if line.startswith("warning")]
    assert warning.startswith(f"warning: skipped a registry entry: {registry}, encoder 'broken'")


def test_images_outside_the_manifest_folder_need_an_image_root(
    small_table: pd.DataFrame, tmp_path: Path
) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    manifest = lists / "manifest.csv"
    small_table.assign(image_path="../" + small_table["image_path"]).to_csv(manifest, index=False)
    out = tmp_path / "image.h5"
    with pytest.raises(UserError, match=r"outside the image root"):
        run(_config("blip2-qformer", manifest, out))

    run(_config("blip2-qformer", manifest, out, image_root=str(tmp_path)))

    assert len(read_features(out).keys) == UNIQUE_ITEMS["image"]
