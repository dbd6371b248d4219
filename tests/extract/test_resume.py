"""Extraction loses nothing: killed runs resume, finished outputs are left alone, new rows
cost only their new items, and work of another encoder configuration is never reused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.store import FeatureSet, read_features
from extract.run import ExtractConfig, run
from pipeline.fault_hook import ENVIRONMENT_VARIABLE

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES = 4  # unique image contents of the manifest below; batch size 1: one part each


@pytest.fixture
def manifest(small_table: pd.DataFrame, write_manifest: Callable[[pd.DataFrame], Path]) -> Path:
    """Five rows, four unique images (a, b, c, d; a twice), three unique reports."""
    return write_manifest(small_table.iloc[:5])


def _command(manifest: Path, out: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "extract", "--model", "blip2-qformer", "--weights", "tiny",
        "--manifest", str(manifest), "--out", str(out), "--batch-size", "1",
        "--num-workers", "0", *flags,
    ]  # fmt: skip


def _config(manifest: Path, out: Path, **overrides) -> ExtractConfig:
    """In-process, the same settings as _command."""
    settings = {"model": "blip2-qformer", "batch_size": 1, "num_workers": 0, **overrides}
    return ExtractConfig(manifest=str(manifest), out=str(out), **settings)


def _extract(
    manifest: Path, out: Path, *flags: str, kill_at: str = ""
) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), ENVIRONMENT_VARIABLE: kill_at}
    return subprocess.run(
        _command(manifest, out, *flags),
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_same_vectors(features: FeatureSet, reference: FeatureSet) -> None:
    assert features.keys == reference.keys
    np.testing.assert_array_equal(features.vectors, reference.vectors)
    assert features.sources == reference.sources
    assert features.skipped == reference.skipped
    differs = {"created_utc", "run", "extract_config"}
    assert {k: v for k, v in features.provenance.items() if k not in differs} == {
        k: v for k, v in reference.provenance.items() if k not in differs
    }


@pytest.mark.parametrize(
    ("kill_at", "parts_left"),
    [
        ("batch:2", 1),  # batch 2 encoded, its part not written: one part survives
        ("part-write:3", 2),  # part 3 written to its temporary file, not renamed
        ("consolidate:1", IMAGES),  # every part done, the feature file not yet renamed
    ],
)
def test_a_killed_run_resumes_where_it_stopped(
    kill_at: str, parts_left: int, manifest: Path, tmp_path: Path
) -> None:
    reference = read_features(run(_config(manifest, tmp_path / "reference.h5")))
    out = tmp_path / "features" / "image.h5"

    killed = _extract(manifest, out, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    parts = sorted((tmp_path / "features" / "image.h5.parts").glob("*.h5"))
    assert len(parts) == parts_left

    rerun = _extract(manifest, out)
    assert rerun.returncode == 0, rerun.stderr
    features = read_features(out)
    # Did not start from zero: only the batches without a part were encoded again.
    assert features.provenance["run"]["encoded"] == IMAGES - parts_left
    assert features.provenance["run"]["reused_from_parts"] == parts_left
    assert f"encoded {IMAGES - parts_left} " in rerun.stdout
    _assert_same_vectors(features, reference)
    assert sorted(path.name for path in (tmp_path / "features").iterdir()) == ["image.h5"]


def test_rerunning_a_finished_extraction_leaves_the_file_byte_identical(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = run(_config(manifest, tmp_path / "image.h5"))
    before, modified = out.read_bytes(), out.stat().st_mtime_ns
    capsys.readouterr()
    run(_config(manifest, out))
    assert "is up to date" in capsys.readouterr().out
    assert out.read_bytes() == before
    assert out.stat().st_mtime_ns == modified


def test_new_rows_encode_only_their_new_items(
    small_table: pd.DataFrame,
    write_manifest: Callable[[pd.DataFrame], Path],
    manifest: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "image.h5"
    run(_config(write_manifest(small_table.iloc[:3]), out))  # images a, b, c
    grown = read_features(run(_config(write_manifest(small_table.iloc[:5]), out)))  # + d
    assert grown.provenance["run"]["encoded"] == 1
    assert grown.provenance["run"]["reused_from_file"] == 3
    fresh = read_features(run(_config(manifest, tmp_path / "fresh.h5")))
    _assert_same_vectors(grown, fresh)


def test_parts_of_another_encoder_configuration_are_never_reused(
    manifest: Path, tmp_path: Path
) -> None:
    out = tmp_path / "image.h5"
    assert _extract(manifest, out, kill_at="part-write:3").returncode == -signal.SIGKILL
    assert len(list((tmp_path / "image.h5.parts").glob("*.h5"))) == 2  # pooling mean

    features = read_features(run(_config(manifest, out, pooling="first")))
    assert features.provenance["run"]["encoded"] == IMAGES
    assert features.provenance["run"]["reused_from_parts"] == 0
    reference = read_features(run(_config(manifest, tmp_path / "first.h5", pooling="first")))
    _assert_same_vectors(features, reference)
    assert not (tmp_path / "image.h5.parts").exists()


def test_an_existing_file_of_another_configuration_is_rewritten(
    manifest: Path, tmp_path: Path
) -> None:
    out = run(_config(manifest, tmp_path / "image.h5"))
    features = read_features(run(_config(manifest, out, pooling="first")))
    assert features.provenance["pooling"] == "first"
    assert features.provenance["run"]["encoded"] == IMAGES
    assert features.provenance["run"]["reused_from_file"] == 0


def test_leftover_temporary_files_never_block_a_run(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "image.h5"
    (tmp_path / "image.h5.partial").write_bytes(b"half a file")
    (tmp_path / "image.h5.parts").mkdir()
    (tmp_path / "image.h5.parts" / "0123.h5.partial").write_bytes(b"half a part")
    (tmp_path / "image.h5.parts" / "plan.json").write_text("{not json")
    assert read_features(run(_config(manifest, out))).provenance["run"]["encoded"] == IMAGES
    assert sorted(path.name for path in tmp_path.glob("image.h5*")) == ["image.h5"]
