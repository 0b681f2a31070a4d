"""Optuna sweeps: several worker processes on one study, failing and pruned trials, the Pareto
front and its plot, strict sweep files and storage URLs.

Each sweep here trains FCDM L=1, C in {8, 16} on the 8x8 digits for a handful of steps and judges
20 samples drawn with 3 DDIM steps: seconds per trial.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from fcdm_lab.errors import UserError
from fcdm_lab.studies import sweep as sw
from fcdm_lab.studies.sweep_file import load_sweep, sweep_names

BASE = """
name = "sweep-test"
[model]
name = "FCDM"
L = 1
C = 8
[data]
name = "digits"
[train]
steps = 4
batch_size = 16
lr = 1e-3
ema_warmup = true
log_every = 2
ckpt_every = 100
keep_last = 1
sample_every = 0
[eval]
num_samples = 20
sampler = "ddim"
steps = 3
reference = "digits-test"
metrics = ["fid_digits"]
"""

PARETO = '[ { metric = "fid_digits", direction = "minimize" }, { metric = "gmacs", direction = "minimize" } ]'
SPACE = """
[space]
L = { type = "int", low = 1, high = 1 }
C = { type = "int", low = 8, high = 16, step = 8 }
"""


def write_sweep(folder: Path, name: str = "sw", **top) -> Path:
    """base.toml + NAME.toml in `folder`; `top` overrides the sweep's top-level lines (None drops one)."""
    (folder / "base.toml").write_text(BASE)
    lines = {"kind": '"sweep"', "base": '"base.toml"', "trials": "2", "objectives": PARETO, "sampler": '"grid"',
             "budget": "{ steps = 4 }"}
    lines.update(top)
    text = "\n".join(f"{k} = {v}" for k, v in lines.items() if v is not None) + "\n" + SPACE
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One MLflow store for the whole module: creating a SQLite store costs ~6 s (schema migrations)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(autouse=True)
def _shared_store(mlflow_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)


def mlflow_client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def children(client, parent_id: str):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


WORKER = """
import sys
from fcdm_lab.studies.sweep import run_sweep
run_sweep(sys.argv[1], storage=sys.argv[2], out_dir=sys.argv[3], progress=False, threads=1)
"""


