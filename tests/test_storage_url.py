"""Storage URLs a person can paste: no password printed, yet usable (password from the environment),
checked against a real password-protected PostgreSQL server through `postgresql://` (psycopg 3)."""
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from fcdm_lab.studies.storage import open_storage, pasteable


@pytest.mark.parametrize("url, shown, var", [
    ("sqlite:///optuna.db", "sqlite:///optuna.db", None),
    ("postgresql://fcdm@db:5432/optuna", "postgresql://fcdm@db:5432/optuna", None),
    ("postgresql://fcdm:s3cr%40t@db:5432/optuna", "postgresql://fcdm@db:5432/optuna", "PGPASSWORD"),
    ("postgresql+psycopg2://fcdm:pw@db/optuna", "postgresql+psycopg2://fcdm@db/optuna", "PGPASSWORD"),
    ("mysql+pymysql://fcdm:pw@db/optuna", '"mysql+pymysql://fcdm:$STORAGE_PASSWORD@db/optuna"', "STORAGE_PASSWORD"),
])
def test_pasteable_hides_the_password_but_names_its_source(url, shown, var):
    assert pasteable(url) == (shown, var)


@pytest.fixture
def password_postgres(tmp_path):
    """A throwaway PostgreSQL cluster on loopback that demands a password (scram-sha-256)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL binaries not found: apt-get install -y postgresql (as .ci/run does)")
    pytest.importorskip("psycopg", reason="pip install -e '.[postgres]' for postgresql:// URLs")
    bindir, as_root = found[-1].parent, os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    data = Path(tempfile.mkdtemp(prefix="fcdm-pgpw-"))
    (data / "pw").write_text("s3cr@t\n")
    if as_root:
        shutil.chown(data, "postgres")
        shutil.chown(data / "pw", "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = dict(check=True, capture_output=True, timeout=120)
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data / "db"), "-A", "scram-sha-256", "-U", "fcdm",
                    "--pwfile", str(data / "pw")], **run)
    subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-w", "-l", str(data / "log"), "-o",
                    f"-h 127.0.0.1 -p {port} -k {data}", "start"], **run)
    try:
        yield f"postgresql://fcdm:s3cr%40t@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(data, ignore_errors=True)


def test_pasteable_postgresql_url_works_with_pgpassword(password_postgres, monkeypatch):
    import optuna

    optuna.create_study(study_name="s", storage=open_storage(password_postgres))  # postgresql:// = psycopg 3
    shown, var = pasteable(password_postgres)
    assert "s3cr" not in shown and var == "PGPASSWORD"
    monkeypatch.setenv("PGPASSWORD", "s3cr@t")
    assert optuna.load_study(study_name="s", storage=shown).study_name == "s"  # what the printed command opens
    monkeypatch.delenv("PGPASSWORD")
    with pytest.raises(Exception, match="password"):
        optuna.load_study(study_name="s", storage=shown)
