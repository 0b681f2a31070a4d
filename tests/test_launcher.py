"""Study workers as submitit jobs: `--launcher submitit-local` runs a 2-variant ablation
(tests/test_engine.py's study, TINY children) with two local submitit jobs (logs in the submitit
folder, each job's result 0, every child once, the verdict table printed); a worker's UserError is
one line in its job's stderr and exit 2; the Slurm job parameters handed to submitit; bad launcher
input is one line, exit 2, nothing written."""
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from conftest import sigint_default
from test_engine import the_study, write_study

from fcdm_lab.cli import main
from fcdm_lab.errors import UserError
from fcdm_lab.studies.ablate import AblationWorker
from fcdm_lab.studies.launchers import Launcher, run_workers


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch and srun on PATH that refuse every job, as sbatch does for an unknown partition."""
    bin_dir = tmp_path.parent / f"{tmp_path.name}-bin"
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: nope' >&2\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_submitit_local_runs_the_study_in_two_jobs(store, tmp_path, capsys):
    code, out, err = run(capsys, "ablate", str(write_study(tmp_path)), "--seeds", "1", "--launcher", "submitit-local",
                         "--workers", "2")
    assert code == 0, out + err
    # every child finished exactly once, nothing left queued or running
    study = the_study()
    assert sorted(_key(t) for t in study.get_trials(states=(TrialState.COMPLETE,))) == [("cca", 0), ("grn", 0)]
    assert len(study.trials) == 2
    (parent,) = store.search_runs(["1"], "tags.kind = 'ablation'")
    runs = store.search_runs(["1"], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["variant"] for r in runs) == ["cca", "grn"]
    assert {r.info.status for r in runs} == {parent.info.status} == {"FINISHED"}
    # two submitit jobs ran, each logged into the study's submitit folder and returned 0
    folder = tmp_path / "runs" / "submitit" / study.study_name
    results = sorted(folder.glob("*_result.pkl"))
    assert len(results) == 2, sorted(p.name for p in folder.iterdir())
    for result in results:
        job = result.name[: -len("_0_result.pkl")]
        assert pickle.loads(result.read_bytes()) == ("success", 0)
        assert (folder / f"{job}_0_log.out").is_file() and (folder / f"{job}_0_log.err").is_file()
        assert f"worker job {job} ended (exit 0)" in out
    assert "2 worker job(s) submitted to submitit-local" in out
    assert os.getpid() not in {t.user_attrs["worker_pid"] for t in study.trials}  # trained in the jobs
    # then the launcher reports the study as the local path does: the verdict table
    assert "Study tiny2x2: tiny GRN vs CCA" in out and "verdict" in out and "Report:" in out


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stopping_the_launcher_cancels_its_jobs(store, tmp_path, how):
    """SIGTERM to the launcher alone (kill PID), or SIGINT to its whole process group (what Ctrl-C
    in a terminal does; it reaches the job controllers and workers too): the jobs checkpoint and
    fail their trials, nothing stays RUNNING; exit 143 / 130 and the resume line."""
    path = write_study(tmp_path, steps=5000, **{"train.ckpt_every": 10})
    proc = subprocess.Popen([sys.executable, "-m", "fcdm_lab", "ablate", str(path), "--seeds", "1", "--launcher",
                             "submitit-local", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,  # its own process group, as a terminal's job
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # SIGABRT dumps the stacks
                            preexec_fn=sigint_default)
    running, deadline = [], time.time() + 180
    while len(running) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            running = [t for t in the_study().get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs]
        except Exception:  # the study is not created yet
            continue
    assert len(running) == 2, proc.communicate()[0]
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:  # the job controllers ignore Ctrl-C (one that gets it kills its worker 1 s later, mid-checkpoint)
        controllers = [pid for pid in _children(proc.pid) if b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(controllers) == 2 and all(_ignores_sigint(pid) for pid in controllers), controllers
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say what each process was doing, then clean up
        os.killpg(proc.pid, signal.SIGABRT)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        logs = "".join(f"\n--- {f.name}:\n{f.read_text()[-3000:]}" for f in sorted((tmp_path / "runs").rglob("*_log.*")))
        pytest.fail(f"the launcher did not stop within 120 s:\n{proc.communicate()[0]}{logs}", pytrace=False)
    assert proc.returncode == (143 if how == "sigterm" else 130), out
    assert "resume with the same command" in out and "Traceback" not in out
    study = the_study()
    assert {(t.state, t.user_attrs.get("error")) for t in study.trials} == {(TrialState.FAIL, "interrupted")}, out
    assert {r.info.status for r in store.search_runs(["1"], "")} == {"KILLED"}, out  # parent and both children
    logs = sorted((tmp_path / "runs" / "submitit" / study.study_name).glob("*_0_log.err"))
    # each job's log: the worker's one stop line (with the checkpoint when it was past setup)
    stop = re.compile(r"interrupted: stopped by SIG(TERM|INT)")  # Ctrl-C: the worker may see SIGINT first
    assert len(logs) == 2 and all(len(stop.findall(f.read_text())) == 1 for f in logs), out


def _children(pid: int):
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # exited meanwhile
            continue
    return out


def _ignores_sigint(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return bool(mask & (1 << (signal.SIGINT - 1)))


def _key(trial):
    return trial.user_attrs["variant"], trial.user_attrs["seed"]


def test_worker_user_error_is_one_line_in_the_job_stderr(tmp_path):
    launcher = Launcher.from_options("submitit-local", job_logs=tmp_path / "jobs")
    job = AblationWorker("no-such-study", "nothing", None, None, {}, "sqlite:///mlflow.db", "sqlite:///optuna.db", "x")
    codes = run_workers(job, 1, launcher)
    assert codes == [2]
    (err,) = (tmp_path / "jobs").glob("*_0_log.err")
    lines = [line for line in err.read_text().splitlines() if "no-such-study" in line]
    assert len(lines) == 1 and lines[0].startswith("worker 0: ") and "Traceback" not in err.read_text()


def test_slurm_job_parameters(fake_slurm, tmp_path):
    launcher = Launcher.from_options("slurm", partition="gpu", gpus_per_worker=2, time_limit_min=90,
                                     cpus_per_worker=8)
    executor = launcher.executor(tmp_path / "jobs", workers=3, name="fcdm-study")
    assert executor.cluster == "slurm"
    params = executor.parameters
    assert (params["partition"], params["gpus_per_node"], params["time"], params["cpus_per_task"]) == ("gpu", 2, 90, 8)
    assert (params["nodes"], params["ntasks_per_node"], params["array_parallelism"]) == (1, 1, 3)
    assert params["job_name"] == "fcdm-study"
    # defaults: the cluster's partition, no GPU, one core (one torch thread)
    bare = Launcher.from_options("slurm", time_limit_min=30).executor(tmp_path / "jobs", workers=1, name="x").parameters
    assert "partition" not in bare and "gpus_per_node" not in bare and bare["cpus_per_task"] == 1
    # submitit-local: no Slurm settings, and a timeout far beyond submitit's 2-minute local default
    local = Launcher.from_options("submitit-local").executor(tmp_path / "jobs", workers=2, name="x")
    assert local.cluster == "local" and local.parameters["timeout_min"] >= 24 * 60


def test_refused_submission_is_one_line(fake_slurm, tmp_path, capfd):
    launcher = Launcher.from_options("slurm", partition="nope", time_limit_min=10, job_logs=tmp_path / "jobs")
    with pytest.raises(UserError, match=r"submitting 2 worker job\(s\) to Slurm \(partition nope.*failed: sbatch: "
                                        r"error: invalid partition specified: nope$"):
        run_workers(AblationWorker("x", "x", None, None, {}, "sqlite:///mlflow.db", "sqlite:///optuna.db", "x"), 2,
                    launcher)
    assert capfd.readouterr() == ("", "")  # submitit's own print of sbatch's complaint is not shown


def test_submitit_local_makes_relative_stores_absolute(tmp_path):
    storage, uri = Launcher.from_options("submitit-local").shared_stores("sqlite:///optuna.db", "sqlite:///m/mlflow.db")
    assert storage == f"sqlite:///{tmp_path / 'optuna.db'}" and uri == f"sqlite:///{tmp_path / 'm' / 'mlflow.db'}"
    assert Launcher().shared_stores("sqlite:///optuna.db", "sqlite:///mlflow.db") == ("sqlite:///optuna.db",
                                                                                      "sqlite:///mlflow.db")


@pytest.mark.parametrize("command", ["ablate", "sweep"])
@pytest.mark.parametrize("args, message", [
    (["--partition", "gpu"], "--partition is a Slurm job setting: it needs --launcher slurm"),
    (["--launcher", "submitit-local", "--gpus-per-worker", "1"], "--gpus-per-worker is a Slurm job setting"),
    (["--time-limit", "60"], "--time-limit is a Slurm job setting"),
    (["--launcher", "kubernetes"], "unknown launcher 'kubernetes'; valid: processes, submitit-local, slurm"),
    (["--launcher", "slurm", "--time-limit", "60"], "needs Slurm's sbatch and srun on PATH"),
])
def test_bad_launcher_options(capsys, tmp_path, monkeypatch, command, args, message):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    name = "grn-vs-cca" if command == "ablate" else "search-lc"
    code, out, err = run(capsys, command, name, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("command", ["ablate", "sweep"])
@pytest.mark.parametrize("store_args, what", [
    (["--storage", "sqlite:///optuna.db"], "--storage sqlite:///optuna.db"),
    (["--tracking-uri", "sqlite:///mlflow.db"], "--tracking-uri sqlite:///mlflow.db"),
])
def test_slurm_needs_shared_stores(capsys, tmp_path, fake_slurm, command, store_args, what):
    name = "grn-vs-cca" if command == "ablate" else "search-lc"
    code, out, err = run(capsys, command, name, "--launcher", "slurm", "--time-limit", "60",
                         "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", *store_args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert what in err and "absolute path on a shared filesystem" in err and "postgresql://" in err
    assert not list(tmp_path.iterdir())  # nothing written
    # the time limit is required on Slurm (submitit would ask for 5 minutes)
    code, _, err = run(capsys, command, name, "--launcher", "slurm")
    assert code == 2 and "--launcher slurm needs --time-limit MINUTES" in err
