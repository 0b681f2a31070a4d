"""Checks that run before a training writes anything, and the lock on a run folder.

    checked = check_run(cfg, out_dir, resume=None)   # all of the below that a config allows; writes nothing
    check_output_dir(out_dir)                        # an existing file, a read-only or unwritable place
    check_model_memory(cfg.model, data_info, device) # parameters x bytes needed vs memory free, on meta
    with run_folder_lock(out_dir): ...               # a second `train` into the folder is refused

Each raises a one-line `UserError`. `train()` calls them itself; whoever opens an MLflow run or
writes a pointer file for a training calls `check_run` and takes the lock first, so that bad input
(and a refused second training) leaves no run, folder or file behind.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping

import torch

from ..errors import UserError
from ..fileio import check_output_dir
from ..models.build import build_model
from ..models.info import data_info_for, model_info_for
from . import state as ckpt_io

LOCK_FILE = ".fcdm-lab.lock"
# Training memory per parameter in float32: weights, gradients, AdamW's two moments, the EMA copy.
TRAIN_BYTES_PER_PARAM = 4 + 4 + 8 + 4


def _free_memory(device: torch.device) -> tuple[int, str]:
    """(bytes free, what was measured) on `device`."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device} ({torch.cuda.get_device_name(device)})"
    import psutil  # a dependency of accelerate

    return psutil.virtual_memory().available, "available RAM"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:,.1f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def training_device() -> torch.device:
    """The device a training of this process will use, without creating accelerate's state (which
    the trainer configures): the launcher's local GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class CheckedRun:
    resume: str | None              # what to hand the trainer: None, "latest" or a checkpoint path
    model_info: Dict[str, Any]      # meta-device build (params, GMACs, compute matching)
    data_info: Dict[str, Any]


def check_config(cfg) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """(model_info, data_info) of a config whose data loads, whose model builds (on the meta device)
    and whose training state fits the memory of this machine's training device; else a UserError."""
    data_info = data_info_for(cfg)
    model_info = model_info_for(cfg, data_info)
    check_model_memory(cfg.model, data_info, training_device())
    return model_info, data_info


def check_run(cfg, out_dir: str | os.PathLike, *, resume: str | None = None) -> CheckedRun:
    """Everything a training can check before it creates anything, in the order a user fixes them:
    the output folder, the checkpoint to resume, the data, the model (built on the meta device: bad
    blocks and shapes fail here), its memory, and that the checkpoint fits the model."""
    check_output_dir(out_dir)
    check_not_in_use(out_dir)
    ckpt_path, ckpt = ckpt_io.resume_source(out_dir, resume)
    model_info, data_info = check_config(cfg)
    if ckpt is not None:
        ckpt_io.check_compatible(ckpt, model_info, data_info, ckpt_path)
    return CheckedRun(resume, model_info, data_info)


def check_model_memory(model_cfg, data_info: Mapping, device: torch.device | str = "cpu") -> int:
    """Build the model on the meta device (no memory) and refuse it when its training state alone
    (TRAIN_BYTES_PER_PARAM per parameter, activations not counted) exceeds the memory free on
    `device`. Returns the parameter count."""
    device = torch.device(device)
    with torch.device("meta"):
        model, info = build_model(model_cfg, input_size=data_info["image_size"], in_channels=data_info["channels"],
                                  num_classes=data_info["num_classes"])
    del model
    params = int(info["params"])
    needed = params * TRAIN_BYTES_PER_PARAM
    free, where = _free_memory(device)
    if needed > free:
        shape = ", ".join(f"{k}={info['kwargs'][k]}" for k in ("L", "C") if k in info["kwargs"])
        raise UserError(f"model {info['name']}{f' ({shape})' if shape else ''} has {_count(params)} parameters: "
                        f"training needs at least {_gb(needed)} (weights, gradients, AdamW state, EMA) but only "
                        f"{_gb(free)} is {where}; choose a smaller model")
    return params


# ---------------------------------------------------------------------------------------------
# One training per folder
# ---------------------------------------------------------------------------------------------

_held: dict[str, int] = {}  # lock files this process holds (a nested lock of the same folder is a no-op)


def _in_use(folder: Path, fd: int) -> UserError:
    holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
    return UserError(f"{str(folder)!r} is in use by another training (pid {holder}); wait for it to end, or "
                     f"write to another folder with --out")


def check_not_in_use(out_dir: str | os.PathLike) -> None:
    """A UserError when another process holds `out_dir`'s lock (nothing is created or changed)."""
    path = Path(out_dir) / LOCK_FILE
    if not path.is_file() or str(path.resolve()) in _held:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # shared: fails only against the holder's exclusive lock
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise _in_use(Path(out_dir), fd) from None
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_folder_lock(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive `flock` on `out_dir/.fcdm-lab.lock` for the block (created with the folder).

    The operating system drops the lock when the holder dies, however it dies, so a killed run never
    blocks its own resume. If the block fails and left only the lock in a folder it created, the
    folder goes again (a refused run leaves no trace)."""
    folder = Path(out_dir)
    check_output_dir(folder)
    first_new = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        first_new = p
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = str(path.resolve())
    if key in _held:
        yield folder
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        error = _in_use(folder, fd)
        os.close(fd)
        raise error from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd
    try:
        yield folder
    finally:
        del _held[key]
        if first_new is not None and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            path.unlink(missing_ok=True)
            for p in [folder, *folder.parents]:  # the folders this call created, innermost first
                with contextlib.suppress(OSError):
                    p.rmdir()
                if p == first_new:
                    break
        os.close(fd)
