"""A full disk: the previous complete file stays untouched, temporary files go, finished
batches are kept, one clear line and exit code 2; the same command then completes."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

import pipeline.atomic
from cache.store import read_features
from extract.__main__ import main
from extract.run import ExtractConfig, run
from pipeline.demo import generate as demo
from pipeline.errors import UserError

DISK_BYTES = 1 << 20  # tmpfs size: room for the tiny model's file and its parts


@pytest.fixture
def manifest(small_table: pd.DataFrame, write_manifest: Callable[[pd.DataFrame], Path]) -> Path:
    return write_manifest(small_table.iloc[:5])


def _config(manifest: Path, out: Path, **overrides) -> ExtractConfig:
    settings = {"model": "blip2-qformer", "batch_size": 1, "num_workers": 0, **overrides}
    return ExtractConfig(manifest=str(manifest), out=str(out), **settings)


def _temporary_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.name.endswith(".partial")]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (root only; skipped where mounting is refused)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _fill(folder: Path) -> Path:
    """Take every free byte of the file system of `folder`."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_a_really_full_disk_keeps_the_old_file_and_the_rerun_completes(
    manifest: Path, small_disk: Path, capsys: pytest.CaptureFixture
) -> None:
    out = run(_config(manifest, small_disk / "image.h5"))
    before = out.read_bytes()
    filler = _fill(small_disk)

    # Another pooling: every vector must be encoded again, and nothing fits.
    flags = ["--model", "blip2-qformer", "--pooling", "first", "--batch-size", "1"]
    with pytest.raises(SystemExit) as exited:
        main([*flags, "--manifest", str(manifest), "--out", str(out), "--num-workers", "0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err.splitlines()[-1]  # after the progress bar
    assert message.startswith("error: cannot write ")
    assert "no space left on device" in message and "run the same command again" in message
    assert out.read_bytes() == before
    assert _temporary_files(small_disk) == []

    filler.unlink()
    features = read_features(run(_config(manifest, out, pooling="first")))
    assert features.provenance["pooling"] == "first"
    assert _temporary_files(small_disk) == []


def _failing_fsync(fails: Callable[[Path], bool]) -> Callable[[Path], None]:
    real = pipeline.atomic._fsync

    def fsync(path: Path) -> None:
        if fails(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path)

    return fsync


def test_no_space_for_the_feature_file_keeps_the_old_one_and_the_parts(
    small_table: pd.DataFrame,
    write_manifest: Callable[[pd.DataFrame], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = run(_config(write_manifest(small_table.iloc[:3]), tmp_path / "image.h5"))
    before = out.read_bytes()
    grown = write_manifest(small_table.iloc[:5])  # one new image

    monkeypatch.setattr(
        pipeline.atomic, "_fsync", _failing_fsync(lambda path: path.name == "image.h5.partial")
    )
    with pytest.raises(UserError, match=f"cannot write {out}: no space left on device"):
        run(_config(grown, out))
    assert out.read_bytes() == before
    assert _temporary_files(tmp_path) == []
    assert len(list((tmp_path / "image.h5.parts").glob("*.h5"))) == 1  # the new image's

    monkeypatch.undo()
    record = read_features(run(_config(grown, out))).provenance["run"]
    assert (record["encoded"], record["reused_from_file"], record["reused_from_parts"]) == (0, 3, 1)


def test_no_space_for_a_part_stops_with_one_line_and_no_temporary_file(
    manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        pipeline.atomic, "_fsync", _failing_fsync(lambda path: path.parent.name == "image.h5.parts")
    )
    with pytest.raises(UserError, match="no space left on device"):
        run(_config(manifest, tmp_path / "image.h5"))
    assert not (tmp_path / "image.h5").exists()
    assert _temporary_files(tmp_path) == []


def test_a_read_only_output_folder_is_one_line(
    manifest: Path, small_disk: Path, capsys: pytest.CaptureFixture
) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(SystemExit) as exited:
        main(["--model", "llama3", "--manifest", str(manifest), "--out", str(small_disk / "t.h5")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"error: cannot create the lock file {small_disk / 't.h5.lock'}: Read-only file system\n"
    )


REPO_ROOT = Path(__file__).resolve().parents[2]
UNSHARE = shutil.which("unshare")


def _can_mount_in_a_user_namespace() -> bool:
    if UNSHARE is None:
        return False
    probe = subprocess.run(
        [UNSHARE, "-Urm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _can_mount_in_a_user_namespace(),
    reason="needs `unshare -Urm` (user and mount namespaces) to mount a private small tmpfs",
)
def test_a_disk_that_fills_while_parts_are_written_is_one_line_not_a_crash(
    tmp_path: Path,
) -> None:
    manifest = demo.run(
        demo.DemoConfig(
            out=str(tmp_path / "demo"), patients=6, external_patients=0, images_per_report=3
        )
    )
    disk = tmp_path / "disk"
    disk.mkdir()
    # 100 KB fills while this demo's 26 parts are written; at that size the full disk met
    # h5py flushing a part from a destructor, and the process died with a segmentation
    # fault (exit 139) every time.
    script = (
        f'mount -t tmpfs -o size=100k tmpfs "$1" && shift && exec "{sys.executable}" '
        '-m extract "$@"'
    )
    extract = [
        *("--model", "blip2-qformer", "--batch-size", "1", "--num-workers", "0"),
        *("--manifest", str(manifest), "--out", str(disk / "image.h5")),
    ]
    finished = subprocess.run(
        [UNSHARE, "-Urm", "sh", "-c", script, "sh", str(disk), *extract],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
    )
    assert finished.returncode == 2, finished.stderr[-2000:]
    assert "Traceback" not in finished.stderr
    message = finished.stderr.splitlines()[-1]
    assert message.startswith(f"error: cannot write {disk / 'image.h5.parts'}")
    assert "no space left on device" in message and "run the same command again" in message
