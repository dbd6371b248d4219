"""One writer per output (a file or a folder): an exclusive `fcntl.flock` on OUT.lock beside it.

The kernel drops a flock when its holder exits, however it exits (even SIGKILL), so a
lock left by a dead run never blocks the next one. The file records who holds it (host,
pid, start time, command) so that a refused run can say whom it waits for. The holder
removes the file while still holding the lock; a waiter that then gets the lock on the
removed file notices (the path no longer names the file it locked) and tries again.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path

from pipeline.errors import UserError

LOCK_SUFFIX = ".lock"
_POLL_SECONDS = 0.2


def lock_path(target: Path) -> Path:
    """The lock file of an output file or folder."""
    return target.with_name(target.name + LOCK_SUFFIX)


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return (
            f"host {holder['host']}, pid {holder['pid']}, since {holder['started_utc']}: "
            f"{holder['command']}"
        )
    except (OSError, ValueError, KeyError):  # written a moment after locking
        return "a run that is just starting"


def _try_lock(path: Path) -> int | None:
    """The descriptor of the locked, still current lock file, or None if another process
    holds it."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    try:
        current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        current = False
    if not current:  # the previous holder removed it as we waited: lock the new one
        os.close(descriptor)
        return _try_lock(path)
    return descriptor


def _sign(descriptor: int) -> None:
    """Write who holds the lock into it (best effort: on a full disk the lock still holds,
    only the holder's name is lost)."""
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    with suppress(OSError):
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps(holder).encode())


@contextmanager
def output_lock(target: Path, wait_seconds: float = 0) -> Iterator[None]:
    """Hold the lock of `target` for the duration of the block.

    Args:
        target: the output file or folder.
        wait_seconds: how long to wait for another holder to finish; 0 refuses at once.

    Raises:
        UserError: another live process holds the lock (after waiting), naming it.
    """
    path = lock_path(target)
    deadline = time.monotonic() + wait_seconds
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while (descriptor := _try_lock(path)) is None:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"{target} is being written by another run ({_holder(path)}); wait for "
                    "it to finish or pass --wait-for-lock SECONDS"
                )
            time.sleep(_POLL_SECONDS)
    except OSError as error:  # a folder that cannot be written to
        raise UserError(f"cannot create the lock file {path}: {error.strerror}") from None
    try:
        _sign(descriptor)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)
