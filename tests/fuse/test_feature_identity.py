"""Fuse uses only vectors of this manifest's data, from files that agree on their weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.store import FeatureSet, read_features, write_features
from fuse.data import load_cached_rows
from pipeline.errors import UserError
from pipeline.keys import file_key, pair_key, text_key

CLASSES = ("VCD", "GC")
IMAGE, TEXT, PAIR = ("blip2-qformer", "image"), ("llama3", "text"), ("vilt", "pair")


def extract_synthetically(folder: Path, manifest: Path, name: str, modality: str, **extra) -> Path:
    """What extraction writes for `manifest`, with random vectors: keys, sources, provenance."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if modality == "image":
        sources = {path: file_key(folder / path) for path in table["image_path"]}
        keys = tuple(dict.fromkeys(sources.values()))
    elif modality == "pair":
        sources = {path: file_key(folder / path) for path in table["image_path"]}
        pairs = zip(table["image_path"], table["report_text"], strict=True)
        keys = tuple({pair_key(sources[path], text_key(report)): 0 for path, report in pairs})
    else:
        sources, keys = {}, tuple(dict.fromkeys(table["report_text"].map(text_key)))
    provenance = {
        "encoder": name,
        "modality": modality,
        "weights": "tiny",
        "dtype": "float32",
        "manifest": {"path": str(manifest), "sha256": file_key(manifest)},
        **extra,
    }
    vectors = np.random.default_rng(0).normal(size=(len(keys), 4)).astype(np.float32)
    return write_features(folder / f"{modality}.h5", FeatureSet(keys, vectors, provenance, sources))


@pytest.fixture
def study(tmp_path: Path) -> dict[str, Path]:
    """Six patients with two images and one report each, their images and feature files."""
    (tmp_path / "images").mkdir()
    rows = []
    for patient in range(6):
        for image in range(2):
            path = f"images/p{patient}_{image}.png"
            (tmp_path / path).write_bytes(f"image {patient} {image}".encode())
            rows.append(
                {
                    "image_path": path,
                    "report_text": f"报告 {patient}",
                    "label": CLASSES[patient % 2],
                    "patient_id": f"P{patient}",
                }
            )
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    image = extract_synthetically(tmp_path, manifest, *IMAGE)
    text = extract_synthetically(tmp_path, manifest, *TEXT)
    return {"folder": tmp_path, "manifest": manifest, "image": image, "text": text}


def load(study: dict[str, Path], manifest: Path | None = None, needed=(IMAGE, TEXT), **options):
    files = [study["image"], study["text"]]
    return load_cached_rows(manifest or study["manifest"], files, needed, CLASSES, **options)


def test_images_here_are_checked_by_content(study):
    data = load(study)
    assert len(data.table) == 12 and data.notes == ()
    (study["folder"] / "images" / "p1_0.png").write_bytes(b"another picture")
    with pytest.raises(UserError) as caught:
        load(study)
    assert str(caught.value) == (
        f"{study['image']} holds vectors of other images: 1 of this manifest's images have "
        "other content than when extracted, at line(s) 4 (first: images/p1_0.png); "
        "re-run extraction on these images"
    )


def test_pair_files_are_checked_by_content_too(study):
    pair = extract_synthetically(study["folder"], study["manifest"], *PAIR)
    data = load_cached_rows(study["manifest"], [pair], [PAIR], CLASSES)
    assert data.features[PAIR].shape == (12, 4)
    (study["folder"] / "images" / "p5_1.png").write_bytes(b"another picture")
    with pytest.raises(
        UserError, match=r"pair.h5 holds vectors of other images: 1 .* line\(s\) 13"
    ):
        load_cached_rows(study["manifest"], [pair], [PAIR], CLASSES)


def test_images_outside_the_image_root_are_not_read(study, tmp_path):
    (study["folder"] / "images" / "p1_0.png").write_bytes(b"another picture")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Not readable from this root, the image is trusted through the identical manifest.
    assert len(load(study, image_root=elsewhere).table) == 12


def test_an_unreadable_image_is_checked_by_path_not_a_traceback(study, deny_reading):
    deny_reading(study["folder"] / "images" / "p1_0.png")
    # Not readable, the image is trusted through the identical manifest, as if absent.
    assert len(load(study).table) == 12


