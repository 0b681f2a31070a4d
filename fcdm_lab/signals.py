"""Stopping on signals: finish the step, write a checkpoint, exit with the signal's code.

Schedulers stop jobs with a signal: Slurm sends SIGTERM at preemption or the time limit (and
SIGUSR1 ahead of it with `--signal=USR1@120`), a terminal sends SIGINT on Ctrl-C. Inside
`stop_on_signals()` those signals only set a flag; the training loop looks at it after each step
(a Python attribute, no device synchronisation), writes a checkpoint and raises `Interrupted`,
which carries the exit code (130 for SIGINT, 143 for SIGTERM and SIGUSR1) and a one-line message.

    with stop_on_signals() as stop:          # studies wrap a whole study; train() nests inside
        for item in work:
            ...
            if stop.requested:
                raise stop.interrupted("stopped between trials")

`Interrupted` is a KeyboardInterrupt, so everything that already treats Ctrl-C as "stopped by the
user" does so for a scheduler's signal too: `tracking.tracked_run` ends the MLflow run KILLED,
Optuna marks the trial FAIL and re-raises. Outside `stop_on_signals()` (setup, evaluation),
`raise_on_signals()` (installed by the CLI) turns SIGTERM / SIGUSR1 into an `Interrupted` at once,
as Python does for SIGINT, so no command dies without closing its runs.

Handlers can only be installed from the main thread; elsewhere both contexts do nothing.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Under several processes the flag is all-reduced every AGREE_EVERY steps (one small collective
# and one host synchronisation per AGREE_EVERY steps), so that all processes stop at the same step.
AGREE_EVERY = 10


def exit_code_for(signum: int) -> int:
    """The shell's convention 128 + signal number; SIGUSR1 (a scheduler's warning) counts as SIGTERM."""
    return 128 + (signal.SIGTERM if signum == signal.SIGUSR1 else signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal. exit_code: 130 (SIGINT) or 143 (SIGTERM, SIGUSR1); message: one line;
    checkpoint / out_dir / step: what was saved, when a training was stopped (else None)."""

    def __init__(self, signum: int, message: str, *, checkpoint=None, out_dir=None, step: int | None = None):
        super().__init__(message)
        self.signum, self.message = signum, message
        self.exit_code = exit_code_for(signum)
        self.checkpoint, self.out_dir, self.step = checkpoint, out_dir, step

    def __str__(self) -> str:
        return self.message


class StopRequest:
    """The flag the handlers set. `requested` is a plain attribute read; `agree()` makes every
    process of a distributed job see the same answer at the same step."""

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise Interrupted(signum, "stopped at once by a second Ctrl-C; nothing was saved since the last checkpoint")
        first = self.signum is None
        self.signum = self.signum or signum
        if first:  # os.write: print() is not safe inside a signal handler (it may interrupt a print)
            os.write(2, f"\n{signal_name(signum)} received: stopping after this step and writing a checkpoint "
                        f"(Ctrl-C again to stop at once)\n".encode())

    def agree(self, step: int, world: int, accelerator=None) -> bool:
        """Stop now? One process: the flag. Several: the flag of any process, looked at (collectively)
        every AGREE_EVERY steps only, so that no step pays a device-to-host synchronisation."""
        if world <= 1:
            return self.requested
        if step % AGREE_EVERY:
            return False
        import torch

        flag = torch.tensor(1.0 if self.requested else 0.0, device=accelerator.device)
        stop = accelerator.reduce(flag, "sum").item() > 0
        if stop and self.signum is None:  # another process got the signal; report it as a SIGTERM
            self.signum = signal.SIGTERM
        return stop

    def interrupted(self, message: str, **saved) -> Interrupted:
        """The exception to raise once the work is saved (`message` says what was saved)."""
        return Interrupted(self.signum or signal.SIGTERM, f"stopped by {signal_name(self.signum or signal.SIGTERM)}"
                           f" ({message})", **saved)


_active: StopRequest | None = None  # the outermost stop_on_signals() of this process


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, `signals` set the yielded StopRequest instead of stopping the process.
    Nested use shares the outermost request; the previous handlers come back on exit."""
    global _active
    if _active is not None:
        yield _active
        return
    request = StopRequest()
    if not _in_main_thread():
        yield request  # never set: signals keep their handlers (only the main thread may change them)
        return
    previous = {s: signal.signal(s, request._handle) for s in signals}
    _active = request
    try:
        yield request
    finally:
        _active = None
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum, f"stopped by {signal_name(signum)}")


@contextlib.contextmanager
def raise_on_signals(signals=(signal.SIGTERM, signal.SIGUSR1)) -> Iterator[None]:
    """Within the block, `signals` raise `Interrupted` at once (like SIGINT's KeyboardInterrupt), so
    `finally` blocks and run contexts close cleanly. `stop_on_signals()` blocks inside take over."""
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_in_worker(worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: workers ignore stop signals (a scheduler signals every process of
    the job; a worker that died of it would fail the main process's next batch). The main process
    shuts its workers down when it stops."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
