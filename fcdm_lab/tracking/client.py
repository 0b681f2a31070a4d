"""MLflow stores, clients and runs: where runs go, opening and logging them, the run pointer.

    with tracked_run("grn", tags={"study": "grn-vs-cca"}, parent_run_id=parent) as tracker:
        tracker.log_params({...}); tracker.log_metrics({"loss": 0.1}, step=10)

Runs are created through `MlflowClient` with explicit run ids rather than MLflow's fluent API: the
fluent API keeps one global run stack per process, while studies and sweeps open runs one after the
other, attach children to a parent from any process (`parent_run_id=`) and reopen unfinished runs
to resume them. Only the main process of a distributed job logs; the others get a `NullTracker`.
A training folder records which run holds its logs in `mlflow_run.json` (`RunPointer`).

Where runs go: `uri` argument (`--tracking-uri`) > `MLFLOW_TRACKING_URI` > MLflow's own default,
`sqlite:///<cwd>/mlflow.db` with artifacts in `./mlruns`. A store is probed before any training
starts, so an unreachable one is reported within seconds instead of after a run.

The other jobs of tracking: record.py says what every run records, ui.py browses.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from dataclasses import dataclass
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from ..errors import UserError, choices
from ..urls import redact, scrub, without_password

DEFAULT_EXPERIMENT = "fcdm-lab"
URI_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql")
URI_FORMS = ("http://HOST:PORT", "https://HOST", "sqlite:///PATH/mlflow.db", "file:///ABS/DIR",
             "postgresql://USER@HOST/DB", "mysql://USER@HOST/DB")
PROBE_TIMEOUT_S = 5.0
PARAM_MAX_CHARS = 6000                  # MLflow 3's limit for one param value
STATUS_FINISHED, STATUS_FAILED, STATUS_KILLED, STATUS_RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
# MLflow 3 opens an experiment in its GenAI view (empty traces) unless the browser's sidebar toggle says
# "Model training" (kept in localStorage; mlflow/mlflow issue 24498). The levers: this experiment tag
# and the `workflowType` query parameter on every link we print.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
UI_WORKFLOW_QUERY = "workflowType=machine_learning"

# After the probe, a server that goes away mid-run should fail a logging call in seconds, not hang
# for minutes (MLflow's defaults: 7 retries with exponential backoff, 120 s per request).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reports download small files


# ---------------------------------------------------------------------------------------------
# Tracking URI: resolve, validate, probe
# ---------------------------------------------------------------------------------------------

def default_tracking_uri() -> str:
    """MLflow's default store for the current folder (made explicit so it can be printed)."""
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> str:
    """Validate the form of a tracking URI; a malformed one is a one-line UserError."""
    bad = f"malformed tracking URI {redact(uri)!r}; valid forms: {choices(URI_FORMS)}"
    if not isinstance(uri, str) or not uri.strip():
        raise UserError(bad)
    uri = uri.strip()
    if uri == "databricks" or uri.startswith("databricks://"):
        return uri
    parts = urlsplit(uri)
    if parts.scheme.split("+")[0] not in URI_SCHEMES:  # "postgresql+psycopg2" is a SQLAlchemy driver form
        raise UserError(bad)
    scheme = parts.scheme.split("+")[0]
    try:
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise UserError(bad) from None
    if scheme in ("http", "https") and (not parts.hostname or port == 0):
        raise UserError(bad)
    if scheme == "sqlite" and (not uri.startswith("sqlite:///") or len(uri) <= len("sqlite:///")):
        raise UserError(bad)
    if scheme == "file" and not parts.path:
        raise UserError(bad)
    if scheme in ("postgresql", "mysql", "mssql") and not parts.hostname:
        raise UserError(bad)
    return uri


def resolve_tracking_uri(uri: str | None = None) -> str:
    """`uri` > MLFLOW_TRACKING_URI > `sqlite:///<cwd>/mlflow.db`, validated."""
    return check_tracking_uri(uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())


