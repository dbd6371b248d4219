"""The one exception type that means "the user's input is wrong", and how CLIs report it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

Result = TypeVar("Result")

USER_ERROR_EXIT_CODE = 2  # the argparse convention for "you called me wrongly"


class UserError(Exception):
    """Bad input a user can fix (a manifest, a flag, a file): shown as one line, no traceback."""


def exit_on_user_error(action: Callable[[], Result]) -> Result:
    """Run `action`; on a UserError print one line to stderr and exit with code 2."""
    try:
        return action()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT_CODE) from None
