"""The one engine that runs ablations and sweeps: Optuna trials executed by N worker processes.

    study = ...                                  # an Optuna study in an RDB storage (storage.py)
    run_workers(WorkerArgs(kind="ablation", ...), workers=2)   # spawns 2 processes running `work`

An ablation is an Optuna study whose trials are its (variant, seed) grid, enqueued once by the
process that creates the study; a sweep is an Optuna study whose trials its sampler proposes. Both
run through `work`: claim a trial, train/evaluate it as a child MLflow run of the study's one
parent run (its id is in the study's user attrs), tell Optuna the result, until nothing is left.

Why a loop of our own instead of `study.optimize`: optimize asks the sampler for a new trial
whenever the queue is empty, which for an ablation would invent trials outside the grid. Here a
worker only claims WAITING trials (the same atomic WAITING -> RUNNING update `study.ask` uses) and,
for a sweep, asks for a new one while the study is below its target. The rest is Optuna's own
machinery: heartbeats (a thread records them while a trial runs), `fail_stale_trials` and
`RetryHeartbeatStaleTrialCallback` (set on the storage): a worker killed mid-child stops beating, another
worker fails its trial and claims the retry copy, which resumes from the child's last checkpoint
in the child's folder and reopens the same MLflow child run. Workers with nothing to claim wait
while other workers' trials still run, so a study always completes and every launcher ends with
the same finished study. Two launchers of the same study share it: no child is trained twice.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Protocol

PARENT_ATTR = "mlflow_parent_run_id"       # Optuna study user attrs shared by every worker
URI_ATTR = "mlflow_tracking_uri"
POLL_S = 2.0                               # a waiting worker looks for claimable trials this often


class Job(Protocol):
    """What a worker runs: `claim` returns a RUNNING trial it owns (or None), `run` returns its
    objective value(s), `finished` says there is nothing left to claim or wait for."""

    def claim(self, study): ...

    def run(self, trial): ...

    def finished(self, study) -> bool: ...


def check_parent_reachable(client, study, parent: str, uri: str, what: str) -> None:
    """A worker joining a study must see the parent MLflow run its creator made: the same store."""
    from ..errors import UserError

    try:
        client.get_run(parent)
    except Exception:
        where = study.user_attrs.get(URI_ATTR, "the creator's URI")
        raise UserError(f"the {what}'s parent MLflow run {parent} is not in {uri}; workers must share one "
                        f"tracking store: pass --tracking-uri {where}") from None


def claim_waiting(study, accept: Callable[[Any], bool] | None = None):
    """Atomically take a WAITING trial (WAITING -> RUNNING; a trial taken by another worker at the
    same moment is skipped), oldest first; None when there is none. accept(frozen) filters."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage  # Study has no public accessor for its storage
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if accept is not None and not accept(frozen):
            continue
        try:
            claimed = storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            claimed = False
        if claimed:
            storage.record_heartbeat(frozen._trial_id)  # stale-detection starts at the claim
            return optuna.Trial(study, frozen._trial_id)
    return None


