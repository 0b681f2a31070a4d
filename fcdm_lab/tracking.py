"""Experiment tracking with MLflow: one run per training job, studies as parent runs with children.

    with tracked_run("grn", tags={"study": "grn-vs-cca"}, parent_run_id=parent) as tracker:
        tracker.log_params({...}); tracker.log_metrics({"loss": 0.1}, step=10)

Runs are created through `MlflowClient` with explicit run ids rather than MLflow's fluent API: the
fluent API keeps one global run stack per process, while studies and sweeps open runs one after the
other, attach children to a parent from any process (`parent_run_id=`) and reopen unfinished runs
to resume them. Only the main process of a distributed job logs; the others get a `NullTracker`.

Where runs go: `uri` argument (`--tracking-uri`) > `MLFLOW_TRACKING_URI` > MLflow's own default,
`sqlite:///<cwd>/mlflow.db` with artifacts in `./mlruns`. A tracking server is probed before any
training starts, so an unreachable one is reported within seconds instead of after a run.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional
from urllib.parse import urlsplit

from .errors import UserError, choices

DEFAULT_EXPERIMENT = "fcdm-lab"
RUN_FILE = "mlflow_run.json"            # written into a training out dir: which run holds its logs
URI_SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql")
URI_FORMS = ("http://HOST:PORT", "https://HOST", "sqlite:///PATH/mlflow.db", "file:///ABS/DIR",
             "postgresql://USER@HOST/DB", "mysql://USER@HOST/DB")
PROBE_TIMEOUT_S = 5.0
PARAM_MAX_CHARS = 6000                  # MLflow 3's limit for one param value
VERSION_PACKAGES = ("torch", "diffusers", "accelerate", "mlflow", "optuna", "torch-fidelity", "fcdm-lab")
MODEL_PARAM_KEYS = ("model.params", "model.gmacs", "model.match_knob", "model.match_value", "model.match_target")
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
    bad = f"malformed tracking URI {uri!r}; valid forms: {choices(URI_FORMS)}"
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


def probe_tracking_uri(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast with a UserError when the tracking store cannot be used.

    A server is asked for `/health` with a short timeout (any HTTP answer counts as reachable: the
    real API calls will report what is wrong with it); a local SQLite store gets its folder made.
    """
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        base = uri.rstrip("/")
        # /health answers without credentials; a server behind auth answers the REST API with 401/403
        codes = [_http_status(base + "/health", timeout, uri),
                 _http_status(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout, uri)]
        if not (codes[0] == 200 or codes[1] in (200, 401, 403)):
            raise UserError(f"{uri} answered HTTP {codes[0]} on /health and {codes[1]} on the REST API: it does "
                            f"not look like an MLflow tracking server (valid forms: {choices(URI_FORMS)})")
    elif parts.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):])
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)


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
            f"tracking server {uri} is unreachable ({getattr(e, 'reason', e)}); start one (`mlflow server "
            f"--host 127.0.0.1 --port {port}`) or pick another store with --tracking-uri / MLFLOW_TRACKING_URI "
            f"(valid forms: {choices(URI_FORMS)})") from None


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_client(uri: str | None = None, *, probe: bool = True):
    """An MlflowClient for the resolved URI (probed first)."""
    uri = resolve_tracking_uri(uri)
    if probe:
        probe_tracking_uri(uri)
    return _client(uri)


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
    client = client or get_client(uri)
    try:
        return client.get_run(run_id)
    except Exception:
        raise UserError(f"no MLflow run {run_id!r} in {client.tracking_uri}; list runs with `fcdm-lab ui` "
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

    def log_image(self, image, artifact_file: str) -> None:
        self.client.log_image(self.run_id, _to_image_array(image), artifact_file=artifact_file)

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


class NullTracker:
    """What non-main processes get: every call does nothing, run_id is None."""

    active = False
    run_id = None
    tracking_uri = None

    def _noop(self, *args, **kwargs) -> None:
        return None

    log_params = log_metrics = log_image = log_artifact = log_dict = log_text = set_tags = _noop


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


def attach_run(run_id: str, uri: str | None = None) -> Tracker:
    """A Tracker that logs into an existing run without changing its status (e.g. evaluation
    metrics added to a finished training run)."""
    client = get_client(uri)
    get_run(run_id, client=client)  # a UserError if it does not exist
    return Tracker(client, run_id, resumed=True)


# ---------------------------------------------------------------------------------------------
# What every run records
# ---------------------------------------------------------------------------------------------

def _git(*args: str, cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout holding the fcdm_lab sources; (None, None) when the
    package is not a tracked part of a git checkout (e.g. installed from a wheel)."""
    pkg = Path(__file__).resolve().parent
    if _git("ls-files", "--error-unmatch", "__init__.py", cwd=pkg) is None:
        return None, None
    commit = _git("rev-parse", "HEAD", cwd=pkg)
    status = _git("status", "--porcelain", "--", ".", cwd=pkg)
    return commit, (None if status is None else bool(status))


def package_versions() -> Dict[str, str]:
    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def block_spec_of(cfg, model_info: Mapping[str, Any] | None = None) -> Dict[str, Any] | None:
    """The resolved block spec actually built (after compute matching), None for baselines."""
    kwargs = (model_info or {}).get("kwargs") or {}
    spec = kwargs.get("block", cfg.model.block)
    from .models import model_family
    from .models.blocks import resolve_block_spec

    try:
        if model_family(cfg.model.name) != "fcdm":
            return None
    except UserError:
        return None
    return resolve_block_spec(spec)


def standard_tags(cfg, model_info: Mapping[str, Any] | None = None, data_info: Mapping[str, Any] | None = None,
                  *, study: str | None = None, variant: str | None = None, seed: int | None = None) -> Dict[str, str]:
    """Tags every run carries: what was trained (experiment, preset, block spec), where it sits
    (study, variant, seed), which code (git commit + dirty flag, package versions) and which data."""
    commit, dirty = git_state()
    block = block_spec_of(cfg, model_info)
    tags: Dict[str, Any] = {
        "experiment": cfg.name,
        "preset": (model_info or {}).get("name", cfg.model.name),
        "block": json.dumps(block, sort_keys=True) if block is not None else None,
        "study": study,
        "variant": variant,
        "seed": seed,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,  # shown by the MLflow UI as the run's source version
        "git_dirty": None if dirty is None else str(dirty).lower(),
        "data": (data_info or {}).get("name", cfg.data.name),
        "data_fingerprint": (data_info or {}).get("fingerprint"),
    }
    tags.update({f"version.{k}": v for k, v in package_versions().items()})
    return {k: str(v) for k, v in tags.items() if v is not None}


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def config_to_toml(cfg) -> str:
    """The resolved config as TOML (TOML has no null: unset optional keys are left out, which
    reloads to the same config since every optional field defaults to None)."""
    import tomli_w

    return tomli_w.dumps(_drop_none(cfg.to_dict()))


def config_from_toml(text: str):
    import tomllib

    from .config import config_from_dict

    return config_from_dict(tomllib.loads(text))


def run_environment() -> Dict[str, Any]:
    """Params of where a job ran: world size (processes) and device, from accelerate's state (set up
    by the trainer; in a process without one, this single process)."""
    from accelerate import PartialState

    state = PartialState()
    out: Dict[str, Any] = {"world_size": state.num_processes, "device": state.device.type}
    if state.device.type == "cuda":
        import torch

        out["device_name"] = torch.cuda.get_device_name(state.device)
    return out


def model_params(model_info: Mapping[str, Any]) -> Dict[str, Any]:
    """MLflow params describing a built model (MODEL_PARAM_KEYS): size, compute and the
    compute-matching outcome (knob, solved value, target GMACs)."""
    out: Dict[str, Any] = {"model.params": model_info["params"], "model.gmacs": round(float(model_info["gmacs"]), 6)}
    match = model_info.get("match")
    if match:
        out["model.match_knob"] = match["knob"]
        out["model.match_value"] = match.get("to_value", match.get("to"))
        out["model.match_target"] = round(float(match["target_gmacs"]), 6)
    return out


def log_run_config(tracker, cfg, model_info: Mapping[str, Any] | None = None) -> None:
    """Params = the flattened resolved config (+ params count, GMACs and the matched knob once the
    model is built); artifact `config.toml` = the resolved config, the input of `fcdm-lab rerun`."""
    params = dict(cfg.flat())
    if model_info is not None:
        params.update(model_params(model_info))
        tracker.log_dict(_drop_none(dict(model_info)), "model_info.json")
    tracker.log_params(params)
    tracker.log_text(config_to_toml(cfg), "config.toml")


# ---------------------------------------------------------------------------------------------
# Training inside a run
# ---------------------------------------------------------------------------------------------

@dataclass
class RunPointer:
    """Contents of `<out_dir>/mlflow_run.json`: which run a training folder logged into."""

    run_id: str
    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT

    def save(self, out_dir) -> Path:
        path = Path(out_dir) / RUN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__, indent=2) + "\n")
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


def train_in_run(tracker, cfg, out_dir, *, resume=None, progress: bool = True, study: str | None = None,
                 variant: str | None = None, seed: int | None = None, max_steps: int | None = None):
    """Train `cfg` into `out_dir` logging into an open run (the pipeline without evaluation);
    returns the TrainResult. See `fcdm_lab.pipeline.run_pipeline`."""
    from .pipeline import run_pipeline

    return run_pipeline(tracker, cfg, out_dir, resume=resume, progress=progress, study=study, variant=variant,
                        seed=seed, max_steps=max_steps).train


def _resumable_run_id(out_dir, uri: str, resume) -> str | None:
    """The MLflow run a resumed training folder logged into (its pointer file), if this store has it:
    resuming continues that run instead of splitting one training over two runs."""
    if resume is None:
        return None
    pointer = RunPointer.find(out_dir if resume == "latest" else resume)
    if pointer is None or pointer.tracking_uri != uri:
        return None
    try:
        _client(uri).get_run(pointer.run_id)
    except Exception:
        return None
    return pointer.run_id


def train_tracked(cfg, out_dir, *, uri: str | None = None, resume=None, run_name: str | None = None,
                  parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                  progress: bool = True, experiment: str = DEFAULT_EXPERIMENT, max_steps: int | None = None,
                  evaluate: bool = False):
    """The `fcdm-lab train` library function: check everything (config, model, data, output folder,
    checkpoint, store) before creating anything, then open a run (or reopen the folder's run when
    resuming), train, evaluate (evaluate=True) and log. Returns (TrainResult, run_id); run_id is
    None in non-main processes."""
    from .pipeline import preflight, run_pipeline

    checked = preflight(cfg, out_dir, resume=resume)  # a refused run leaves no run, folder or pointer
    uri = resolve_tracking_uri(uri)
    main = is_main_process()  # under `accelerate launch` only the main process touches the store: two
    if main:                  # processes creating a fresh SQLite store at once would collide
        get_client(uri)  # probe the store before training
    with tracked_run(run_name or cfg.name, uri=uri, experiment=experiment, tags=tags, parent_run_id=parent_run_id,
                     run_id=_resumable_run_id(out_dir, uri, checked.resume) if main else None) as tracker:
        out = run_pipeline(tracker, cfg, out_dir, resume=checked.resume, progress=progress, max_steps=max_steps,
                           evaluate=evaluate)
    return out.train, tracker.run_id


# ---------------------------------------------------------------------------------------------
# Browsing
# ---------------------------------------------------------------------------------------------

def ui_command(uri: str | None = None, host: str = "127.0.0.1", port: int = 5000, workers: int = 1) -> list[str]:
    """The `mlflow ui` command line for a store. One worker: MLflow's default 4 are heavy on a
    small machine and one person browsing needs one."""
    uri = resolve_tracking_uri(uri)
    if urlsplit(uri).scheme in ("http", "https"):
        raise UserError(f"{uri} is already a tracking server: open it in a browser instead of starting a UI")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", str(workers)]


def launch_ui(uri: str | None = None, host: str = "127.0.0.1", port: int = 5000) -> int:
    """Run `mlflow ui` in the foreground (loopback by default) until Ctrl+C or SIGTERM, then stop
    the server (SIGTERM reaches its worker processes); returns its exit code."""
    import signal

    cmd = ui_command(uri, host, port)
    store = cmd[cmd.index("--backend-store-uri") + 1]
    probe_tracking_uri(store)
    exp = _client(store).get_experiment_by_name(DEFAULT_EXPERIMENT)
    link = ui_link(f"http://{host}:{port}", exp.experiment_id if exp is not None else None)
    print(f"MLflow UI for {store}: open {link} (Ctrl+C to stop)", flush=True)
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


def ui_link(base_url: str, experiment_id: str | None = None) -> str:
    """A link to an experiment's runs table (or the UI's home) in MLflow's model-training view."""
    path = f"#/experiments/{experiment_id}/runs" if experiment_id is not None else "#/"
    return f"{base_url.rstrip('/')}/{path}?{UI_WORKFLOW_QUERY}"


