"""Where a study's workers run, and the worker process itself.

    launcher = Launcher.from_options("processes")          # or "submitit-local", "slurm" (--launcher)
    codes = run_workers(job, workers=2, launcher=launcher)  # job: a picklable WorkerJob

`processes`: multiprocessing on this machine (spawn); `submitit-local`: each worker a submitit job on
this machine, logs in the submitit folder; `slurm`: each worker a task of one Slurm job array,
through submitit. The launching process waits for its workers either way and then reports the
study. A worker runs `job.run(...)`: the engine's loop (engine.py) over the study's trials.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol


from ..display import output_console
from ..errors import UserError, choices
from ..signals import raise_on_signals
from .engine import POLL_S, cores

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
    return cores()


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of `workers` processes sharing this machine's cores (>= 1):
    oversubscribed cores run a tiny model ~100x slower."""
    return max(1, cores() // max(1, workers))


class WorkerJob(Protocol):
    """What a worker process runs: a picklable description of one kind of study's worker (the
    ablation and sweep modules each define one), built into the engine's Job inside the worker.
    A new kind of study is a new WorkerJob: the launchers and the engine do not change."""

    study_name: str

    def run(self, *, console, worker: int, threads: int, shared: bool) -> None:
        """Work on the study. threads: torch threads (at most, when `shared`); shared: the worker
        shares this machine's cores with every other worker on it (engine.WorkerSlots)."""


@dataclass
class WorkerArgs:
    """Everything a spawned worker needs (picklable)."""

    job: WorkerJob
    index: int = 0                 # worker number (GPU index on GPU machines, for `processes`)
    threads: int = 1
    submitted: bool = False        # a submitit job: the scheduler picks its GPUs and reads its logs


@contextlib.contextmanager
def _time_limit_warning_stops():
    """Inside a submitit job: the scheduler's warning before the time limit stops the worker as
    SIGUSR1 does (the trial in progress writes a checkpoint and fails; the same command resumes it).
    submitit asks Slurm for that warning as SIGUSR2 and would answer it by requeueing the job, which
    would restart a worker with nothing queued for it."""
    import submitit

    warning = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
    if threading.current_thread() is not threading.main_thread() or warning == signal.SIGUSR1:
        yield
        return
    previous = signal.signal(warning, lambda signum, frame: signal.raise_signal(signal.SIGUSR1))
    try:
        yield
    finally:
        signal.signal(warning, previous)


def _run_worker(args: WorkerArgs) -> int:
    """One worker: run the job until the study has nothing left for it; returns the exit code (0
    done, 2 a UserError, 130 / 143 stopped by a signal). The function a submitit job runs: a return
    value, not sys.exit, so submitit records the result, and errors go to stderr (the job's log)."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if args.submitted and threading.current_thread() is threading.main_thread():
        # a submitit-local job inherits SIGINT ignored from its controller (_jobs_leave_ctrl_c_to_us):
        # the worker itself stops on Ctrl-C, wherever it is (setup, training, evaluation)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    import torch

    torch.set_num_threads(args.threads)
    # under a scheduler CUDA_VISIBLE_DEVICES holds this job's GPUs only: device 0 is its own
    if not args.submitted and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(args.index % torch.cuda.device_count())
    console, errors = output_console(), output_console(stderr=True)
    try:
        # a scheduler's SIGTERM / SIGUSR1 becomes an interrupt (trial FAIL, run KILLED), as Ctrl-C does
        with raise_on_signals(), (_time_limit_warning_stops() if args.submitted else contextlib.nullcontext()):
            args.job.run(console=console, worker=args.index, threads=args.threads, shared=not args.submitted)
    except UserError as e:
        errors.print(f"[red]worker {args.index}:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt as e:
        if args.submitted:  # a local worker's stop is reported once, by its launcher
            errors.print(f"worker {args.index}: interrupted: {e or 'stopped by SIGINT'}", highlight=False)
        return getattr(e, "exit_code", 130)
    return 0


def _worker_main(args: WorkerArgs) -> None:
    """Entry point of a spawned worker process."""
    sys.exit(_run_worker(args))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

LAUNCHERS = ("processes", "submitit-local", "slurm")
LOCAL_JOB_MINUTES = 7 * 24 * 60  # submitit-local kills a job after its timeout (2 min unless set)
CANCEL_WAIT_S = 60               # after Ctrl-C, how long cancelled jobs get to fail their trials


@dataclass
class Launcher:
    """Where a study's workers run. processes: spawned processes on this machine. submitit-local:
    each worker a submitit job on this machine (submitit's LocalExecutor: the Slurm path without a
    cluster, for tests and for debugging a setup). slurm: the workers are the tasks of one Slurm job
    array (submitit's SlurmExecutor), each with `gpus_per_worker` GPUs, `cpus_per_worker` cores and a
    `time_limit_min` wall-clock limit, on `partition`. job_logs: submitit's folder (job scripts,
    pickles, each job's stdout/stderr); default runs/submitit/<study>."""

    kind: str = "processes"
    partition: Optional[str] = None
    gpus_per_worker: Optional[int] = None
    time_limit_min: Optional[int] = None
    cpus_per_worker: Optional[int] = None
    job_logs: Optional[Path] = None

    @classmethod
    def from_options(cls, kind: Optional[str] = None, *, partition: Optional[str] = None,
                     gpus_per_worker: Optional[int] = None, time_limit_min: Optional[int] = None,
                     cpus_per_worker: Optional[int] = None, job_logs=None) -> "Launcher":
        """The CLI's options, checked: a UserError (one line) before anything is written."""
        import importlib.util
        import shutil

        kind = kind or "processes"
        if kind not in LAUNCHERS:
            raise UserError(f"unknown launcher {kind!r}; valid: {choices(LAUNCHERS)}")
        if kind != "slurm":
            given = [o for o, v in (("--partition", partition), ("--gpus-per-worker", gpus_per_worker),
                                    ("--time-limit", time_limit_min)) if v is not None]
            if given:
                raise UserError(f"{given[0]} is a Slurm job setting: it needs --launcher slurm (got --launcher {kind})")
        if kind == "processes":
            given = [o for o, v in (("--cpus-per-worker", cpus_per_worker), ("--job-logs", job_logs)) if v is not None]
            if given:
                raise UserError(f"{given[0]} is a setting of submitted jobs: it needs --launcher slurm or "
                                f"submitit-local (local worker processes share this machine's cores)")
        for name, value, low in (("--gpus-per-worker", gpus_per_worker, 0), ("--time-limit", time_limit_min, 1),
                                 ("--cpus-per-worker", cpus_per_worker, 1)):
            if value is not None and value < low:
                raise UserError(f"{name} must be >= {low}, got {value}")
        if kind != "processes" and importlib.util.find_spec("submitit") is None:
            raise UserError(f"--launcher {kind} needs submitit: pip install 'fcdm-lab[slurm]' (or -e '.[slurm]')")
        if kind == "slurm":
            missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
            if missing:
                raise UserError(f"--launcher slurm needs Slurm's {' and '.join(missing)} on PATH, which this machine "
                                f"lacks; run the command on a Slurm login node, or use --launcher submitit-local "
                                f"to try the same path on this machine")
            if time_limit_min is None:  # submitit would ask Slurm for 5 minutes
                raise UserError("--launcher slurm needs --time-limit MINUTES (each worker job's wall-clock limit)")
        return cls(kind, partition, gpus_per_worker, time_limit_min, cpus_per_worker,
                   Path(job_logs) if job_logs is not None else None)

    @property
    def submits(self) -> bool:
        """Whether the workers are submitit jobs (also with one worker: never in this process)."""
        return self.kind != "processes"

    def default_workers(self) -> int:
        """Workers when --workers is not given: one Slurm job, else one per core or GPU here."""
        return 1 if self.kind == "slurm" else default_workers()

    def shared_stores(self, storage: str, uri: str) -> tuple:
        """(storage, tracking URI) every worker can reach. Slurm workers run on other nodes: a
        relative SQLite file is an error (a shared absolute path or a server is needed); for
        submitit-local relative paths are made absolute."""
        if not self.submits:
            return storage, uri
        out = []
        for what, url in (("--storage", storage), ("--tracking-uri", uri)):
            head, sep, path = url.partition(":///")
            if head.split("+")[0] == "sqlite" and sep and path and not path.startswith(("/", ":memory:")):
                if self.kind == "slurm":
                    raise UserError(f"{what} {url} is a SQLite file relative to this folder; Slurm workers run on "
                                    f"other nodes: use an absolute path on a shared filesystem "
                                    f"(sqlite:////shared/dir/{Path(path).name}) or a server (postgresql://...)")
                url = f"{head}:///{Path(path).resolve()}"
            out.append(url)
        return tuple(out)

    def threads(self, workers: int) -> int:
        """Torch threads of each worker: its Slurm cores, else its share of this machine's cores."""
        if self.cpus_per_worker is not None:
            return self.cpus_per_worker
        return 1 if self.kind == "slurm" else threads_per_worker(workers)

    def executor(self, folder: Path, *, workers: int, name: str):
        """The submitit executor for `workers` jobs named `name`, logging into `folder`."""
        import submitit

        executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if self.kind == "slurm" else "local")
        params: Dict[str, Any] = dict(name=name, nodes=1, tasks_per_node=1)
        if self.kind == "slurm":
            params.update(timeout_min=self.time_limit_min, slurm_array_parallelism=workers)
            if self.partition:
                params["slurm_partition"] = self.partition
            if self.gpus_per_worker:
                params["gpus_per_node"] = self.gpus_per_worker
            params["cpus_per_task"] = self.threads(workers)
        else:
            params["timeout_min"] = LOCAL_JOB_MINUTES
        executor.update_parameters(**params)
        return executor

    def describe(self) -> str:
        if self.kind == "slurm":
            bits = [f"partition {self.partition}" if self.partition else "default partition",
                    f"{self.gpus_per_worker or 0} GPU(s)", f"{self.cpus_per_worker or 1} CPU(s)",
                    f"{self.time_limit_min} min"]
            return f"Slurm ({', '.join(bits)} per worker)"
        return "submitit-local (jobs on this machine, CPU only)"


def _job_exit_code(job) -> int:
    """A finished job's exit code as a local worker's: what `_run_worker` returned, or 1 when the
    job raised or was killed before it could return (its log says which)."""
    try:
        return int(job.result())
    except Exception:
        return 1


@contextlib.contextmanager
def _quiet_submission():
    """Nothing started or printed inside reaches this terminal: submitit-local's job controllers
    inherit our stdout/stderr and print a KeyboardInterrupt traceback when a job is cancelled (the
    jobs log to their own files), and submitit prints sbatch's complaint before raising it (the
    caller turns that into one line)."""
    import io

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (devnull, *saved):
            os.close(fd)


@contextlib.contextmanager
def _jobs_leave_ctrl_c_to_us(launcher: Launcher):
    """submitit-local's job controllers are our children, in the terminal's process group: Ctrl-C
    reaches them too, and a controller answers SIGINT by killing its worker 1 s later, often before
    the worker has saved anything (its trial then stays RUNNING until a heartbeat check). Started
    with SIGINT ignored (children inherit that, and Python keeps it), a controller waits for its
    worker instead: the worker (which handles SIGINT again, `_run_worker`) stops itself cleanly, as
    it does on the SIGTERM this launcher sends when Ctrl-C reaches it (`_cancel`)."""
    if launcher.kind != "submitit-local" or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _cancel(job, launcher: Launcher) -> None:
    """Stop a job as `scancel` does: SIGTERM, which the worker turns into a clean stop (checkpoint,
    trial FAIL, run KILLED). A submitit-local job is its controller process (the job id is its pid),
    which passes SIGTERM on to its task and waits for it; submitit's LocalJob.cancel sends SIGINT
    instead, on which the controller kills the task 1 s later, often before it has saved anything."""
    if launcher.kind == "submitit-local":
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(job.job_id), signal.SIGTERM)
    else:
        job.cancel(check=False)


