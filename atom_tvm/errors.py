"""The one exception type that reaches a user as a one-line message instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input or environment: the message names the thing and the fix."""


def run_command(action: Callable[[], object]) -> int:
    """A CLI's exit code: 0, or 2 after printing a UserError as `error: <message>` on stderr."""
    try:
        action()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
