"""A complete feature file of another encoder, modality or data is never replaced by a
typo: only --overwrite true replaces it. An --out that is a folder is refused at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from cache.store import read_features
from extract.run import ExtractConfig, run
from pipeline.errors import UserError


def _config(model: str, manifest: Path, out: Path, **overrides) -> ExtractConfig:
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


def test_an_out_that_is_a_folder_is_refused_before_any_work(
    small_manifest: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=f"--out {tmp_path} is a folder; give the feature file"):
        run(_config("llama3", small_manifest, tmp_path))
