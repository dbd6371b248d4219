"""Atomic writes: a file or folder at its final path is always complete, whatever happens.

A file is written under a temporary name in the same folder, fsynced, `os.replace`d over
the target and the folder fsynced, so that after a crash or power cut the target is
either the old complete file or the new complete one. A folder is written as
`<out>.partial` and swapped in only once complete (`atomic_folder`). A failed write (a
full disk, a quota) removes the temporary, leaves the old target untouched and becomes
one UserError line.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

from pipeline import fault_hook
from pipeline.errors import UserError

PARTIAL_SUFFIX = ".partial"
# The previous complete folder, kept only for the moment between two renames (see
# atomic_folder); found at the start of a run, it is the last complete output.
PREVIOUS_SUFFIX = ".previous"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def describe_os_error(error: OSError) -> str:
    """A short reason for a failed write, e.g. "no space left on device"."""
    # h5py reports a failed write as an OSError whose errno is lost but whose text has it.
    if error.errno == errno.ENOSPC or "errno = 28" in str(error) or "No space left" in str(error):
        return "no space left on device"
    return error.strerror or str(error).splitlines()[0]


def _cannot_write(path: Path, error: OSError, kept: str) -> UserError:
    return UserError(
        f"cannot write {path}: {describe_os_error(error)}; the previous one (if any) is "
        f"unchanged{kept}: free space and run the same command again"
    )


def partial_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(path.name + PARTIAL_SUFFIX)


def write_atomically(
    path: Path,
    write: Callable[[Path], None],
    *,
    hook_point: str = "",
    kept: str = "",
) -> Path:
    """Call `write(temporary)`, then make the temporary file `path` in one step.

    Args:
        path: the final file.
        write: writes the whole content to the path it is given.
        hook_point: the name of the moment between writing and renaming for the test hook
            (pipeline.fault_hook); empty: none.
        kept: what else survives a failure, for the message (e.g. ", finished batches are
            kept").

    Raises:
        UserError: the write or the rename failed with an OSError; `path` is as it was.
    """
    temporary = partial_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        _fsync(temporary)
        if hook_point:
            fault_hook.reached(hook_point)
        os.replace(temporary, path)
        _fsync(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _cannot_write(path, error, kept) from None
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; see write_atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def recover_folder(out: Path) -> None:
    """Undo what a run killed while writing `out` left: its unfinished `.partial` folder
    goes, and a `.previous` folder (the old complete output, moved aside a moment before the
    new one was renamed in) comes back if `out` is absent."""
    previous = out.with_name(out.name + PREVIOUS_SUFFIX)
    _remove(partial_path(out))
    if previous.exists():
        if out.exists():
            _remove(previous)
        else:
            os.replace(previous, out)


@contextmanager
def staged_entries(out: Path) -> Iterator[Path]:
    """Yield a staging folder inside `out`; at the end move each file and folder written
    there into `out`, each replacing its namesake by a rename.

    For a writer that shares its output folder with others (the report writes beside the
    protocol's folder in reports/): every file it writes appears whole or not at all, and
    a folder it owns (metrics/, plots/) is swapped as a whole; what it does not write stays.
    On an exception nothing is moved. Hold the output's lock (pipeline.lock) around it.

    Raises:
        UserError: `out` is a file, or a write or rename fails with an OSError.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder (it is created if absent)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    except OSError as error:
        raise _cannot_write(out, error, "") from None
    try:
        yield staging
        for entry in sorted(staging.iterdir()):
            target = out / entry.name
            if entry.is_dir() and target.is_dir():
                previous = target.with_name(target.name + PREVIOUS_SUFFIX)
                _remove(previous)
                os.replace(target, previous)
                os.replace(entry, target)
                _remove(previous)
            else:
                os.replace(entry, target)
    except OSError as error:
        raise _cannot_write(out, error, "") from None
    finally:
        _remove(staging)


@contextmanager
def atomic_folder(out: Path, owned: Collection[str] = ()) -> Iterator[Path]:
    """Yield an empty staging folder to write the whole of `out` into; swap it in at the end.

    Args:
        out: the output folder.
        owned: the names (or glob patterns, e.g. "*.pt") of what a previous run of this
            writer leaves in `out`; an existing `out` holding anything else (say, --out .
            by mistake) is refused, not replaced. Empty: any existing `out` is replaced.

    On success the staging folder (`<out>.partial`) becomes `out` and the old `out` is
    deleted; on any exception the staging folder is deleted and `out` is left as it was.
    A kill at any moment leaves the old complete `out`, the new complete one, or (between
    the two renames, a moment) the old one as `<out>.previous`, which the next run puts
    back (recover_folder). Hold the output's lock (pipeline.lock) around it.

    Raises:
        UserError: `out` is a file or holds what this writer did not write, or a write or
            rename fails with an OSError.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder (it is created if absent)")
    present = os.listdir(out) if owned and out.is_dir() else []
    foreign = sorted(name for name in present if not any(fnmatch(name, p) for p in owned))
    if foreign:
        raise UserError(
            f"{out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
            "this command did not write, and would be replaced as a whole: give a new or "
            "empty folder"
        )
    staging = partial_path(out)
    previous = out.with_name(out.name + PREVIOUS_SUFFIX)
    try:
        recover_folder(out)
        staging.mkdir(parents=True)
    except OSError as error:
        raise _cannot_write(out, error, "") from None
    try:
        yield staging
        for written in (*staging.rglob("*"), staging):
            if written.is_file() or written.is_dir():
                _fsync(written)
        if out.exists():
            os.replace(out, previous)
        os.replace(staging, out)
        _fsync(out.parent)
        _remove(previous)
    except OSError as error:
        recover_folder(out)
        raise _cannot_write(out, error, "") from None
    except BaseException:
        recover_folder(out)
        raise