def re_split(study: dict[str, Path]) -> Path:
    """The same data in a new file: splits assigned, one patient dropped, one row added."""
    table = pd.read_csv(study["manifest"], dtype=str, keep_default_na=False)
    table["split"] = table["patient_id"].map({"P0": "test", "P1": "test"}).fillna("train")
    table = table[table["patient_id"] != "P5"]
    added = {**table.iloc[0].to_dict(), "image_path": "images/p0_new.png"}
    table = pd.concat([table, pd.DataFrame([added])], ignore_index=True)
    path = study["folder"] / "resplit.csv"
    table.to_csv(path, index=False)
    return path


def test_without_images_a_re_split_subset_or_superset_of_the_same_data_works(study):
    shutil.rmtree(study["folder"] / "images")
    assert load(study).notes == ()  # the manifest extracted from, byte for byte
    data = load(study, re_split(study))
    assert len(data.table) == 10 and set(data.table["split"]) == {"train", "test"}
    assert data.notes == (
        f"{study['image']}: 1 of 11 pair(s) have no vector (not in the extracted manifest: 1), "
        "at line(s) 12; left out of every model",
    )


def test_without_images_other_data_at_the_same_paths_is_refused(study):
    shutil.rmtree(study["folder"] / "images")
    table = pd.read_csv(study["manifest"], dtype=str, keep_default_na=False)
    table.loc[[2, 3], "patient_id"] = "Q1"  # another hospital numbers its images alike
    other = study["folder"] / "other.csv"
    table.to_csv(other, index=False)
    with pytest.raises(UserError) as caught:
        load(study, other, needed=(IMAGE,))
    assert str(caught.value) == (
        f"{study['image']} was extracted from {study['manifest']}, where 2 of this manifest's "
        "image paths belong to another patient or report, at line(s) 4, 5 (first: "
        "images/p1_0.png): they are likely other images. Re-run extraction, or make the "
        "images reachable so their content is checked"
    )


def test_without_images_or_the_extracted_manifest_rows_are_matched_by_path_with_a_note(
    study, capsys
):
    shutil.rmtree(study["folder"] / "images")
    resplit = re_split(study)
    study["manifest"].unlink()
    data = load(study, resplit)
    assert data.notes[0] == (
        f"{study['image']}: 10 row(s) matched to their image vectors by path only: the images "
        f"are not here and this manifest differs from the one it was extracted from, "
        f"{study['manifest']}, which is not here unchanged; make the images reachable to "
        "check their content"
    )
    assert f"warning: {data.notes[0]}" in capsys.readouterr().err


def rewrite(path: Path, **changes) -> None:
    """Rewrite a feature file with other provenance entries or skipped items."""
    stored = read_features(path)
    skipped = changes.pop("skipped", stored.skipped)
    write_features(
        path,
        FeatureSet(
            stored.keys, stored.vectors, {**stored.provenance, **changes}, stored.sources, skipped
        ),
    )


def test_pairs_skipped_at_extraction_are_left_out_with_their_reasons(synthetic_cache):
    image = read_features(synthetic_cache["image"])
    gone = ["images/p000_0.png", "images/p000_1.png"]
    write_features(
        synthetic_cache["image"],
        FeatureSet(
            image.keys,
            image.vectors,
            image.provenance,
            {path: key for path, key in image.sources.items() if path not in gone},
            {gone[0]: "zero-byte", gone[1]: "truncated or undecodable"},
        ),
    )
    report = pd.read_csv(synthetic_cache["manifest"], dtype=str)["report_text"].iloc[8]
    text = read_features(synthetic_cache["text"])
    kept = [row for row, key in enumerate(text.keys) if key != text_key(report)]
    write_features(
        synthetic_cache["text"],
        FeatureSet(
            tuple(text.keys[row] for row in kept),
            text.vectors[kept],
            text.provenance,
            skipped={f"{text_key(report)} {report[:40]}": "empty"},
        ),
    )
    paths = [synthetic_cache["image"], synthetic_cache["text"]]
    data = load_cached_rows(synthetic_cache["manifest"], paths, (IMAGE, TEXT), CLASSES)
    assert len(data.table) == 240 - 2 - 4
    assert not set(gone) & set(data.table["image_path"])
    assert "P002" not in set(data.table["patient_id"])  # the patient of the empty report
    assert data.features[IMAGE].shape == (234, 12) and data.features[TEXT].shape == (234, 20)
    assert data.notes[-2:] == (
        f"{synthetic_cache['image']}: 2 of 240 pair(s) have no vector (zero-byte: 1, truncated "
        "or undecodable: 1), at line(s) 2, 3; left out of every model",
        f"{synthetic_cache['text']}: 4 of 240 pair(s) have no vector (empty: 4), at line(s) "
        "10, 11, 12, 13; left out of every model",
    )


