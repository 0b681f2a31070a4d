"""Test settings.

Threads: one torch thread per process by default (two busy processes with 2 threads each run
~100x slower on a 2-core machine); pytest-xdist runs one such process per core (pyproject's addopts;
`-n 0` for one process, then FCDM_TEST_THREADS=2 uses both cores).
Subprocesses started by tests get OMP_NUM_THREADS=1. MLflow stores and fcdm-lab's caches live in
temporary folders, so tests never touch the user's stores.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("FCDM_LAB_CACHE", tempfile.mkdtemp(prefix="fcdm-lab-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("FCDM_TEST_THREADS", "1")))

# A tiny-digits study child that trains and evaluates in seconds (test_ablate, test_engine)
TINY = {"model.C": 8, "model.L": 1, "train.batch_size": 16, "train.log_every": 2, "train.sample_every": 0,
        "eval.num_samples": 20, "eval.steps": 4, "eval.batch_size": 20}


@pytest.fixture(autouse=True)
def _isolated_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory):
    """An empty MLflow database made once: creating one runs MLflow's migrations (~6 s)."""
    from fcdm_lab.tracking.client import get_client

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    get_client(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(_template_db, tmp_path):
    """The per-test store MLFLOW_TRACKING_URI points at, pre-created from the template."""
    from fcdm_lab.tracking.client import get_client

    shutil.copy(_template_db, tmp_path / "mlflow.db")
    return get_client()


@contextlib.contextmanager
def postgres_cluster(user: str | None = None, password: str | None = None):
    """A throwaway PostgreSQL cluster on loopback from Debian's binaries; yields its URL. initdb
    refuses to run as root, so as root the cluster runs as the `postgres` user. Skips the test with
    an install hint where the binaries are missing."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL binaries not found: install Debian's `postgresql` package "
                    "(`apt-get install -y postgresql`, as .ci/run does) to run this test")
    import getpass
    from urllib.parse import quote

    bindir, as_root = found[-1].parent, os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    user = user or ("postgres" if as_root else getpass.getuser())
    data = Path(tempfile.mkdtemp(prefix="fcdm-pg-"))
    auth = ["-A", "trust"]
    if password is not None:
        (data / "pw").write_text(password + "\n")
        auth = ["-A", "scram-sha-256", "--pwfile", str(data / "pw")]
    if as_root:
        for p in (data, *data.iterdir()):
            shutil.chown(p, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(check=True, capture_output=True, timeout=120)
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data / "db"), "-U", user, *auth], **run)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-w", "-l", str(data / "log"), "-o",
                    f"-h 127.0.0.1 -p {port} -k {data}", "start"], **run)
    secret = f":{quote(password, safe='')}" if password is not None else ""
    try:
        yield f"postgresql://{user}{secret}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def sigint_default() -> None:
    """preexec_fn of a child a test sends SIGINT (Ctrl-C): SIGINT back to its default first. A suite
    started as a background job (`cmd &` in a script, e.g. a CI runner) ignores SIGINT, children
    inherit that, and a Python child then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