@contextlib.contextmanager
def heartbeat(study, trial):
    """Record the trial's heartbeat every heartbeat interval while the block runs (study.optimize
    does the same in its own loop; its helper is private)."""
    storage = study._storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    storage.record_heartbeat(trial._trial_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                storage.record_heartbeat(trial._trial_id)
            except Exception:  # a storage hiccup must not kill the training thread's trial
                pass

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale(study) -> None:
    """Fail trials of dead workers (no heartbeat within the grace period); their retry copies are
    enqueued by the storage's RetryHeartbeatStaleTrialCallback."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _tell(study, trial, values=None, state=None) -> None:
    """study.tell outside study.optimize: a sampler that calls study.stop() when its space is
    exhausted (GridSampler) raises RuntimeError there; the trial's state is stored before that
    (Optuna's tell sets it in a `finally`), and `Job.claim` decides when to stop."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


@dataclass
class WorkReport:
    ran: List[int] = field(default_factory=list)         # trial numbers this worker ran
    failed: List[str] = field(default_factory=list)      # "trial N: error" of trials that failed here


def work(study, job: Job, *, console=None, poll_s: float = POLL_S) -> WorkReport:
    """Claim and run trials until `job.finished`; an exception fails that trial and the worker goes
    on; an interrupt (Ctrl+C, a signal turned into an exception) fails the trial and stops."""
    import optuna
    from optuna.trial import TrialState

    report = WorkReport()
    while True:
        fail_stale(study)
        trial = job.claim(study)
        if trial is None:
            if job.finished(study):
                return report
            time.sleep(poll_s)
            continue
        report.ran.append(trial.number)
        trial.set_user_attr("worker_pid", os.getpid())
        try:
            with heartbeat(study, trial):
                values = job.run(trial)
        except optuna.TrialPruned:
            _tell(study, trial, state=TrialState.PRUNED)
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            _tell(study, trial, state=TrialState.FAIL)
            report.failed.append(f"trial {trial.number}: {e}")
        except BaseException:  # KeyboardInterrupt, SystemExit, signals: FAIL so a rerun retries it
            trial.set_user_attr("error", "interrupted")
            _tell(study, trial, state=TrialState.FAIL)
            raise
        else:
            _tell(study, trial, values)
        after = getattr(job, "after", None)  # optional: a line per finished trial
        if after is not None:
            after(study, trial.number)


# ---------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------

def default_workers() -> int:
    """One worker per GPU on GPU machines, else one single-thread worker per CPU core."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of `workers` processes sharing this machine's cores (>= 1):
    oversubscribed cores run a tiny model ~100x slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


@dataclass
class WorkerArgs:
    """Everything a spawned worker needs to rebuild its job (picklable)."""

    kind: str                      # "ablation" | "sweep"
    kwargs: Dict[str, Any]         # the job builder's arguments
    index: int = 0                 # worker number (GPU index on GPU machines)
    threads: int = 1


def _worker_main(args: WorkerArgs) -> None:
    """Entry point of a spawned worker process."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(args.index % torch.cuda.device_count())
    from rich.console import Console

    from ..errors import UserError

    from ..signals import raise_on_signals

    console = Console(stderr=False)
    try:
        # a scheduler's SIGTERM / SIGUSR1 becomes an interrupt (trial FAIL, run KILLED), as Ctrl-C does
        with raise_on_signals():
            if args.kind == "ablation":
                from .ablate import run_ablation_worker

                run_ablation_worker(console=console, worker=args.index, **args.kwargs)
            else:
                from .sweep import run_sweep_worker

                run_sweep_worker(console=console, worker=args.index, **args.kwargs)
    except UserError as e:
        console.print(f"[red]worker {args.index}:[/] {e}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt as e:
        sys.exit(getattr(e, "exit_code", 130))


def run_workers(kind: str, kwargs: Dict[str, Any], workers: int) -> List[int]:
    """Start `workers` processes (multiprocessing spawn: a fresh interpreter each, no forked torch or
    database state) running the job, wait for them and return their exit codes. Ctrl+C reaches
    them through the process group; on any other exit here they are terminated."""
    ctx = multiprocessing.get_context("spawn")
    threads = threads_per_worker(workers)
    procs = [ctx.Process(target=_worker_main, args=(WorkerArgs(kind, kwargs, i, threads),), name=f"fcdm-worker-{i}")
             for i in range(workers)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except BaseException:  # a stop signal: let the workers fail their trials and end their runs
        deadline = time.time() + 10  # Ctrl-C reached them too (one process group): give them time first
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
        for p in procs:  # a signal sent to this process only (kill PID): pass it on
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            p.join(60)
        raise
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(30)
    return [p.exitcode for p in procs]


__all__ = ["Job", "PARENT_ATTR", "URI_ATTR", "WorkReport", "check_parent_reachable", "claim_waiting", "default_workers", "fail_stale",
           "heartbeat", "run_workers", "threads_per_worker", "work"]
