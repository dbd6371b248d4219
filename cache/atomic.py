"""Atomic file writes: a file at its final path is always complete, whatever happens.

Write a temporary file in the same folder, fsync it, `os.replace` it over the target and
fsync the folder, so that after a crash or power cut the target is either the old
complete file or the new complete one. A failed write (a full disk, a quota) removes the
temporary file, leaves the old target untouched and becomes one UserError line.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from cache import fault_hook
from pipeline.errors import UserError

PARTIAL_SUFFIX = ".partial"


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _describe(error: OSError) -> str:
    # h5py reports a failed write as an OSError whose errno is lost but whose text has it.
    if error.errno == errno.ENOSPC or "errno = 28" in str(error) or "No space left" in str(error):
        return "no space left on device"
    return error.strerror or str(error).splitlines()[0]


def write_atomically(path: Path, write: Callable[[Path], None], *, hook_point: str) -> Path:
    """Call `write(temporary)`, then make the temporary file `path` in one step.

    Args:
        path: the final file.
        write: writes the whole content to the path it is given.
        hook_point: the name of the moment between writing and renaming for the test hook
            (cache.fault_hook).

    Raises:
        UserError: the write or the rename failed with an OSError; `path` is as it was.
    """
    temporary = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        _fsync(temporary)
        fault_hook.reached(hook_point)
        os.replace(temporary, path)
        _fsync(path.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {path}: {_describe(error)}; the previous file (if any) is unchanged "
            "and finished batches are kept: free space and run the same command again"
        ) from None
    return path
