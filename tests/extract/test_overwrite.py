"""A complete feature file of another encoder, modality or data is never replaced by a
typo: only --overwrite true replaces it. An --out folder gets FOLDER/<model>.h5."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from cache.store import read_features
from extract.run import ExtractConfig, run
from pipeline.errors import UserError


def _config(model: str | tuple[str, ...], manifest: Path, out: Path, **overrides) -> ExtractConfig:
    return ExtractConfig(
        model=model, manifest=str(manifest), out=str(out), num_workers=0, **overrides
    )


def test_a_file_of_another_encoder_is_kept_unless_overwrite(
    small_manifest: Path, tmp_path: Path
) -> None:
    out = run(_config("llama3", small_manifest, tmp_path / "f.h5"))
    before = out.read_bytes()
    with pytest.raises(UserError) as refused:
        run(_config("blip2-qformer", small_manifest, out))
    message = str(refused.value)
    assert f"--out {out} is a complete feature file of encoder 'llama3' (this run: " in message
    assert "modality 'text' (this run: 'image')" in message and "--overwrite true" in message
    assert out.read_bytes() == before
    replaced = read_features(run(_config("blip2-qformer", small_manifest, out, overwrite=True)))
    assert replaced.provenance["encoder"] == "blip2-qformer"


def test_a_file_of_other_data_is_kept_unless_overwrite(
    small_table: pd.DataFrame,
    write_manifest: Callable[[pd.DataFrame], Path],
    tmp_path: Path,
) -> None:
    out = run(_config("llama3", write_manifest(small_table.iloc[:1]), tmp_path / "f.h5"))
    other = write_manifest(small_table.iloc[1:3])  # other reports only
    with pytest.raises(UserError, match="vectors of other data .*--overwrite true"):
        run(_config("llama3", other, out))
    # the same data grown (or another pooling) is still updated without asking
    assert len(read_features(run(_config("llama3", write_manifest(small_table), out))).keys) == 3


def test_an_out_folder_gets_one_file_per_model_and_an_h5_file_takes_one_model(
    small_manifest: Path, tmp_path: Path
) -> None:
    assert run(_config("llama3", small_manifest, tmp_path)) == tmp_path
    assert read_features(tmp_path / "llama3.h5").provenance["encoder"] == "llama3"
    with pytest.raises(UserError, match=r"--out .*f\.h5 names one feature file, but 2 models"):
        run(_config(("llama3", "clip-text"), small_manifest, tmp_path / "f.h5"))
    assert not (tmp_path / "f.h5").exists()
