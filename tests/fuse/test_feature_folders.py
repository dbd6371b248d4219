"""--features takes folders: a folder means every *.h5 file directly inside it, sorted."""

import shutil

import pytest
import torch

from fuse.data import expand_feature_paths, load_cached_rows
from pipeline.errors import UserError

NEEDED = [("blip2-qformer", "image"), ("llama3", "text")]


def test_a_folder_is_its_feature_files_in_name_order(synthetic_cache, tmp_path):
    folder = tmp_path / "features"
    folder.mkdir()
    for name in ("text", "image"):
        shutil.move(synthetic_cache[name], folder / f"{name}.h5")
    (folder / "image.h5.parts").mkdir()  # a resumable run's parts: not features
    shutil.copy(folder / "image.h5", folder / "image.h5.parts" / "0001.h5")
    (folder / "text.h5.lock").write_text("")
    (folder / "text.h5.partial").write_text("")
    (folder / "notes.txt").write_text("")
    other = tmp_path / "other.h5"

    assert expand_feature_paths([folder]) == [folder / "image.h5", folder / "text.h5"]
    assert expand_feature_paths([other, folder / "text.h5"]) == [other, folder / "text.h5"]
    from_folder = load_cached_rows(synthetic_cache["manifest"], [folder], NEEDED, ("VCD", "GC"))
    from_files = load_cached_rows(
        synthetic_cache["manifest"],
        [folder / "text.h5", str(folder / "image.h5")],
        NEEDED,
        ("VCD", "GC"),
    )
    assert from_folder.paths == from_files.paths
    for feature in NEEDED:
        assert torch.equal(from_folder.features[feature], from_files.features[feature])


def test_a_folder_without_feature_files_is_refused(synthetic_cache, tmp_path):
    empty = tmp_path / "features"
    empty.mkdir()
    (empty / "image.h5.parts").mkdir()
    with pytest.raises(UserError, match=f"feature folder {empty} holds no \\*.h5 file"):
        load_cached_rows(
            synthetic_cache["manifest"], [synthetic_cache["text"], empty], NEEDED, ("VCD", "GC")
        )
