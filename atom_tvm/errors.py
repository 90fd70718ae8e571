"""The one exception type that reaches a user as a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: the message names the thing and the fix."""
