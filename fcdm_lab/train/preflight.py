"""Checks that run before a training writes anything, and the lock on a run folder.

    check_output_dir(out_dir)                        # an existing file, a read-only or unwritable place
    check_model_memory(cfg.model, data_info, device) # parameters x bytes needed vs memory free, on meta
    with run_folder_lock(out_dir): ...               # a second `train` into the folder is refused

Each raises a one-line `UserError`. `train()` calls all three itself; a pipeline that opens an
MLflow run or writes a pointer file calls the first two before doing so (bad input leaves no trace).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import UserError

LOCK_FILE = ".fcdm-lab.lock"
# Training memory per parameter in float32: weights, gradients, AdamW's two moments, the EMA copy.
TRAIN_BYTES_PER_PARAM = 4 + 4 + 8 + 4


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """`out_dir` is a folder (or can be made one) on a writable filesystem; nothing is created."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {str(out)!r} is an existing file; choose a folder (--out DIR)")
    base = _existing_ancestor(out)
    if not base.is_dir():
        raise UserError(f"cannot create output folder {str(out)!r}: {str(base)!r} is a file; choose another --out")
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or not os.access(base, os.W_OK | os.X_OK):
        why = "is on a read-only filesystem" if read_only else "is not writable (permission denied)"
        raise UserError(f"cannot write output folder {str(out)!r}: {str(base)!r} {why}; choose another --out")
    return out


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


def check_model_memory(model_cfg, data_info: Mapping, device: torch.device | str = "cpu") -> int:
    """Build the model on the meta device (no memory) and refuse it when its training state alone
    (TRAIN_BYTES_PER_PARAM per parameter, activations not counted) exceeds the memory free on
    `device`. Returns the parameter count."""
    from ..models.build import build_model

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
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise UserError(f"{str(folder)!r} is in use by another training (pid {holder}); wait for it to end, or "
                        f"write to another folder with --out") from None
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
