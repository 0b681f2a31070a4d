"""Training checkpoints on disk: atomic writes, keep-last-K, finding the newest valid one.

A checkpoint is one `torch.save`d dict (`out_dir/checkpoints/step_0000500.pt`) with the reference
repository's keys "model", "ema", "opt", "args" (so its tools can read ours) plus what an exact
resume needs (see `trainer.py`). Only plain containers, tensors and numbers go in, so every file
loads with `torch.load(weights_only=True)`: opening a checkpoint never runs pickled code.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

FORMAT = "fcdm-lab-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{7,})\.pt$")
_TMP_PREFIX = ".tmp-"


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:07d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step_*.pt` in `out_dir/checkpoints`, oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in a nested container: what torch.save will write, give or take."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _no_space(path: Path, needed: int) -> UserError:
    free = shutil.disk_usage(path.parent).free
    kept = [str(p) for _, p in list_checkpoints(path.parent.parent)]
    intact = f"earlier checkpoints are intact (newest: {kept[-1]})" if kept else "no earlier checkpoint exists"
    return UserError(f"no space left to write checkpoint {path}: it needs about {_mb(needed)}, {_mb(free)} is free "
                     f"there; {intact}; free some space and resume with --resume latest")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A crash (or SIGKILL) mid-write leaves at most a hidden `.tmp-*` file, never a truncated
    checkpoint under the real name; `os.replace` is atomic within one filesystem. A full disk is a
    UserError naming the space needed (checked before writing, and when a write fails: torch
    reports ENOSPC as a bare RuntimeError), and the files already there stay as they were.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = _nbytes(obj) + (1 << 16)  # + pickle and zip headers
    if shutil.disk_usage(path.parent).free < needed:
        raise _no_space(path, needed)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # Full if the filesystem has less room than what was still to be written (measured before
        # the partial file goes, which gives its space back).
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if isinstance(e, (OSError, RuntimeError)) and not full and os.path.exists(tmp):
            full = shutil.disk_usage(path.parent).free < needed - os.path.getsize(tmp)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if full:
            raise _no_space(path, needed) from None
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete `.tmp-*` files a killed writer left in the checkpoint folder; returns them."""
    folder = checkpoint_dir(out_dir)
    stale = [p for p in folder.glob(f"{_TMP_PREFIX}*") if p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Keep the newest `keep_last` checkpoints, delete the rest; returns the deleted paths."""
    old = [p for _, p in list_checkpoints(out_dir)[:-keep_last]] if keep_last > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict safely (weights_only); UserError if it is missing or not a checkpoint.

    argparse.Namespace is allowed because the reference repository stores its "args" as one.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} is not a file")
    if not zipfile.is_zipfile(path):  # torch.save's format since torch 1.6; anything else is refused
        with open(path, "rb") as f:
            head = f.read(512)
        if b"\0" not in head and head.strip():
            what = f"a text file (starting {head.decode(errors='replace').strip().splitlines()[0][:40]!r})"
        else:
            what = "empty" if not head else "truncated or not a file written by torch.save"
        raise UserError(f"{str(path)!r} is not a checkpoint: it is {what}; pass a step_*.pt file of a run folder")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled classes we do not allow
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{str(path)!r} is not a readable checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{str(path)!r} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    return obj


def is_training_checkpoint(ckpt: dict) -> bool:
    return ckpt.get("format") == FORMAT


def find_latest_checkpoint(out_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint in `out_dir/checkpoints` that loads, with its contents; None if none.

    Newest first; an unreadable file (a disk that filled up, a copy cut short) is skipped for the
    one before it.
    """
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            ckpt = read_checkpoint(path)
        except UserError as e:
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
            continue
        if is_training_checkpoint(ckpt):
            return path, ckpt
        warnings.warn(f"skipping {path}: not an fcdm-lab training checkpoint", stacklevel=2)
    return None


def resume_source(out_dir: str | os.PathLike, resume: str | None) -> tuple[Path | None, dict | None]:
    """What a training into `out_dir` resumes from: (None, None) for a fresh run (refused if the
    folder already has checkpoints), the newest valid checkpoint for "latest", or the given file.
    UserError, naming the fix, for anything that cannot be resumed. One place for both the checks
    made before a tracked run is created and the trainer itself."""
    out_dir = Path(out_dir)
    if resume is None:
        existing = list_checkpoints(out_dir)
        if existing:
            raise UserError(f"{out_dir} already has checkpoints (newest: step {existing[-1][0]}); resume them "
                            f"with --resume latest (resume='latest') or choose another output folder")
        return None, None
    if resume == "latest":
        found = find_latest_checkpoint(out_dir)
        if found is None:
            raise UserError(f"nothing to resume: no valid checkpoint in {checkpoint_dir(out_dir)}; "
                            f"start without --resume, or pass a checkpoint path")
        return found
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass --resume latest or a "
                        f"checkpoints/step_*.pt file")
    try:
        ckpt = read_checkpoint(path)
    except UserError:
        raise
    except Exception as e:  # truncated, a text file, a foreign pickle
        raise UserError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}); pass an intact "
                        f"checkpoints/step_*.pt file or --resume latest") from None
    if not is_training_checkpoint(ckpt):
        raise UserError(f"{path} is not an fcdm-lab training checkpoint (keys: {', '.join(map(str, sorted(ckpt)))}); "
                        f"only those can be resumed")
    return path, ckpt