def test_two_worker_processes_share_one_study(tmp_path):
    path = write_sweep(tmp_path, trials="3", sampler='"random"')
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(sw.__file__).parents[2])}
    procs = [subprocess.Popen([sys.executable, "worker.py", str(path), storage, str(tmp_path / "runs")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(logs)
    assert sorted("(created)" in log for log in logs) == [False, True]  # one creator, one joiner

    study = optuna.load_study(study_name="sw", storage=storage)
    trials = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    numbers = [t.number for t in study.get_trials()]
    assert len(numbers) == len(set(numbers))
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert all(t.params["C"] in (8, 16) and t.values[1] == t.user_attrs["gmacs"] for t in trials)

    # one parent run for both workers; every trial is its child, FINISHED, tagged with its number
    client = mlflow_client()
    parent_id = study.user_attrs[sw.PARENT_ATTR]
    parent = client.get_run(parent_id)
    assert parent.data.tags["kind"] == "sweep" and parent.data.tags["study"] == "sw"
    exp = parent.info.experiment_id
    storage_tag = f"tags.`optuna.storage` = '{storage}'"  # no second parent left over from the creation race
    assert [r.info.run_id for r in client.search_runs([exp], f"tags.kind = 'sweep' and {storage_tag}")] == [parent_id]
    kids = {r.info.run_id: r for r in children(client, parent_id)}
    assert {t.user_attrs["mlflow_run_id"] for t in trials} <= set(kids)
    for t in trials:
        run = kids[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["trial"] == str(t.number) and run.data.params["C"] == str(t.params["C"])
        assert run.data.metrics["sweep.gmacs"] == pytest.approx(t.values[1])


def test_failing_trial_is_fail_and_the_study_goes_on(tmp_path, monkeypatch):
    from fcdm_lab import runner  # the run pipeline: where each trial's training is called

    real_train, calls = runner.train, []

    def flaky_train(cfg, out_dir, **kw):  # the first trial breaks in its first training chunk
        calls.append(kw.get("max_steps"))
        if len(calls) == 1:
            raise RuntimeError("simulated crash")
        return real_train(cfg, out_dir, **kw)

    monkeypatch.setattr(runner, "train", flaky_train)
    # one objective that needs no sampling (fast); evaluated every 2 of 4 steps: two training chunks
    path = write_sweep(tmp_path, objectives='[ { metric = "final_loss" } ]', eval_every="2")
    result = sw.run_sweep(path, storage="sqlite:///optuna.db", progress=False)

    assert [r["state"] for r in result.rows] == ["FAIL", "COMPLETE"]
    assert "simulated crash" in result.rows[0]["note"]
    assert calls == [2, 2, 4]  # the survivor trained to step 2, then resumed to 4
    study = optuna.load_study(study_name="sw", storage="sqlite:///optuna.db")
    assert sorted(study.trials[1].intermediate_values) == [2]
    assert result.best_trials == [1]

    client = mlflow_client()
    failed, done = (client.get_run(r["run_id"]) for r in result.rows)
    assert failed.info.status == "FAILED" and failed.data.tags["optuna.state"] == "FAIL"
    assert done.info.status == "FINISHED"
    history = client.get_metric_history(done.info.run_id, "sweep.final_loss")
    assert sorted(m.step for m in history) == [2, 4]


def test_sigkilled_trial_is_retried_from_its_checkpoint(tmp_path):
    """A worker SIGKILLed mid-trial: the other worker fails the stale trial and its retry copy
    continues the dead trial's folder and MLflow run from the last checkpoint (nothing retrained)."""
    import signal

    from optuna.trial import TrialState

    path = write_sweep(tmp_path, objectives='[ { metric = "final_loss" } ]', budget="{ steps = 400 }")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "FCDM_HEARTBEAT_S": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fcdm_lab", "sweep", str(path), "--storage", storage, "--out",
                             str(tmp_path / "runs"), "--workers", "2", "--set", "train.ckpt_every=10"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim, deadline = None, time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # a running trial past its first checkpoint
        time.sleep(0.3)
        try:
            running = optuna.load_study(study_name="sw", storage=storage).get_trials(states=(TrialState.RUNNING,))
        except Exception:
            continue
        victim = next((t for t in running if {"worker_pid", "trial_dir", "mlflow_run_id"} <= set(t.user_attrs)
                       and list(Path(t.user_attrs["trial_dir"]).glob("checkpoints/step_*.pt"))), None)
        if victim is not None:
            break
    assert victim is not None, proc.communicate()[0]
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    study = optuna.load_study(study_name="sw", storage=storage)
    assert [t.number for t in study.get_trials(states=(TrialState.FAIL,))] == [victim.number]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    (done,) = [t for t in complete if t.system_attrs.get("failed_trial") == victim.number]
    assert len(complete) == 2
    assert done.user_attrs["trial_dir"] == victim.user_attrs["trial_dir"]  # the same folder ...
    assert done.user_attrs["mlflow_run_id"] == victim.user_attrs["mlflow_run_id"]  # ... and MLflow run
    assert f"resuming trial {victim.number} at step" in " ".join(out.split()), out  # (rich wraps lines)
    run = mlflow_client().get_run(done.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.retry_of"] == str(victim.number)
    assert run.data.metrics["sweep.final_loss"] == pytest.approx(done.values[0])


def test_pruned_trial(tmp_path, monkeypatch):
    # A pruner that prunes every reported value makes the outcome independent of training noise.
    monkeypatch.setattr(sw, "make_pruner", lambda spec, steps: optuna.pruners.ThresholdPruner(upper=-1.0))
    path = write_sweep(tmp_path, objectives='[ { metric = "final_loss" } ]', pruner='"median"', eval_every="2",
                       trials="1")
    result = sw.run_sweep(path, storage="sqlite:///optuna.db", progress=False)
    (row,) = result.rows
    assert row["state"] == "PRUNED" and row["note"] == "pruned at step 2"
    run = mlflow_client().get_run(row["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"


def test_pareto_front_plot_and_compute_budget(tmp_path):
    path = write_sweep(tmp_path, budget="{ compute = 0.01 }")
    result = sw.run_sweep(path, storage="sqlite:///optuna.db", progress=False)

    rows = {r["trial"]: r for r in result.rows}
    assert sorted(r["C"] for r in rows.values()) == [8, 16]  # the grid visits each point once
    for r in rows.values():
        assert r["state"] == "COMPLETE" and r["steps"] == max(1, round(0.01 / r["gmacs"]))

    def dominated(a, b):  # b dominates a (both objectives minimised)
        return b["fid_digits"] <= a["fid_digits"] and b["gmacs"] <= a["gmacs"] and (
            b["fid_digits"] < a["fid_digits"] or b["gmacs"] < a["gmacs"])

    front = sorted(n for n, r in rows.items() if not any(dominated(r, o) for o in rows.values()))
    study = optuna.load_study(study_name="sw", storage="sqlite:///optuna.db")
    assert result.best_trials == front == sorted(t.number for t in study.best_trials)
    assert [rows[n]["pareto"] for n in sorted(rows)] == [n in front for n in sorted(rows)]

    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = result.table_csv.read_text().splitlines()[0]
    assert header.startswith("trial,L,C,params,gmacs,steps,fid_digits,state,pareto")
    client = mlflow_client()
    logged = {f.path for f in client.list_artifacts(result.parent_run_id, "sweep")}
    assert {"sweep/pareto.png", "sweep/trials.csv", "sweep/trials.md", "sweep/sweep.toml"} <= logged
    assert {r.data.tags["pareto"] for r in children(client, result.parent_run_id)} <= {"true", "false"}

    # a rerun with the same target joins the finished study and trains nothing
    again = sw.run_sweep(path, storage="sqlite:///optuna.db", progress=False)
    assert again.ran_here == [] and again.parent_run_id == result.parent_run_id


def test_multi_objective_with_pruner_is_a_user_error(tmp_path):
    path = write_sweep(tmp_path, pruner='"median"', eval_every="2")
    with pytest.raises(UserError, match="cannot prune multi-objective"):
        load_sweep(path)
    path = write_sweep(tmp_path, objectives='[ { metric = "final_loss" } ]', pruner='"hyperband"')
    with pytest.raises(UserError, match="eval_every > 0"):
        load_sweep(path)


@pytest.mark.parametrize("url", ["optuna.db", "sqlite://", "nosuchdb://x/y", "postgresql://u@localhost/db",
                                 "sqlite:////proc/no-such-dir/optuna.db"])
def test_bad_storage_url_is_a_user_error_within_seconds(tmp_path, url):
    path = write_sweep(tmp_path)
    start = time.time()
    with pytest.raises(UserError, match="storage"):
        sw.run_sweep(path, storage=url, progress=False)
    assert time.time() - start < 10
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("top, message", [
    ({"kind": None}, "missing key 'kind'"),
    ({"kind": '"ablation"'}, "kind = 'ablation'"),
    ({"trails": "3"}, "unknown key 'trails'"),
    ({"trials": '"3"'}, "trials must be int"),
    ({"sampler": '"cmaes"'}, "sampler = 'cmaes' is not valid; choose one of: nsga2, tpe, random, grid"),
    ({"objectives": '[ { metric = "fid" } ]'}, "unknown metric 'fid'"),
    ({"budget": "{ steps = 4, compute = 1.0 }"}, "exactly one of steps"),
    ({"set": '{ "model.C" = 16 }'}, "set.model.C is decided by the sweep"),
])
def test_strict_sweep_file(tmp_path, top, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_sweep(write_sweep(tmp_path, **top))


def test_strict_space_and_early_model_check(tmp_path):
    path = write_sweep(tmp_path)
    path.write_text(path.read_text().replace('step = 8 }', 'step = 8, stride = 2 }'))
    with pytest.raises(UserError, match=r"space.C: unknown key 'stride' for type 'int'; valid keys: type, low, high"):
        load_sweep(path)
    path.write_text(path.read_text().replace(", stride = 2", ""))
    path.write_text(path.read_text() + 'width = { type = "int", low = 1, high = 2 }\n')
    with pytest.raises(UserError, match="'width' is not an experiment key"):
        load_sweep(path)
    # an odd width is refused before any trial trains (FCDM needs even C)
    path = write_sweep(tmp_path)
    path.write_text(path.read_text().replace("low = 8, high = 16, step = 8", "low = 9, high = 9"))
    with pytest.raises(UserError, match="even integer"):
        sw.run_sweep(path, storage="sqlite:///optuna.db", progress=False)
    # --set cannot fight the search space
    with pytest.raises(UserError, match="model.C is searched"):
        sw.run_sweep(write_sweep(tmp_path), overrides=["model.C=16"], progress=False)


def test_bundled_scaling_sweep_is_valid():
    spec = load_sweep("search-lc")
    assert spec.multi and spec.metrics == ["fid_digits", "gmacs"]
    assert [p.key for p in spec.space] == ["model.L", "model.C"]
    assert all(c % 2 == 0 and c >= 8 for c in spec.space[1].grid())
    assert "search-lc" in sweep_names()