def _submit_workers(launcher: Launcher, job: WorkerJob, workers: int, console) -> List[int]:
    """The workers as submitit jobs (one Slurm job array, or local jobs); wait for them and return
    their exit codes. Ctrl+C (or SIGTERM) here cancels the jobs, gives them CANCEL_WAIT_S to fail
    their trials and end their runs, and re-raises."""
    name = job.study_name
    folder = (launcher.job_logs or Path("runs") / "submitit" / name).resolve()
    threads = launcher.threads(workers)
    executor = launcher.executor(folder, workers=workers, name=f"fcdm-{name}")
    try:
        with _quiet_submission(), _jobs_leave_ctrl_c_to_us(launcher):
            jobs = executor.map_array(_run_worker, [WorkerArgs(job, i, threads, submitted=True)
                                                    for i in range(workers)])
    except Exception as e:  # sbatch refused the jobs (a partition, limit or account): its last line
        reason = next((line.strip() for line in reversed(str(e).splitlines()) if line.strip()), type(e).__name__)
        raise UserError(f"submitting {workers} worker job(s) to {launcher.describe()} failed: {reason}") from None
    console.print(f"{len(jobs)} worker job(s) submitted to {launcher.describe()}: {' '.join(j.job_id for j in jobs)}; "
                  f"logs in {folder}", highlight=False, soft_wrap=True)
    codes: Dict[str, int] = {}
    try:
        while len(codes) < len(jobs):
            for job in jobs:
                if job.job_id not in codes and job.done():
                    codes[job.job_id] = code = _job_exit_code(job)
                    where = "" if code == 0 else f"; its log: {job.paths.stderr}"
                    console.print(f"worker job {job.job_id} ended (exit {code}){where}", highlight=False,
                                  soft_wrap=True)
            if len(codes) < len(jobs):
                time.sleep(POLL_S)
    except BaseException:
        running = [j for j in jobs if j.job_id not in codes]
        for job in running:
            _cancel(job, launcher)
        deadline = time.time() + CANCEL_WAIT_S
        while time.time() < deadline and not all(j.done() for j in running):
            time.sleep(1)
        raise
    return [codes[j.job_id] for j in jobs]


def run_workers(job: WorkerJob, workers: int, launcher: Optional[Launcher] = None, console=None) -> List[int]:
    """Start `workers` workers running the job where `launcher` says (default: processes), wait for
    them and return their exit codes (0 done, 2 a UserError, 130 / 143 stopped by a signal).

    Processes: multiprocessing spawn (a fresh interpreter each, no forked torch or database state);
    Ctrl+C reaches them through the process group; on any other exit here they are terminated."""
    if launcher is not None and launcher.submits:
        return _submit_workers(launcher, job, workers, console or output_console())
    ctx = multiprocessing.get_context("spawn")
    threads = threads_per_worker(workers)
    procs = [ctx.Process(target=_worker_main, args=(WorkerArgs(job, i, threads),), name=f"fcdm-worker-{i}")
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


__all__ = ["LAUNCHERS", "Launcher", "WorkerArgs", "WorkerJob", "default_workers", "run_workers", "threads_per_worker"]
