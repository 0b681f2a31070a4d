"""Optuna storages shared by ablations and sweeps: URL checks, opening with heartbeats, retries.

    storage = open_storage("sqlite:///optuna.db")            # or postgresql://USER:PASS@HOST/DB

Every storage is opened with Optuna's heartbeat (`heartbeat_interval`, `grace_period`): a worker
killed mid-trial (SIGKILL, a lost node) stops beating, the next worker that looks marks its trial
FAIL (`optuna.storages.fail_stale_trials`) and `RetryHeartbeatStaleTrialCallback` enqueues a copy, which
another worker claims, so a study always completes. `FCDM_HEARTBEAT_S` sets the interval (tests
use a short one); the grace period is three intervals.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Dict

from ..errors import UserError, choices
from ..urls import redact, scrub

DEFAULT_STORAGE = "sqlite:///optuna.db"
MAX_RETRY = 3            # a trial whose worker died is retried this many times


def heartbeat_s() -> int:
    """Seconds between a running trial's heartbeats (FCDM_HEARTBEAT_S, default 20)."""
    try:
        return max(1, int(os.environ.get("FCDM_HEARTBEAT_S", "20")))
    except ValueError:
        raise UserError(f"FCDM_HEARTBEAT_S must be a whole number of seconds, got "
                        f"{os.environ['FCDM_HEARTBEAT_S']!r}") from None


STORAGE_FORMS = ("sqlite:///optuna.db", "sqlite:////abs/path/optuna.db", "postgresql://USER:PASS@HOST/DB",
                 "mysql+pymysql://USER:PASS@HOST/DB")


def pasteable(url: str) -> tuple[str, str | None]:
    """(URL, environment variable or None) for a command a person pastes, e.g. `optuna-dashboard URL`:
    the password is neither printed nor masked into uselessness, it comes from the environment.
    libpq (psycopg, psycopg2) reads $PGPASSWORD itself when the URL has none; other drivers get
    "$STORAGE_PASSWORD" inside a double-quoted URL, which the shell fills in."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:
        return url, None
    if parsed.password is None:
        return url, None
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
        return parsed._replace(password=None).render_as_string(hide_password=False), "PGPASSWORD"
    marker = "STORAGEPASSWORDMARKER"
    text = parsed.set(password=marker).render_as_string(hide_password=False)
    return '"' + text.replace(marker, "$STORAGE_PASSWORD") + '"', "STORAGE_PASSWORD"


def check_storage_url(url: str | None) -> str:
    """Syntax, dialect and driver of a storage URL, checked without connecting or importing Optuna
    (so a typo fails at once, before any model is built)."""
    from sqlalchemy.engine import make_url

    url = (url or DEFAULT_STORAGE).strip()
    bad = f"storage {redact(url)!r} is not a usable Optuna database URL; valid forms: {choices(STORAGE_FORMS)}"
    if "://" not in url:
        raise UserError(f"{bad} (for a local file write sqlite:///{url})")
    if url.startswith("sqlite:") and (not url.startswith("sqlite:///") or url == "sqlite:///"):
        raise UserError(bad)
    try:
        make_url(url).get_dialect().import_dbapi()
    except ImportError as e:
        raise UserError(f"storage {redact(url)!r} needs a database driver that is not installed ({scrub(e, url)}); install "
                        f"it, name an installed one in the URL (postgresql+psycopg2://, mysql+pymysql://) or use "
                        f"{DEFAULT_STORAGE}") from None
    except Exception as e:  # ArgumentError (unparsable), NoSuchModuleError (unknown database)
        raise UserError(f"{bad} ({scrub(str(e).splitlines()[0], url)})") from None
    return url


def open_storage(url: str | None):
    """An Optuna RDBStorage for `url`; a malformed or unusable URL is a UserError within seconds."""
    import optuna
    from optuna.exceptions import ExperimentalWarning

    url = check_storage_url(url)
    scheme = url.split("://", 1)[0]
    engine_kwargs: Dict[str, Any] = {}
    if scheme == "sqlite":
        path = url[len("sqlite:///"):]
        if path != ":memory:":
            try:
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"storage {url!r}: cannot create the folder of the database file ({e})") from None
        # Workers on one machine write to one file: wait up to a minute for another's write lock
        # (SQLite's default, 5 s, fails with "database is locked" on a loaded machine; MLflow waits 20 s).
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif scheme.split("+")[0] in ("postgresql", "mysql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable server fails in seconds
    try:
        with warnings.catch_warnings(), sqlite_init_lock(url):
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats are "experimental" in Optuna 5
            beat = heartbeat_s()
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs or None, heartbeat_interval=beat, grace_period=3 * beat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRY, inherit_intermediate_values=True))  # a resumed sweep trial keeps its reports
    except ImportError as e:
        raise UserError(f"storage {redact(url)!r} needs a database driver that is not installed ({e}); "
                        f"install it (e.g. psycopg2-binary, pymysql) or use {DEFAULT_STORAGE}") from None
    except Exception as e:  # sqlalchemy ArgumentError / OperationalError / NoSuchModuleError
        reason = scrub(str(e).splitlines()[0], url)
        raise UserError(f"storage {redact(url)!r} cannot be opened ({type(e).__name__}: {reason}); valid forms: "
                        f"{choices(STORAGE_FORMS)}") from None


@contextlib.contextmanager
def sqlite_init_lock(url: str):
    """Serialise the first opening of a SQLite store across the workers of one machine: a fresh
    store is created by schema migrations that two processes must not run at once (MLflow's fail
    with "table _alembic_tmp_... already exists"). Other databases handle this themselves."""
    if not url.startswith("sqlite:///") or url.endswith(":memory:"):
        yield
        return
    from filelock import FileLock  # a torch dependency; portable where fcntl is not

    path = Path(url[len("sqlite:///"):]).expanduser()
    with FileLock(str(path) + ".lock", timeout=300):
        yield


__all__ = ["DEFAULT_STORAGE", "MAX_RETRY", "STORAGE_FORMS", "check_storage_url", "heartbeat_s", "open_storage", "redact",
           "sqlite_init_lock"]
