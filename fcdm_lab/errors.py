"""User-facing errors.

Anything the user can get wrong (a name, a path, a config value) raises `UserError`; the CLI turns
it into one line on stderr and exit code 2, never a traceback.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the problem and the valid choices."""


def choices(valid) -> str:
    """Format valid choices for an error message: 'a, b, c'."""
    return ", ".join(str(v) for v in valid)
