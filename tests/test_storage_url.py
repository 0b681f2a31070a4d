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


# ---------------------------------------------------------------------------------------------
# Passwords are never printed or stored (issue 16, item 5)

from pathlib import Path  # noqa: E402

from fcdm_lab.cli import main  # noqa: E402
from fcdm_lab.urls import redact, scrub, without_password  # noqa: E402

SECRET = "s3cretPW"
MALFORMED = [f"postgresql://user:{SECRET}@127.0.0.1:abc/db", f"mysql://user:{SECRET}@host:port/db",
             f"http://user:{SECRET}@127.0.0.1:1", f"postgresql://user:{SECRET}@127.0.0.1:1/db",
             f"postgresql://user:{SECRET}@/db?x=@", f"weird://user:{SECRET}@h@st/x"]


@pytest.mark.parametrize("url", MALFORMED)
def test_redact_hides_the_password_of_any_url_even_unparsable(url):
    assert SECRET not in redact(url) and "***" in redact(url)
    assert SECRET not in without_password(url) and "user" in without_password(url)
    assert SECRET not in scrub(f"could not connect to {url}: refused", url)
    assert redact("sqlite:///optuna.db") == without_password("sqlite:///optuna.db") == "sqlite:///optuna.db"


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out + err


@pytest.mark.parametrize("args", [
    ["ablate", "grn-vs-cca", "--storage", MALFORMED[0]],
    ["train", "--tracking-uri", MALFORMED[0]], ["train", "--tracking-uri", MALFORMED[1]],
    ["train", "--tracking-uri", MALFORMED[2]], ["train", "--tracking-uri", MALFORMED[3]],
    ["report", "0" * 32, "--tracking-uri", MALFORMED[3]],
])
def test_bad_or_unreachable_urls_are_one_line_without_the_password(capsys, args):
    code, text = _cli(capsys, *args, *(["--steps", "1"] if args[0] == "train" else []))
    assert code == 2, text
    assert SECRET not in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1, text
    assert not Path("runs").exists() and not Path("mlflow.db").exists()


def test_a_password_in_the_tracking_uri_is_neither_printed_nor_stored(password_postgres, capsys, monkeypatch):
    """A real password-protected PostgreSQL tracking store: the Browse line, the run folder's
    pointer file and the study's Optuna attributes carry no password; the parent-run error neither."""
    from conftest import TINY

    import optuna

    from fcdm_lab.studies.study import URI_ATTR, check_parent_reachable
    from fcdm_lab.errors import UserError

    password = "s3cr@t"
    uri = password_postgres
    tiny = [f"--set={k}={v}" for k, v in TINY.items()]
    code, text = _cli(capsys, "train", "--tracking-uri", uri, "--steps", "2", "--out", "run", *tiny)
    assert code == 0, text
    assert password not in text and "s3cr%40t" not in text and "Browse:" in text
    pointer = Path("run/mlflow_run.json").read_text()
    assert "s3cr" not in pointer and "fcdm@127.0.0.1" in pointer

    study = Path("two.toml")
    study.write_text('base = "tiny-digits"\nseeds = 1\nsteps = 2\n[[variants]]\nname = "a"\n')
    code, text = _cli(capsys, "ablate", str(study), "--tracking-uri", uri, "--workers", "1",
                      "--storage", "sqlite:///optuna.db", *tiny)
    assert code == 0, text
    assert "s3cr" not in text
    (summary,) = optuna.get_all_study_summaries("sqlite:///optuna.db")
    attrs = optuna.load_study(study_name=summary.study_name, storage="sqlite:///optuna.db").user_attrs
    assert "s3cr" not in attrs[URI_ATTR] and attrs[URI_ATTR].startswith("postgresql://fcdm@")

    class _Missing:
        def get_run(self, run_id):
            raise LookupError(run_id)

    class _Study:
        user_attrs = {URI_ATTR: attrs[URI_ATTR]}

    with pytest.raises(UserError) as e:
        check_parent_reachable(_Missing(), _Study(), "0" * 32, uri, "study")
    assert "s3cr" not in str(e.value)