def probe_tracking_uri(uri: str, timeout: float = PROBE_TIMEOUT_S, *, existing: bool = False) -> None:
    """Fail fast with a UserError when the tracking store cannot be used.

    A server is asked for `/health` with a short timeout (any HTTP answer counts as reachable: the
    real API calls will report what is wrong with it); a database server (postgresql, mysql, mssql)
    gets one connection attempt with a short timeout (MLflow itself retries for minutes); a local
    SQLite file must be an SQLite database, and gets its folder made. existing=True (commands that
    only read runs): a SQLite store must already exist, so that asking for a run id in an empty
    folder does not leave an empty mlflow.db behind.
    """
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        # /health answers without credentials; a server behind auth answers the REST API with 401/403
        codes = [_http_status(base + "/health", timeout, uri),
                 _http_status(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout, uri)]
        if not (codes[0] == 200 or codes[1] in (200, 401, 403)):
            raise UserError(f"{redact(uri)} answered HTTP {codes[0]} on /health and {codes[1]} on the REST API: it does "
                            f"not look like an MLflow tracking server (valid forms: {choices(URI_FORMS)})")
    elif scheme in ("postgresql", "mysql", "mssql"):
        _probe_database(uri, timeout)
    elif scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        if str(path) == ":memory:":
            return
        if path.exists():
            _check_sqlite_file(path, uri)
        elif existing:
            raise UserError(f"no MLflow store at {path} (the file does not exist); pass the store the runs are in with "
                            f"--tracking-uri or MLFLOW_TRACKING_URI")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)


SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite_file(path: Path, uri: str) -> None:
    """A one-line UserError unless `path` is a readable SQLite database (an empty file is one)."""
    import sqlite3

    if path.is_dir():
        raise UserError(f"tracking store {redact(uri)}: {path} is a folder, not an SQLite database file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
        if head and head != SQLITE_HEADER:
            raise sqlite3.DatabaseError("file is not a database")
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            db.execute("SELECT name FROM sqlite_master LIMIT 1").fetchall()
    except (sqlite3.DatabaseError, OSError) as e:
        raise UserError(f"tracking store {path} is not a readable SQLite database ({e}); move it aside or pass "
                        f"another store with --tracking-uri") from None


def _probe_database(uri: str, timeout: float) -> None:
    """One connection to a database tracking store, `timeout` seconds at most."""
    from sqlalchemy import create_engine, exc

    scheme = urlsplit(uri).scheme.split("+")[0]
    connect_args = {"connect_timeout": max(1, int(timeout))} if scheme in ("postgresql", "mysql") else {}
    try:
        engine = create_engine(uri, connect_args=connect_args, poolclass=_null_pool())
        with engine.connect():
            pass
        engine.dispose()
    except ImportError as e:
        raise UserError(f"tracking store {redact(uri)} needs a database driver that is not installed "
                        f"({scrub(e, uri)}); install it (pip install -e '.[postgres]' for postgresql://)") from None
    except exc.SQLAlchemyError as e:
        reason = scrub(str(getattr(e, "orig", None) or e).strip().splitlines()[0], uri)
        raise UserError(f"tracking store {redact(uri)} is unreachable ({reason}); start the database or pick "
                        f"another store with --tracking-uri / MLFLOW_TRACKING_URI") from None


def _null_pool():
    from sqlalchemy.pool import NullPool

    return NullPool


def _http_status(url: str, timeout: float, uri: str) -> int:
    """HTTP status of a GET; a connection that fails or times out is a UserError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError) as e:
        port = urlsplit(uri).port or 5000
        raise UserError(
            f"tracking server {redact(uri)} is unreachable ({scrub(getattr(e, 'reason', e), uri)}); start one (`mlflow server "
            f"--host 127.0.0.1 --port {port}`) or pick another store with --tracking-uri / MLFLOW_TRACKING_URI "
            f"(valid forms: {choices(URI_FORMS)})") from None


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_client(uri: str | None = None, *, probe: bool = True, existing: bool = False):
    """An MlflowClient for the resolved URI (probed first; existing=True: a local store must exist)."""
    uri = resolve_tracking_uri(uri)
    if probe:
        probe_tracking_uri(uri, existing=existing)
    return mlflow_client(uri)


def experiment_id(client, name: str = DEFAULT_EXPERIMENT) -> str:
    """Id of the named experiment, created on first use (a concurrent creator may win the race)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) "
                            f"or use another experiment name")
        if exp.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older version or by hand
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def get_run(run_id: str, uri: str | None = None, *, client=None):
    """The MLflow Run with this id, or a UserError saying where it was looked for."""
    client = client or get_client(uri, existing=True)
    try:
        return client.get_run(run_id)
    except Exception:
        raise UserError(f"no MLflow run {run_id!r} in {redact(client.tracking_uri)}; list runs with `fcdm-lab ui` "
                        f"or pass the store with --tracking-uri") from None


