"""Browsing runs: the MLflow UI command, links in MLflow's model-training view, the closing
"Browse: ..." line.
"""
from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
from urllib.parse import urlsplit

from ..errors import UserError
from ..urls import has_password, redact, without_password
from .client import (DEFAULT_EXPERIMENT, UI_WORKFLOW_QUERY, mlflow_client, default_tracking_uri, probe_tracking_uri,
                       resolve_tracking_uri)


def ui_command(uri: str | None = None, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The `mlflow ui` command line for a store. One worker: MLflow's default 4 are heavy on a
    small machine and one person browsing needs one."""
    uri = resolve_tracking_uri(uri)
    if urlsplit(uri).scheme in ("http", "https"):
        raise UserError(f"{redact(uri)} is already a tracking server: open it in a browser instead of starting a UI")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", str(workers)]


def launch_ui(uri: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run `mlflow ui` in the foreground (loopback by default) until Ctrl+C or SIGTERM, then stop
    the server (SIGTERM reaches its worker processes); returns its exit code."""
    import signal

    cmd = ui_command(uri, host, port)
    store = cmd[cmd.index("--backend-store-uri") + 1]
    check_listen_address(host, port)  # MLflow's server would print a traceback ~45 s later and exit 0
    probe_tracking_uri(store)
    exp = mlflow_client(store).get_experiment_by_name(DEFAULT_EXPERIMENT)
    link = ui_link(f"http://{host}:{port}", exp.experiment_id if exp is not None else None)
    print(f"MLflow UI for {redact(store)}: open {link} (Ctrl+C to stop)", flush=True)
    proc = subprocess.Popen(cmd)

    def stop(signum, frame):  # SIGTERM to us: stop the server too instead of orphaning it
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_listen_address(host: str, port: int) -> None:
    """A UserError unless this machine can listen on (host, port): a valid port, a host name that
    resolves to one of this machine's addresses, a port no one else holds."""
    if not (isinstance(port, int) and 1 <= port <= 65535):
        raise UserError(f"--port must be from 1 to 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host!r} is not an address or name this machine can resolve ({e}); e.g. 127.0.0.1 "
                        f"(this machine only) or 0.0.0.0 (every interface)") from None
    family, kind, proto, _, address = infos[0]
    with contextlib.closing(socket.socket(family, kind, proto)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be used ({e.strerror})"
            raise UserError(f"cannot listen on {host}:{port}: the address {why}; pick another --port or --host") from None


def ui_link(base_url: str, experiment_id: str | None = None) -> str:
    """A link to an experiment's runs table (or the UI's home) in MLflow's model-training view."""
    path = f"#/experiments/{experiment_id}/runs" if experiment_id is not None else "#/"
    return f"{base_url.rstrip('/')}/{path}?{UI_WORKFLOW_QUERY}"


def browse_hint(run_id: str | None, uri: str | None = None, *, report: bool = False) -> str:
    """The closing lines: how to look at a run (a link to its experiment's runs table), then the run."""
    uri = resolve_tracking_uri(uri)
    try:
        exp_id = mlflow_client(uri).get_run(run_id).info.experiment_id if run_id else None
    except Exception:  # a hint must not fail the command that has just finished
        exp_id = None
    shown = without_password(uri)  # a printed line never carries a password: the browser or libpq asks for it
    if urlsplit(uri).scheme in ("http", "https"):
        where = f"open {ui_link(shown, exp_id)}"
    elif uri == default_tracking_uri() and not os.environ.get("MLFLOW_TRACKING_URI"):
        where = f"run `fcdm-lab ui`, open {ui_link('http://127.0.0.1:5000', exp_id)}"
    else:
        password = " (the password from $PGPASSWORD)" if has_password(uri) else ""
        where = f"run `MLFLOW_TRACKING_URI={shown} fcdm-lab ui`{password}, open {ui_link('http://127.0.0.1:5000', exp_id)}"
    # Two lines, so each fits a 120-column terminal: the link, then the run (and how to rebuild its report).
    text = f"Browse: {where}"
    if run_id:
        text += f"\n  run {run_id}" + (f"; rebuild its report: `fcdm-lab report {run_id}`" if report else "")
    return text