def browse_hint(run_id: str | None, uri: str | None = None, *, report: bool = False) -> str:
    """One closing line: how to look at a run (a link to its experiment's runs table)."""
    uri = resolve_tracking_uri(uri)
    try:
        exp_id = _client(uri).get_run(run_id).info.experiment_id if run_id else None
    except Exception:  # a hint must not fail the command that has just finished
        exp_id = None
    if urlsplit(uri).scheme in ("http", "https"):
        where = f"open {ui_link(uri, exp_id)}"
    elif uri == default_tracking_uri() and not os.environ.get("MLFLOW_TRACKING_URI"):
        where = f"run `fcdm-lab ui`, open {ui_link('http://127.0.0.1:5000', exp_id)}"
    else:
        where = f"run `MLFLOW_TRACKING_URI={uri} fcdm-lab ui`, open {ui_link('http://127.0.0.1:5000', exp_id)}"
    text = f"Browse: {where} (run {run_id})"
    if report:
        text += f"; rebuild the report: `fcdm-lab report {run_id}`"
    return text


__all__ = [
    "DEFAULT_EXPERIMENT", "NullTracker", "RunPointer", "Tracker", "attach_run", "browse_hint", "check_tracking_uri",
    "config_from_toml", "config_to_toml", "default_tracking_uri", "experiment_id", "get_client", "get_run",
    "git_state", "is_main_process", "launch_ui", "log_run_config", "model_params", "package_versions",
    "probe_tracking_uri", "resolve_tracking_uri", "standard_tags", "tracked_run", "train_in_run", "train_tracked",
    "run_environment", "ui_command", "ui_link",
]
