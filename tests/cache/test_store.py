from pathlib import Path

import h5py
import numpy as np
import pytest

import cache.store as store
from cache.store import FeatureSet, check_provenance, read_features, read_provenance, write_features
from pipeline.errors import UserError

GOLDEN_V1 = Path(__file__).parents[1] / "data" / "features_v1.h5"


def example() -> FeatureSet:
    return FeatureSet(
        keys=("k1", "k2"),
        vectors=np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32),
        provenance={"encoder": "llama3", "modality": "text", "pooling": "mean", "言": "中文"},
        sources={"a.png": "k1", "b.png": "k1"},
    )


def test_round_trip(tmp_path):
    path = write_features(tmp_path / "f.h5", example())
    back = read_features(path)
    assert back.keys == ("k1", "k2")
    np.testing.assert_array_equal(back.vectors, example().vectors)
    assert back.provenance == example().provenance
    assert back.sources == {"a.png": "k1", "b.png": "k1"}
    assert read_provenance(path)["encoder"] == "llama3"
    assert not (tmp_path / "f.h5.partial").exists()


def test_golden_version_1_file_still_reads():
    features = read_features(GOLDEN_V1)
    assert features.keys == ("a" * 64, "b" * 64, "c" * 64)
    np.testing.assert_array_equal(features.vectors, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert features.provenance["note"] == "报告 ok"
    assert features.sources["images/y.png"] == "a" * 64


def test_crash_while_writing_leaves_no_complete_looking_file(tmp_path, monkeypatch):
    target = tmp_path / "f.h5"
    write_features(target, example())
    before = target.read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store.json, "dumps", fail)
    with pytest.raises(RuntimeError):
        write_features(target, example())
    assert target.read_bytes() == before  # the old complete file is untouched
    assert not (tmp_path / "f.h5.partial").exists()  # built in memory: nothing half-written
    with h5py.File(target, "a") as handle:  # as a writer that stopped before marking it
        handle.attrs["complete"] = False
    with pytest.raises(UserError, match="not completely written"):
        read_features(target)


def test_newer_format_version_says_upgrade(tmp_path):
    path = write_features(tmp_path / "f.h5", example())
    with h5py.File(path, "a") as handle:
        handle.attrs["format_version"] = store.FORMAT_VERSION + 1
    with pytest.raises(UserError, match="newer than this version.*upgrade"):
        read_features(path)


def test_not_a_feature_file(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["x"] = [1]
    with pytest.raises(UserError, match="is not a vlmf-features file"):
        read_features(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(UserError, match="not a readable HDF5"):
        read_features(tmp_path / "text.h5")
    with pytest.raises(UserError, match="does not exist; run extraction"):
        read_features(tmp_path / "absent.h5")


def test_provenance_mismatch_names_each_difference():
    with pytest.raises(UserError) as error:
        check_provenance(
            "img.h5",
            {"encoder": "clip", "modality": "image", "pooling": "first"},
            {"encoder": "blip2-qformer", "modality": "image", "pooling": "mean"},
        )
    message = str(error.value)
    assert "encoder is 'clip' in the file but this run asks for 'blip2-qformer'" in message
    assert "pooling is 'first'" in message and "modality" not in message


def test_rows_of_finds_rows_and_names_missing_keys():
    features = example()
    assert features.rows_of(["k2", "k1", "k2"], "x").tolist() == [1, 0, 1]
    with pytest.raises(UserError, match="text.h5: 1 item"):
        features.rows_of(["k3"], "text.h5")


def test_feature_set_checks_its_shape():
    with pytest.raises(ValueError, match="vectors must be"):
        FeatureSet(keys=("a",), vectors=np.zeros((2, 3)), provenance={})
    with pytest.raises(ValueError, match="unique"):
        FeatureSet(keys=("a", "a"), vectors=np.zeros((2, 3)), provenance={})


def test_skipped_items_round_trip_and_are_optional(tmp_path):
    skipped = {"images/empty.png": "zero-byte", "ab12 报告": "control characters"}
    features = FeatureSet(**{**vars(example()), "skipped": skipped})
    assert read_features(write_features(tmp_path / "f.h5", features)).skipped == skipped
    assert read_features(write_features(tmp_path / "g.h5", example())).skipped == {}
    assert read_features(GOLDEN_V1).skipped == {}  # files of format 1 without the group


def test_equal_content_is_written_as_equal_bytes(tmp_path):
    # No timestamps in the file: a rerun that writes the same vectors changes no byte.
    first = write_features(tmp_path / "first.h5", example()).read_bytes()
    assert write_features(tmp_path / "again.h5", example()).read_bytes() == first


def _with_vectors(path, vectors):
    with h5py.File(path, "a") as handle:
        del handle["features/vectors"]
        handle["features/vectors"] = vectors


def test_non_finite_vectors_are_refused_naming_the_count_and_the_first_key(tmp_path):
    path = write_features(tmp_path / "f.h5", example())
    _with_vectors(path, np.array([[1.0, np.nan], [np.inf, 4.0]], dtype=np.float32))
    with pytest.raises(UserError, match=r"f\.h5: 2 vector\(s\) hold NaN or inf \(first: k1, k2\)"):
        read_features(path)


def test_non_finite_vectors_are_never_written(tmp_path):
    with pytest.raises(UserError, match=r"clip: 1 vector\(s\) hold NaN or inf \(first: b.png\)"):
        store.check_finite(["a.png", "b.png"], np.array([[0.0], [np.nan]]), "clip")


@pytest.mark.parametrize("dataset", ["features/keys", "features/vectors"])
def test_a_missing_dataset_is_one_line_naming_the_file(tmp_path, dataset):
    path = write_features(tmp_path / "f.h5", example())
    with h5py.File(path, "a") as handle:
        del handle[dataset]
    with pytest.raises(UserError, match=rf"f\.h5 lacks dataset\(s\) {dataset}: the file is dam"):
        read_features(path)


def test_keys_and_vectors_of_different_lengths_are_a_damaged_file(tmp_path):
    path = write_features(tmp_path / "f.h5", example())
    _with_vectors(path, np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(UserError, match=r"f\.h5 is damaged \(vectors must be"):
        read_features(path)


@pytest.mark.parametrize("kept", [0.3, 0.6, 0.9, 0.99])
def test_a_file_cut_short_is_one_line_naming_the_file_and_the_rerun(tmp_path, kept):
    whole = write_features(tmp_path / "f.h5", example()).read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(whole[: int(len(whole) * kept)])
    with pytest.raises(UserError) as refused:
        read_features(cut)
    assert str(refused.value).startswith(f"{cut} ")
    assert "re-run extraction" in str(refused.value) and "\n" not in str(refused.value)


def test_a_folder_given_as_a_feature_file_is_named_a_folder(tmp_path):
    with pytest.raises(UserError, match=f"feature file {tmp_path} is a folder; give the .h5"):
        read_features(tmp_path)
