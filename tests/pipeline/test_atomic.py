"""The shared output primitive: a locked output, written whole or not at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.atomic import atomic_folder, recover_folder, write_atomically, write_text_atomically
from pipeline.errors import UserError
from pipeline.lock import output_lock

REPO_ROOT = Path(__file__).resolve().parents[2]


def _old_folder(out: Path) -> None:
    out.mkdir()
    (out / "runs.json").write_text("old")
    (out / "stale.csv").write_text("old")


def test_a_folder_is_swapped_in_whole(tmp_path: Path) -> None:
    out = tmp_path / "protocol"
    _old_folder(out)
    with atomic_folder(out) as staging:
        assert staging == tmp_path / "protocol.partial" and not any(staging.iterdir())
        (staging / "runs.json").write_text("new")
        assert (out / "runs.json").read_text() == "old"  # nothing visible until the end
    assert sorted(path.name for path in out.iterdir()) == ["runs.json"]  # stale.csv went
    assert (out / "runs.json").read_text() == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["protocol"]


def test_a_failure_inside_leaves_the_old_folder_and_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "protocol"
    _old_folder(out)
    with pytest.raises(RuntimeError), atomic_folder(out) as staging:
        (staging / "runs.json").write_text("half")
        raise RuntimeError("killed mid-run")
    assert (out / "runs.json").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["protocol"]


def test_a_killed_writer_leaves_the_old_folder_and_the_next_run_cleans_up(
    tmp_path: Path,
) -> None:
    out = tmp_path / "protocol"
    _old_folder(out)
    script = (
        "import os, signal, sys; from pathlib import Path\n"
        "from pipeline.atomic import atomic_folder\n"
        "with atomic_folder(Path(sys.argv[1])) as staging:\n"
        "    (staging / 'runs.json').write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert killed.returncode == -signal.SIGKILL
    assert (out / "runs.json").read_text() == "old"
    with atomic_folder(out) as staging:  # the leftover staging folder does not block
        assert not any(staging.iterdir())
        (staging / "runs.json").write_text("new")
    assert (out / "runs.json").read_text() == "new"


def test_killed_between_the_two_renames_the_old_folder_comes_back(tmp_path: Path) -> None:
    out = tmp_path / "protocol"
    _old_folder(out)
    os.replace(out, tmp_path / "protocol.previous")  # where such a kill leaves it
    (tmp_path / "protocol.partial").mkdir()
    recover_folder(out)
    assert (out / "runs.json").read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["protocol"]


def test_a_file_where_a_folder_is_wanted_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with (
        pytest.raises(UserError, match="is a file; give a folder"),
        atomic_folder(tmp_path / "out"),
    ):
        pass


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    target = write_text_atomically(tmp_path / "runs.json", "old")

    def fails(temporary: Path) -> None:
        temporary.write_text("ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="cannot write .*runs.json: no space left on device"):
        write_atomically(target, fails)
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["runs.json"]


def test_a_second_writer_of_a_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "protocol"
    with output_lock(out), pytest.raises(UserError) as refused, output_lock(out):
        pass
    assert str(refused.value).startswith(f"{out} is being written by another run (host ")
    assert "\n" not in str(refused.value)
    with output_lock(out):  # released with the first holder
        pass


def test_a_folder_holding_what_the_writer_did_not_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "thesis.tex").write_text("years of work")
    refused = pytest.raises(UserError, match="holds thesis.tex, which this command did not write")
    with refused, atomic_folder(tmp_path, owned=("runs.json", "*.pt")):
        pass
    assert (tmp_path / "thesis.tex").exists()
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "M4.pt").write_text("old head")
    with atomic_folder(heads, owned=("*.pt",)) as staging:  # patterns name what it owns
        (staging / "M1.pt").write_text("new head")
    assert [path.name for path in heads.iterdir()] == ["M1.pt"]
