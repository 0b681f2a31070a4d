"""Storage URLs a person can paste: no password printed, yet usable (password from the environment),
checked against a real password-protected PostgreSQL server through `postgresql://` (psycopg 3)."""

import pytest
from conftest import postgres_cluster

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
def password_postgres():
    """A throwaway PostgreSQL cluster on loopback that demands a password (scram-sha-256)."""
    pytest.importorskip("psycopg", reason="pip install -e '.[postgres]' for postgresql:// URLs")
    with postgres_cluster(user="fcdm", password="s3cr@t") as url:
        yield url


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
