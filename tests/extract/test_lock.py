"""One writer per output: a second run refuses (or waits), a dead holder never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from cache.store import read_features
from extract.__main__ import main
from extract.run import ExtractConfig, run
from pipeline.errors import UserError
from pipeline.lock import lock_path, output_lock

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def manifest(small_table: pd.DataFrame, write_manifest: Callable[[pd.DataFrame], Path]) -> Path:
    return write_manifest(small_table.iloc[:5])


def _config(manifest: Path, out: Path, **overrides) -> ExtractConfig:
    return ExtractConfig(
        model="llama3", manifest=str(manifest), out=str(out), batch_size=2, **overrides
    )


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding the lock of `out` until it is killed."""
    script = (
        "import sys, time; from pathlib import Path; from pipeline.lock import output_lock\n"
        "with output_lock(Path(sys.argv[1])):\n"
        "    print('locked', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_run_refuses_in_one_line_naming_the_holder(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "text.h5"
    holder = _hold_lock(out)
    try:
        with pytest.raises(SystemExit) as exited:
            main(["--model", "llama3", "--manifest", str(manifest), "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert f"{out} is being written by another run (host " in message
    assert f"pid {holder.pid}" in message and "--wait-for-lock" in message
    assert not out.exists()


def test_a_lock_whose_holder_died_does_not_block(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "text.h5"
    holder = _hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path(out).exists()  # left behind with the dead holder's name in it
    assert read_features(run(_config(manifest, out))).keys
    assert not lock_path(out).exists()


def test_a_second_run_can_wait_for_the_first(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "text.h5"
    released = threading.Event()

    def hold_briefly() -> None:
        with output_lock(out):
            released.wait()  # hold until the waiting run has been refused once
            time.sleep(0.5)

    holder = threading.Thread(target=hold_briefly)
    holder.start()
    try:
        while not lock_path(out).exists():
            time.sleep(0.01)
        with pytest.raises(UserError, match="is being written by another run"):
            run(_config(manifest, out))
        released.set()
        assert read_features(run(_config(manifest, out, wait_for_lock=30))).keys
    finally:
        released.set()
        holder.join()


def test_the_lock_is_released_after_a_failed_run(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "text.h5"
    with pytest.raises(UserError, match="needs a GPU"):  # raised while holding the lock
        run(_config(manifest, out, dtype="float16", device="cpu"))
    assert read_features(run(_config(manifest, out))).keys


def test_help_explains_the_lock_resume_and_strict_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for text in ("--wait-for-lock", "FILE.h5.lock", "FILE.h5.parts/", "--strict", "--multi_gpu"):
        assert text in help_text
