"""Passwords in database and server URLs: never printed, never stored.

    redact("postgresql://me:secret@db/optuna")     -> "postgresql://me:***@db/optuna"   (to print)
    without_password("postgresql://me:secret@db/x") -> "postgresql://me@db/x"            (to store)

Both work on any text that looks like `scheme://user:password@host...`, including URLs that no URL
parser accepts (a non-numeric port, a stray character): an error message about a malformed URL is
exactly where a password would otherwise leak. Hand-written (a regular expression) for that reason:
`urllib.parse` and SQLAlchemy's `make_url` both refuse such URLs, and their refusal is when we need it.

Where a stored URL lost its password, the password comes from the environment when the URL is used
again: libpq reads $PGPASSWORD, MLflow's HTTP client $MLFLOW_TRACKING_PASSWORD.
"""
from __future__ import annotations

import re

# scheme://  userinfo@  where userinfo = user[:password]; the authority ends at the first / ? or #,
# and the userinfo at the LAST @ of the authority (an unencoded @ in a password stays hidden too).
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#]*)@")


def _split(url: str):
    match = _USERINFO.match(url)
    if match is None:
        return None
    user, sep, _password = match.group("userinfo").partition(":")
    return match, user, bool(sep)


def redact(url: str) -> str:
    """`url` with its password replaced by *** (for messages, tables and tags); other text unchanged."""
    parts = _split(str(url))
    if parts is None or not parts[2]:
        return str(url)
    match, user, _ = parts
    return f"{match.group('scheme')}{user}:***@{str(url)[match.end():]}"


def without_password(url: str) -> str:
    """`url` with its password removed (for files and run attributes that outlive the command)."""
    parts = _split(str(url))
    if parts is None or not parts[2]:
        return str(url)
    match, user, _ = parts
    return f"{match.group('scheme')}{user}@{str(url)[match.end():]}"


def has_password(url: str) -> bool:
    parts = _split(str(url))
    return parts is not None and parts[2]


def scrub(text: str, url: str) -> str:
    """`text` (e.g. a driver's error message about `url`) with `url`'s password replaced by ***."""
    parts = _split(str(url))
    if parts is None or not parts[2]:
        return str(text)
    password = parts[0].group("userinfo").partition(":")[2]
    return str(text).replace(password, "***") if password else str(text)


__all__ = ["has_password", "redact", "scrub", "without_password"]
