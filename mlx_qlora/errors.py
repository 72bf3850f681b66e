"""The one exception type that reaches the user as a single line.

Anything a user can get wrong (a path, a value, a file's contents) raises ``UserError`` with a
message that names the bad value and the fix. The CLI prints ``error: <message>`` and exits 2;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the value and the fix, in one line."""


def require(ok: bool, message: str) -> None:
    """Raise ``UserError(message)`` unless ``ok``; keeps validation code flat."""
    if not ok:
        raise UserError(message)
