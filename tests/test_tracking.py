"""MLflow tracking: run statuses (FINISHED / FAILED / KILLED on SIGINT), children from another
process, what a run records, URI validation and the fast failure on an unreachable server."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import sigint_default

from fcdm_lab.config import load_experiment
from fcdm_lab.errors import UserError
from fcdm_lab.config import config_from_toml, config_to_toml
from fcdm_lab.tracking.client import (check_tracking_uri, default_tracking_uri, get_client, logged_images, NullTracker, probe_tracking_uri, resolve_tracking_uri, tracked_run)
from fcdm_lab.tracking.record import log_run_config, standard_tags
from fcdm_lab.tracking.ui import ui_command


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_run_statuses_and_logging(store):
    with tracked_run("ok", tags={"study": "s"}, params={"a": 1, "nested": {"x": [1, 2]}}) as t:
        t.log_metrics({"loss": 0.5, "acc": 1}, step=3)
        t.log_image(np.zeros((8, 8, 3), np.uint8), "samples", step=3)
        t.log_image(np.full((8, 8, 3), 255, np.uint8), "samples", step=5)
        t.log_dict({"k": 1}, "info.json")
        t.log_text("hello", "notes/a.md")
        t.set_tags({"variant": "v", "skip": None})
        with tracked_run("child", nested=True) as child:
            child.log_metrics({"x": 1.0})
    run = store.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1", "nested": '{"x": [1, 2]}'}
    assert run.data.metrics == {"loss": 0.5, "acc": 1.0}
    assert run.data.tags["study"] == "s" and run.data.tags["variant"] == "v" and "skip" not in run.data.tags
    assert {a.path for a in store.list_artifacts(t.run_id)} == {"images", "info.json", "notes"}
    # a stepped image series (MLflow's chart view compares it across runs), read back by step
    grids = logged_images(store, t.run_id, "samples")
    assert list(grids) == [3, 5] and logged_images(store, t.run_id, "other") == {}
    assert mlflow.artifacts.load_image(f"runs:/{t.run_id}/{grids[5]}").getpixel((0, 0)) == (255, 255, 255)
    assert store.get_run(child.run_id).data.tags["mlflow.parentRunId"] == t.run_id

    with pytest.raises(RuntimeError):
        with tracked_run("bad") as bad:
            raise RuntimeError("boom")
    assert store.get_run(bad.run_id).info.status == "FAILED"

    with pytest.raises(KeyboardInterrupt):
        with tracked_run("interrupted") as stopped:
            raise KeyboardInterrupt
    assert store.get_run(stopped.run_id).info.status == "KILLED"

    # reopening a run (resume) keeps its id and params, logs only new params
    with tracked_run(run_id=bad.run_id, params={"b": 2}) as again:
        pass
    reopened = store.get_run(again.run_id)
    assert again.run_id == bad.run_id and reopened.info.status == "FINISHED" and reopened.data.params == {"b": "2"}


def test_sigint_in_another_process_kills_child_of_parent(store, tmp_path):
    with tracked_run("parent") as parent:
        script = textwrap.dedent(f"""
            import time
            from fcdm_lab.tracking.client import tracked_run
            with tracked_run("worker", parent_run_id="{parent.run_id}") as t:
                print(t.run_id, flush=True)
                time.sleep(120)
        """)
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
                                preexec_fn=sigint_default)
        try:
            run_id = proc.stdout.readline().strip()
            assert run_id, proc.stderr.read()
            proc.send_signal(signal.SIGINT)
            try:
                assert proc.wait(timeout=60) != 0
            except subprocess.TimeoutExpired:  # what the child was doing
                proc.send_signal(signal.SIGABRT)  # faulthandler dumps every thread's stack
                pytest.fail(f"no exit 60 s after SIGINT; its stderr:\n{proc.communicate(timeout=30)[1]}", pytrace=False)
        finally:
            if proc.poll() is None:
                proc.kill()
    child = store.get_run(run_id)
    assert child.info.status == "KILLED"
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id


def test_non_main_process_gets_null_tracker(store, monkeypatch):
    from accelerate.state import PartialState

    # an earlier test in this session may have created accelerate's (single-process) state
    monkeypatch.setattr(PartialState, "_shared_state", {})
    monkeypatch.setenv("RANK", "1")
    with tracked_run("worker-1") as t:
        t.log_metrics({"x": 1.0}, step=1)
        t.log_params({"a": 1})
    assert isinstance(t, NullTracker) and t.run_id is None
    assert store.search_runs([e.experiment_id for e in store.search_experiments()]) == []


def test_config_tags_and_params(store):
    cfg = load_experiment("tiny-digits", {"model.C": 8, "model.block": {"family": "convnext", "mixer": "cca"}})
    info = {"name": "FCDM", "params": 1234, "gmacs": 0.001, "kwargs": {"block": {"family": "convnext", "mixer": "cca"}},
            "match": {"knob": "ratio", "from_value": 3.0, "to_value": 2.5, "target_gmacs": 0.001, "gmacs": 0.001}}
    tags = standard_tags(cfg, info, {"name": "digits", "fingerprint": "abc"}, study="s", variant="cca", seed=3)
    assert tags["study"] == "s" and tags["variant"] == "cca" and tags["seed"] == "3"
    assert tags["data_fingerprint"] == "abc" and tags["preset"] == "FCDM"
    assert '"mixer": "cca"' in tags["block"] and '"kernel": 7' in tags["block"]  # the resolved spec
    for pkg in ("torch", "diffusers", "accelerate", "mlflow", "optuna", "torch-fidelity", "fcdm-lab"):
        assert tags[f"version.{pkg}"]
    assert len(tags["git_commit"]) == 40 and tags["git_dirty"] in ("true", "false")  # this checkout is git

    with tracked_run("cfg", tags=tags) as t:
        log_run_config(t, cfg, info)
    run = store.get_run(t.run_id)
    p = run.data.params
    assert p["model.C"] == "8" and p["train.lr"] == "0.001" and p["model.params"] == "1234"
    assert p["model.match_knob"] == "ratio" and p["model.match_value"] == "2.5"
    assert config_from_toml(config_to_toml(cfg)) == cfg  # config.toml round-trips (logged by the run pipeline)


def test_datasets_are_run_inputs(store):
    """log_datasets (the pipeline calls it after training): the training set (context training) and,
    when the run evaluates, its reference set (context evaluation), metadata only; the digest follows
    the data (another resolution is other data), and logging again on resume adds nothing."""
    from fcdm_lab.data.build import build_dataset
    from fcdm_lab.tracking.record import log_datasets

    cfg = load_experiment("tiny-digits", {"eval.reference": "digits-test"})
    _, info = build_dataset({"name": "digits"}, "train")
    _, info16 = build_dataset({"name": "digits", "image_size": 16}, "train")
    with tracked_run("data") as t:
        log_datasets(t, cfg, info, evaluation=True)
        log_datasets(t, cfg, info, evaluation=True)  # a resumed run logs again
    with tracked_run("data16") as t16:
        log_datasets(t16, cfg, info16)
    inputs = store.get_run(t.run_id).inputs.dataset_inputs
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert len(inputs) == 2 and [i.tags[0].key for i in inputs] == ["mlflow.data.context"] * 2
    train, ref = by_context["training"], by_context["evaluation"]
    assert train.name == "digits" and train.digest == info["fingerprint"]
    assert json.loads(train.profile) == {"num_items": 1500, "image_size": 8, "channels": 1, "num_classes": 10,
                                         "split": "train"}
    assert json.loads(train.schema)["mlflow_colspec"][0]["tensor-spec"]["shape"] == [-1, 1, 8, 8]
    assert ref.name == "digits-test" and json.loads(ref.profile)["num_items"] == 297
    (only,) = store.get_run(t16.run_id).inputs.dataset_inputs
    assert only.dataset.name == "digits" and only.dataset.digest == info16["fingerprint"] != train.digest


def test_tracking_uri_forms(monkeypatch, tmp_path):
    for bad in ("htp://x", "http://", "sqlite://relative.db", "mlflow.db", "http://h:99999", ""):
        with pytest.raises(UserError, match="malformed tracking URI.*valid forms: http://HOST:PORT"):
            check_tracking_uri(bad)
    for good in ("http://127.0.0.1:5000", "https://mlflow.example.com", "sqlite:///mlflow.db",
                 "sqlite:////abs/x.db", "file:///tmp/mlruns", "postgresql+psycopg2://u@h/db"):
        assert check_tracking_uri(good) == good
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///from-env.db")
    assert resolve_tracking_uri("sqlite:///arg.db") == "sqlite:///arg.db"
    assert resolve_tracking_uri() == "sqlite:///from-env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri() == default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    with pytest.raises(UserError, match="malformed"):
        with tracked_run("x", uri="nonsense"):
            pass


def test_unreachable_server_fails_fast(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.time()
    with pytest.raises(UserError, match="unreachable"):
        probe_tracking_uri(uri)
    with pytest.raises(UserError, match="unreachable"):
        with tracked_run("never", uri=uri):
            pytest.fail("the run must not start")
    assert time.time() - start < 10


def test_ui_command_uses_loopback_and_store():
    cmd = ui_command("sqlite:///x.db")
    assert cmd[-8:] == ["--backend-store-uri", "sqlite:///x.db", "--host", "127.0.0.1", "--port", "5000",
                        "--workers", "1"]
    with pytest.raises(UserError, match="already a tracking server"):
        ui_command("http://127.0.0.1:5000")


def test_http_tracking_server(tmp_path):
    """A real `mlflow server` (~20 s to start): runs, metrics and artifacts through HTTP."""
    port = closed_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                probe_tracking_uri(uri, timeout=2)
                break
            except UserError:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        with tracked_run("remote", uri=uri, params={"a": 1}) as t:
            t.log_metrics({"loss": 1.0}, step=1)
            t.log_image(np.zeros((4, 4, 3), np.uint8), "samples", step=2)
        run = get_client(uri).get_run(t.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics == {"loss": 1.0}
        assert list(logged_images(get_client(uri), t.run_id, "samples")) == [2]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_config_rebuilds_from_logged_params():
    """`fcdm-lab rerun` falls back to the params when a run lost its config.toml artifact."""
    from fcdm_lab.studies.rerun import config_from_params
    from fcdm_lab.tracking.client import _param_value
    from fcdm_lab.tracking.record import model_params

    cfg = load_experiment("tiny-digits", {"model.block": {"family": "convnext", "mixer": "cca", "ratio": 2.5},
                                          "model.match_flops": "ratio", "train.grad_clip": 1.0})
    logged = {k: _param_value(v) for k, v in cfg.flat().items()}
    logged.update({k: _param_value(v) for k, v in model_params({"params": 10, "gmacs": 0.01, "match": {
        "knob": "ratio", "to_value": 2.5, "target_gmacs": 0.01}}).items()})
    assert config_from_params(logged) == cfg
