"""The one engine of every study: Optuna trials claimed and run by workers, until nothing is left.

    report = work(study, job)        # job: claim(study) -> trial | None, run(trial) -> value(s), finished(study)

A study is an Optuna study in an RDB storage (storage.py) whose trials are units of work: an
ablation's or a scaling study's (variant, seed) children, enqueued once by the process that creates
the study (study.py), or an Optuna search's proposals. Every kind runs through `work`: claim a
trial, run it (a child MLflow run of the study's one parent run), tell Optuna the result, until the
job says nothing is left.

Why a loop of our own instead of `study.optimize`: optimize asks the sampler for a new trial
whenever the queue is empty, which for an enqueued grid would invent trials outside it. Here a
worker only claims WAITING trials (the same atomic WAITING -> RUNNING update `study.ask` uses) and,
for a search, asks for a new one while the study is below its target. The rest is Optuna's own
machinery: heartbeats (a thread records them while a trial runs), `fail_stale_trials` and
`RetryHeartbeatStaleTrialCallback` (set on the storage): a worker killed mid-trial stops beating,
another worker fails its trial and claims the retry copy, which resumes from the trial's last
checkpoint in its folder and reopens the same MLflow run. Workers with nothing to claim wait while
other workers' trials still run, so a study always completes and every launcher ends with the same
finished study. Two launchers of the same study share it: no trial is run twice.

Where workers run: launchers.py. How many torch threads a worker uses: `WorkerSlots` (the cores of
this machine shared by every worker on it, whichever command started them).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Protocol

POLL_S = 2.0                               # a waiting worker looks for claimable trials this often


class Job(Protocol):
    """What a worker runs: `claim` returns a RUNNING trial it owns (or None), `run` returns its
    objective value(s), `finished` says there is nothing left to claim or wait for. `threads`: the
    torch threads its trials use (set by `work` before each trial when the engine shares cores)."""

    threads: int | None

    def claim(self, study): ...

    def run(self, trial): ...

    def finished(self, study) -> bool: ...


def nothing_left(study) -> bool:
    """Nothing to claim and nothing running (a dead worker's trial is failed and retried first):
    the `finished` rule of every job whose trials are all queued or asked for."""
    from optuna.trial import TrialState  # optuna: ~0.4 s, loaded by the workers only

    return not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class WorkerSlots:
    """This machine's cores, shared by every study worker running on it, whichever command started
    it: a worker holds one slot (an exclusive `flock` on a file in a per-user folder, dropped by the
    OS however the worker ends) and, before each trial, uses cores // (slots held) torch threads,
    at most `max_threads`. Two `ablate --workers 1` commands on 2 cores thus train on one thread
    each instead of two each (oversubscribed cores ran a tiny model ~100x slower)."""

    def __init__(self, max_threads: int, folder: Path | None = None):
        self.max_threads = max(1, max_threads)
        self.folder = folder or Path(tempfile.gettempdir()) / f"fcdm-lab-workers-{os.getuid()}"
        self.fd: int | None = None

    def __enter__(self) -> "WorkerSlots":
        self.folder.mkdir(parents=True, exist_ok=True)
        for i in range(4096):
            fd = os.open(self.folder / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            self.fd = fd
            break
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def held(self) -> int:
        """Slots held right now, this worker's included."""
        count = 0
        for path in self.folder.glob("slot-*.lock"):
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails only against a holder's exclusive lock
            except OSError:
                count += 1
            finally:
                os.close(fd)
        return max(count, 1)

    def threads(self) -> int:
        return max(1, min(self.max_threads, cores() // self.held()))


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


STORAGE_ATTEMPTS = 5  # a worker's bookkeeping call to the storage, tried this often (1, 2, 4, 8 s apart)


def _with_retries(call: Callable[[], Any]) -> Any:
    """A bookkeeping call to the Optuna storage, retried on a transient database error (SQLite's
    "database is locked" on a loaded machine, a dropped server connection): such an error must not
    end a worker, and with it a whole command, between two trials."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import OperationalError

    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return call()
        except (StorageInternalError, OperationalError):
            if attempt == STORAGE_ATTEMPTS - 1:
                raise
            time.sleep(2 ** attempt)


@dataclass
class WorkReport:
    ran: List[int] = field(default_factory=list)         # trial numbers this worker ran
    failed: List[str] = field(default_factory=list)      # "trial N: error" of trials that failed here


def work(study, job: Job, *, console=None, poll_s: float = POLL_S, slots: WorkerSlots | None = None,
         launch: str | None = None) -> WorkReport:
    """Claim and run trials until `job.finished`; an exception fails that trial and the worker goes
    on; an interrupt (Ctrl+C, a signal turned into an exception) fails the trial and stops.
    slots: share this machine's cores with every other worker on it (the job's threads are set
    before each trial). launch: an id of the command that started this worker, recorded on each
    trial it runs (so a command counts what it trained itself)."""
    import optuna  # ~0.4 s: loaded by the processes that run trials only
    import torch
    from optuna.trial import TrialState

    report = WorkReport()
    while True:
        _with_retries(lambda: fail_stale(study))
        trial = _with_retries(lambda: job.claim(study))
        if trial is None:
            if _with_retries(lambda: job.finished(study)):
                return report
            time.sleep(poll_s)
            continue
        report.ran.append(trial.number)
        _with_retries(lambda: trial.set_user_attr("worker_pid", os.getpid()))
        if launch is not None:
            _with_retries(lambda: trial.set_user_attr("launch", launch))
        if slots is not None:
            job.threads = slots.threads()
            torch.set_num_threads(job.threads)
        try:
            with heartbeat(study, trial):
                values = job.run(trial)
        except optuna.TrialPruned:
            _with_retries(lambda: _tell(study, trial, state=TrialState.PRUNED))
        except Exception as e:
            _with_retries(lambda: trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000]))
            _with_retries(lambda: _tell(study, trial, state=TrialState.FAIL))
            report.failed.append(f"trial {trial.number}: {e}")
        except BaseException:  # KeyboardInterrupt, SystemExit, signals: FAIL so a rerun retries it
            trial.set_user_attr("error", "interrupted")
            _tell(study, trial, state=TrialState.FAIL)
            raise
        else:
            _with_retries(lambda: _tell(study, trial, values))
        after = getattr(job, "after", None)  # optional: a line per finished trial
        if after is not None:
            after(study, trial.number)


__all__ = ["Job", "POLL_S", "WorkReport", "WorkerSlots", "claim_waiting", "cores", "fail_stale", "heartbeat",
           "nothing_left", "work"]
