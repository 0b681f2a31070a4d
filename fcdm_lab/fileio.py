"""Files that are either whole or absent: the one atomic-write helper, and output-folder checks.

    atomic_write(path, lambda f: torch.save(obj, f), needed=nbytes)   # any writer that takes a file
    atomic_write_text(path, text); atomic_write_json(path, obj)
    with replaced_folder(run / "model") as tmp: model.save_pretrained(tmp)   # a whole folder at once
    check_output_dir(out_dir)                                          # before anything is written

A file is written aside (a hidden temporary in the same folder), flushed to disk, then renamed
over its name: a reader, a racing writer or a crash (SIGKILL, power) only ever sees the old file or
the new one, never half of one. A full disk (or a quota) is a one-line `DiskFull` (a UserError:
exit 2) naming the space needed, and the file that was there stays as it was. Writers such as
torch.save and safetensors report ENOSPC in their own exception types; a failed write is counted as
"disk full" whenever the filesystem has less room left than was still to be written.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from .errors import UserError

TMP_PREFIX = ".tmp-"  # temporaries a killed writer may leave behind start with this


class DiskFull(UserError):
    """No space (or quota) left to write a file; the message names the space needed."""


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _disk_full(path: Path, needed: int | None, hint: str, what: str = "") -> DiskFull:
    free = shutil.disk_usage(_existing(path.parent)).free
    need = f"it needs about {_mb(needed)}, " if needed else ""
    return DiskFull(f"no space left to write {what + ' ' if what else ''}{path}: {need}{_mb(free)} is free there; "
                    f"{hint}")


def _existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX); a no-op where folders cannot be opened."""
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


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, needed: int | None = None,
                 hint: str = "free some space or choose another folder", what: str = "", mode: int = 0o644) -> Path:
    """Call `write(f)` on a temporary file next to `path`, then rename it over `path`.

    needed: bytes the write will take, checked against the free space first (None: not checked
    before). hint: what the DiskFull message tells the user to do; what: the kind of file it names
    ("checkpoint"). mode: the file's permissions (a temporary file is owner-only; caches and run
    folders are shared)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if needed is not None and shutil.disk_usage(path.parent).free < needed:
        raise _disk_full(path, needed, hint, what)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and isinstance(e, Exception) and needed is not None and os.path.exists(tmp):
            # measured before the partial file goes (which gives its space back)
            full = shutil.disk_usage(path.parent).free < needed - os.path.getsize(tmp)
        if not full and isinstance(e, Exception) and "No space left" in str(e):
            full = True  # e.g. safetensors' SafetensorError, torch's RuntimeError wrapping ENOSPC
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            raise _disk_full(path, needed, hint, what) from None
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, **kwargs) -> Path:
    return atomic_write(path, lambda f: f.write(data), needed=len(data) + 4096, **kwargs)


def atomic_write_text(path: str | os.PathLike, text: str, **kwargs) -> Path:
    return atomic_write_bytes(path, text.encode(), **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n", **kwargs)


@contextlib.contextmanager
def replaced_folder(path: str | os.PathLike, *, hint: str = "free some space or choose another folder"
                    ) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; when the block succeeds it takes `path`'s place
    (an older folder there is removed after the swap), when it fails it is removed and `path` stays.
    For writers that fill a whole folder (diffusers' save_pretrained)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if path.exists():
            old = path.with_name(f"{TMP_PREFIX}{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or (
                isinstance(e, Exception) and "No space left" in str(e)):
            raise _disk_full(path, None, hint) from None
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed writers left in `folder` (files and folders named TMP_PREFIX*)."""
    folder = Path(folder)
    stale = sorted(folder.glob(f"{TMP_PREFIX}*")) if folder.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def check_output_dir(out_dir: str | os.PathLike) -> Path:
    """`out_dir` is a folder (or can be made one) on a writable filesystem; nothing is created."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {str(out)!r} is an existing file; choose a folder (--out DIR)")
    base = _existing(out)
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


__all__ = ["DiskFull", "TMP_PREFIX", "atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "check_output_dir", "fsync_dir", "remove_stale_temporaries", "replaced_folder"]