def test_no_pair_with_every_vector_is_refused(synthetic_cache):
    table = pd.read_csv(synthetic_cache["manifest"], dtype=str, keep_default_na=False)
    table["report_text"] = "another data set's report"
    table.to_csv(synthetic_cache["manifest"], index=False)
    paths = [synthetic_cache["image"], synthetic_cache["text"]]
    with pytest.raises(UserError, match="no pair of .* has a vector in every feature file"):
        load_cached_rows(synthetic_cache["manifest"], paths, (IMAGE, TEXT), CLASSES)


WEIGHTS_CASES = [
    # (image provenance, text provenance, options, error or None)
    ({"weights": "tiny"}, {"weights": "tiny"}, {}, None),
    ({"weights": "hub"}, {"weights": "/models/llama"}, {}, None),
    (
        {"weights": "tiny"},
        {"weights": "/models/llama"},
        {},
        "feature files mix tiny (random, for tests) and real weights: {image} "
        "(blip2-qformer): tiny; {text} (llama3): folder /models/llama. "
        "Extract them all with one kind",
    ),
    (
        {"weights": "tiny"},
        {"weights": "tiny"},
        {"expect_weights": "real"},
        "this run expects real weights: {image} (blip2-qformer): tiny; {text} (llama3): tiny",
    ),
    ({"weights": "hub"}, {"weights": "hub"}, {"expect_weights": "real"}, None),
    (
        {"weights": "hub"},
        {},
        {"expect_weights": "real"},
        "this run expects real weights: {text} (llama3): not recorded",
    ),
    (
        {"dtype": "float16"},
        {"dtype": "bfloat16"},
        {"expect_dtype": "float16"},
        "this run expects features extracted in float16: {text}: bfloat16",
    ),
    (
        {"weights": "hub", "source": "S/blip2", "weights_fingerprint": "a" * 64},
        {"weights": "/m", "source": "S/blip2", "weights_fingerprint": "b" * 64},
        {},
        "feature files of S/blip2 come from different checkpoints (weights fingerprints "
        "{image}: aaaaaaaaaaaa; {text}: bbbbbbbbbbbb); extract them from one",
    ),
    (
        {"weights": "hub", "source": "S/blip2", "weights_fingerprint": "a" * 64},
        {"weights": "/m", "source": "S/blip2", "weights_fingerprint": "a" * 64},
        {},
        None,
    ),
]


@pytest.mark.parametrize(("image", "text", "options", "error"), WEIGHTS_CASES)
def test_weights_kind_dtype_and_checkpoint_agree(synthetic_cache, image, text, options, error):
    rewrite(synthetic_cache["image"], **image)
    rewrite(synthetic_cache["text"], **text)
    paths = [synthetic_cache["image"], synthetic_cache["text"]]
    if error is None:
        load_cached_rows(synthetic_cache["manifest"], paths, (IMAGE, TEXT), CLASSES, **options)
        return
    with pytest.raises(UserError) as caught:
        load_cached_rows(synthetic_cache["manifest"], paths, (IMAGE, TEXT), CLASSES, **options)
    assert str(caught.value) == error.format(
        image=synthetic_cache["image"], text=synthetic_cache["text"]
    )


def test_a_patient_with_two_labels_needs_labels_per_exam(study):
    table = pd.read_csv(study["manifest"], dtype=str, keep_default_na=False)
    table.loc[1, ["report_text", "label"]] = ["报告 0 复查", "GC"]  # a second exam of P0
    table.to_csv(study["manifest"], index=False)
    extract_synthetically(study["folder"], study["manifest"], *TEXT)
    with pytest.raises(UserError, match="a patient has two labels"):
        load(study)
    assert load(study, labels_per_exam=True).labels.tolist()[:2] == [0, 1]
