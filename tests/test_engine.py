"""The study engine with real worker processes: a 2x2 ablation by 2 workers trains each child once
under one parent; a SIGKILLed worker's child is retried and the study completes with nothing left
RUNNING; two `ablate` commands of one study at once train no child twice."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import TINY, postgres_cluster
from optuna.trial import TrialState

from fcdm_lab.studies.ablate import run_ablation


STUDY = """
description = "tiny GRN vs CCA"
base = "tiny-digits"
seeds = 2
steps = %d
metrics = ["fid_digits", "class_acc_digits"]
compute_matched = false
baseline = "grn"
set = { %s }

[[variants]]
name = "grn"
set = { "model.block" = { family = "convnext", mixer = "grn" } }

[[variants]]
name = "cca"
set = { "model.block" = { family = "convnext", mixer = "cca" } }
"""


def write_study(tmp_path, steps=4, **extra):
    items = {**TINY, **extra}
    path = tmp_path / "tiny2x2.toml"
    path.write_text(STUDY % (steps, ", ".join(f'"{k}" = {v}' for k, v in items.items())))
    return path


def the_study(storage="sqlite:///optuna.db"):
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def children_of(store, parent_id):
    return store.search_runs(["1"], f"tags.mlflow.parentRunId = '{parent_id}'")


def assert_each_child_once(store, parent_id, resumed_run=None, storage="sqlite:///optuna.db"):
    study = the_study(storage)
    complete = [(t.user_attrs["variant"], t.user_attrs["seed"]) for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(complete) == sorted((v, s) for v in ("grn", "cca") for s in (0, 1))  # each once
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    runs = children_of(store, parent_id)
    assert sorted((r.data.tags["variant"], r.data.tags["seed"]) for r in runs) == sorted(
        (v, str(s)) for v in ("grn", "cca") for s in (0, 1))
    assert all(r.info.status == "FINISHED" for r in runs)
    assert store.get_run(parent_id).info.status == "FINISHED"
    # one training per child: the train summary was logged once per run (twice for a resumed one)
    assert all(len(store.get_metric_history(r.info.run_id, "train.wall_time_s")) == 1 for r in runs
               if r.info.run_id != resumed_run)
    return study, runs


def test_two_workers_train_each_child_once_under_one_parent(store, tmp_path):
    result = run_ablation(str(write_study(tmp_path)), workers=2, progress=False)
    study, runs = assert_each_child_once(store, result.parent_run_id)
    assert len({t.user_attrs["worker_pid"] for t in study.trials}) <= 2 and os.getpid() not in {
        t.user_attrs["worker_pid"] for t in study.trials}  # ran in the worker processes
    assert result.trained_here == 4 and (result.out_dir / "report" / "report.md").is_file()
    rows = {r.variant: r for r in result.report.rows}
    assert rows["cca"].verdicts["fid_digits"].diff.n == 2
    assert rows["cca"].verdicts["fid_digits"].verdict in ("better", "worse", "inconclusive")
    tags = store.get_run(result.parent_run_id).data.tags
    assert "verdict.cca.fid_digits" in tags
    assert "| cca |" in tags["mlflow.note.content"].replace("`", "")  # the run page's description is the report
    # the same command again joins the finished study: nothing is trained, the report is rebuilt
    again = run_ablation(str(write_study(tmp_path)), workers=2, progress=False)
    assert again.parent_run_id == result.parent_run_id and again.trained_here == 0
    assert len(children_of(store, result.parent_run_id)) == 4


def _cli(path, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "fcdm_lab", "ablate", str(path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def test_sigkilled_worker_is_retried_and_nothing_stays_running(store, tmp_path):
    env = {**os.environ, "FCDM_HEARTBEAT_S": "1"}
    proc = _cli(write_study(tmp_path, steps=60, **{"train.ckpt_every": 10}), "--workers", "2", env=env)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            running = the_study().get_trials(states=(TrialState.RUNNING,))
        except (ValueError, KeyError, Exception):
            continue
        victim = next((t for t in running if "worker_pid" in t.user_attrs and "mlflow_run_id" in t.user_attrs), None)
    assert victim is not None, proc.communicate()[0]
    # mid-child, after its first checkpoint (a fixed sleep raced the checkpoint on a loaded machine)
    ckpts = f"**/{victim.params['variant']}-seed{victim.params['seed']}/checkpoints/step_*.pt"
    while not list(tmp_path.glob(ckpts)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(ckpts)), (ckpts, proc.communicate()[0])
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    study = the_study()
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [victim.number]
    (parent,) = store.search_runs(["1"], "tags.kind = 'ablation'")
    assert_each_child_once(store, parent.info.run_id, resumed_run=victim.user_attrs["mlflow_run_id"])
    retried = [t for t in study.get_trials(states=(TrialState.COMPLETE,))
               if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retried) == 1 and retried[0].user_attrs["worker_pid"] != victim.user_attrs["worker_pid"]
    # the retry reopened the killed child's MLflow run and resumed it from its checkpoint
    assert retried[0].user_attrs["mlflow_run_id"] == victim.user_attrs["mlflow_run_id"]
    assert "resuming" in out
    assert not store.search_runs(["1"], "attributes.status = 'RUNNING'")


def test_two_ablate_commands_at_once_train_no_child_twice(store, tmp_path):
    path = write_study(tmp_path, steps=8)
    procs = [_cli(path, "--workers", "1") for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if [p.returncode for p in procs] != [0, 0]:  # the whole of each output (an assert's repr is cut short)
        pytest.fail("\n".join(f"--- exit {p.returncode}:\n{o}" for p, o in zip(procs, outs)), pytrace=False)
    parents = store.search_runs(["1"], "tags.kind = 'ablation'")
    assert len(parents) == 1  # the creator that lost the race deleted its parent
    assert_each_child_once(store, parents[0].info.run_id)
    assert sum("joining" in o for o in outs) == 1


@pytest.fixture
def postgres():
    with postgres_cluster() as url:
        yield url


def test_workers_share_a_postgresql_storage(store, tmp_path, postgres):
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]' (the test extra) for postgresql:// URLs")
    path = write_study(tmp_path)
    result = run_ablation(str(path), workers=2, storage=postgres, progress=False)
    assert result.storage.startswith("postgresql://") and not Path("optuna.db").exists()
    assert_each_child_once(store, result.parent_run_id, storage=postgres)


def test_a_transient_storage_error_between_trials_is_retried(monkeypatch, tmp_path):
    """SQLite's "database is locked" (or a dropped server connection) in a worker's bookkeeping
    call is retried, not the end of the worker; a persistent one still surfaces."""
    from optuna.exceptions import StorageInternalError

    from fcdm_lab.studies import engine

    monkeypatch.setattr(engine.time, "sleep", lambda s: None)

    class FlakyJob:
        def __init__(self, errors):
            self.errors = errors

        def claim(self, study):
            if self.errors:
                self.errors -= 1
                raise StorageInternalError("(sqlite3.OperationalError) database is locked")
            return engine.claim_waiting(study)

        def run(self, trial):
            return 1.0

        def finished(self, study):
            return not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))

    from fcdm_lab.studies.storage import open_storage

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"))
    study.enqueue_trial({})
    assert engine.work(study, FlakyJob(errors=engine.STORAGE_ATTEMPTS - 1), poll_s=0).ran == [0]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE]
    study.enqueue_trial({})
    with pytest.raises(StorageInternalError):
        engine.work(study, FlakyJob(errors=engine.STORAGE_ATTEMPTS), poll_s=0)
