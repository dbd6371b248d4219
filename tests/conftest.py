"""Fixtures every test package shares."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def deny_reading(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], None]:
    """Make `Path.open` of one file raise PermissionError, as a file of another user with
    mode 600 would (the tests run as root, where chmod does not keep root out)."""

    def deny(locked: Path) -> None:
        real_open = Path.open

        def open_unless_locked(path: Path, *args, **kwargs):
            if path == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(Path, "open", open_unless_locked)

    return deny