# ---------------------------------------------------------------------------------------------
# Trackers
# ---------------------------------------------------------------------------------------------

def is_main_process() -> bool:
    """True in the process that logs: accelerate's main process once its state exists, else RANK 0
    (torchrun and `accelerate launch` set RANK before the trainer creates its Accelerator)."""
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            return PartialState().is_main_process
    except ImportError:  # accelerate is a dependency, but tracking must not need it
        pass
    return int(os.environ.get("RANK", "0")) == 0


def _param_value(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        value = json.dumps(value, sort_keys=True)
    text = str(value)
    return text if len(text) <= PARAM_MAX_CHARS else text[: PARAM_MAX_CHARS - 3] + "..."


def _to_image_array(image):
    """PIL image, HWC uint8 ndarray or a CHW/HWC tensor -> something MlflowClient.log_image takes."""
    try:
        import torch

        if torch.is_tensor(image):
            image = image.detach().cpu()
            if image.dim() == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
                image = image.permute(1, 2, 0)
            image = image.numpy()
    except ImportError:
        pass
    return image


class Tracker:
    """Logs into one MLflow run (the trainer's tracker duck type, plus params/tags/text)."""

    active = True

    def __init__(self, client, run_id: str, *, resumed: bool = False):
        self.client = client
        self.run_id = run_id
        self._resumed = resumed

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = {str(k): _param_value(v) for k, v in params.items()}
        if self._resumed:  # a reopened run: params are immutable in MLflow, log only new ones
            existing = self.client.get_run(self.run_id).data.params
            changed = sorted(k for k, v in items.items() if k in existing and existing[k] != v)
            if changed:
                warnings.warn(f"run {self.run_id}: params {choices(changed)} differ from the values logged "
                              f"before; keeping the logged values", stacklevel=2)
            items = {k: v for k, v in items.items() if k not in existing}
        keys = list(items)
        for i in range(0, len(keys), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=[Param(k, items[k]) for k in keys[i:i + 100]])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(str(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])

    def log_image(self, image, key: str, step: int = 0) -> None:
        """One image of a stepped series (key + step: MLflow's experiment chart view compares a key's
        images across runs with a step slider; plain artifact files cannot be compared)."""
        self.client.log_image(self.run_id, _to_image_array(image), key=key, step=int(step))

    def log_inputs(self, datasets) -> None:
        """Datasets as run inputs: (mlflow.data Dataset, context) pairs; MLflow keeps one input per
        (name, digest), so logging again on resume adds nothing."""
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        self.client.log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, ctx)])
                                             for ds, ctx in datasets])

    def log_artifact(self, local_path, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(dictionary), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)


def logged_images(client, run_id: str, key: str) -> Dict[int, str]:
    """{step: artifact path of the full-size PNG} of a run's stepped image series `key`.

    Hand-parsed because MLflow has no reader for these (its UI parses the names in JavaScript):
    `MlflowClient.log_image(key=, step=)` stores `images/<key, / as ~>+step+<N>+timestamp+<ms>+<uuid>.png`
    next to a `+compressed.webp` preview. The newest image wins when one step was logged twice."""
    prefix = key.replace("/", "~") + "+step+"
    found: Dict[int, tuple[int, str]] = {}
    for item in client.list_artifacts(run_id, "images"):
        name = item.path.rsplit("/", 1)[-1]
        if item.is_dir or not name.startswith(prefix) or not name.endswith(".png"):
            continue
        parts = name[len(prefix):].split("+")  # N, "timestamp", ms, uuid.png
        try:
            step, stamp = int(parts[0]), int(parts[2])
        except (IndexError, ValueError):
            continue
        if step not in found or stamp >= found[step][0]:
            found[step] = (stamp, item.path)
    return {step: path for step, (_, path) in sorted(found.items())}


class NullTracker:
    """What non-main processes get: every call does nothing, run_id is None."""

    active = False
    run_id = None
    tracking_uri = None

    def _noop(self, *args, **kwargs) -> None:
        return None

    log_params = log_metrics = log_image = log_inputs = log_artifact = log_dict = log_text = set_tags = _noop


# Innermost open tracked run of this process (for nested=True).
_current: contextvars.ContextVar[Optional[Tracker]] = contextvars.ContextVar("fcdm_lab_current_run", default=None)


def _end_run(client, run_id: str, status: str) -> None:
    try:
        client.set_terminated(run_id, status)
    except Exception as e:  # never hide the exception that ended the run behind a logging error
        print(f"warning: could not mark MLflow run {run_id} {status}: {e}", file=sys.stderr)


@contextlib.contextmanager
def tracked_run(name: str | None = None, *, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                parent_run_id: str | None = None, nested: bool = False,
                run_id: str | None = None) -> Iterator[Tracker | NullTracker]:
    """Open an MLflow run for the duration of the block and yield its Tracker.

    Ends the run FINISHED on success, FAILED on an exception and KILLED on KeyboardInterrupt (the
    exception is re-raised). parent_run_id attaches the run as a child of any existing run (from any
    process); nested=True uses the innermost tracked run open in this process as the parent.
    run_id reopens an existing run (to resume it) instead of creating one. Non-main processes of a
    distributed job get a NullTracker.
    """
    if not is_main_process():
        yield NullTracker()
        return
    client = get_client(uri)
    if nested and parent_run_id is None:
        outer = _current.get()
        if outer is None:
            raise RuntimeError("tracked_run(nested=True) needs an enclosing tracked_run in this process")
        parent_run_id = outer.run_id
    if run_id is not None:
        client.get_run(run_id)  # raises if it does not exist
        client.update_run(run_id, status=STATUS_RUNNING)
        tracker = Tracker(client, run_id, resumed=True)
        if tags:
            tracker.set_tags(tags)
    else:
        from mlflow.tracking.context.registry import resolve_tags

        all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = client.create_run(experiment_id(client, experiment), run_name=name, tags=resolve_tags(all_tags))
        tracker = Tracker(client, run.info.run_id)
    if params:
        tracker.log_params(params)
    token = _current.set(tracker)
    try:
        yield tracker
    except KeyboardInterrupt:
        _end_run(client, tracker.run_id, STATUS_KILLED)
        raise
    except BaseException:
        _end_run(client, tracker.run_id, STATUS_FAILED)
        raise
    else:
        _end_run(client, tracker.run_id, STATUS_FINISHED)
    finally:
        _current.reset(token)


def logged_steps(tracker, key: str) -> int:
    """The last step at which `tracker`'s run logged the metric `key` (0 when never, or no run)."""
    if not getattr(tracker, "active", False):
        return 0
    history = tracker.client.get_metric_history(tracker.run_id, key)
    return max((m.step for m in history), default=0)


def attach_run(run_id: str, uri: str | None = None) -> Tracker:
    """A Tracker that logs into an existing run without changing its status (e.g. evaluation
    metrics added to a finished training run)."""
    client = get_client(uri, existing=True)
    get_run(run_id, client=client)  # a UserError if it does not exist
    return Tracker(client, run_id, resumed=True)


# ---------------------------------------------------------------------------------------------
# The run pointer: which run a training folder logged into
# ---------------------------------------------------------------------------------------------

RUN_FILE = "mlflow_run.json"            # written into a training out dir: which run holds its logs


@dataclass
class RunPointer:
    """Contents of `<out_dir>/mlflow_run.json`: which run a training folder logged into. The URI is
    stored without its password (the environment supplies it when the run is reopened)."""

    run_id: str
    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT

    def save(self, out_dir) -> Path:
        path = Path(out_dir) / RUN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**self.__dict__, "tracking_uri": without_password(self.tracking_uri)}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def find(cls, path) -> Optional["RunPointer"]:
        """The pointer of the training folder holding `path` (a checkpoint file or the folder)."""
        p = Path(path).resolve()
        for folder in [p, *p.parents][:4]:
            f = folder / RUN_FILE
            if f.is_file():
                try:
                    return cls(**json.loads(f.read_text()))
                except (ValueError, TypeError):
                    return None
        return None


def resumable_run_id(out_dir, uri: str, resume) -> str | None:
    """The MLflow run a resumed training folder logged into (its pointer file), if this store has it:
    resuming continues that run instead of splitting one training over two runs."""
    if resume is None:
        return None
    pointer = RunPointer.find(out_dir if resume == "latest" else resume)
    if pointer is None or without_password(pointer.tracking_uri) != without_password(uri):
        return None
    try:
        mlflow_client(uri).get_run(pointer.run_id)
    except Exception:
        return None
    return pointer.run_id
