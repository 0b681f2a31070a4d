"""The training state and its checkpoint files: what an exact resume needs, saved atomically,
keep-last-K, the newest valid one found, resume sources checked.

    state = TrainingState(model, ema, opt, scaler)      # the live objects the loop updates
    state.load(ckpt)                                    # from read_checkpoint / resume_source
    state.save(checkpoint_path(out_dir, state.step), config=..., rng=..., ...)

A checkpoint is one `torch.save`d dict (`out_dir/checkpoints/step_0000500.pt`) with the reference
repository's keys "model", "ema", "opt", "args" (so its tools can read ours) plus what an exact
resume needs: the step, the data position, the EMA update count, the grad scaler, every
process's random streams, and the model and data info. Only plain containers, tensors and numbers
go in, so every file loads with `torch.load(weights_only=True)`: opening one never runs pickled code.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import fileio
from ..errors import UserError
from ..fileio import atomic_write

FORMAT = "fcdm-lab-checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{7,})\.pt$")


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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`
    (fileio.atomic_write): a crash (or SIGKILL) mid-write leaves at most a hidden `.tmp-*` file, never
    a truncated checkpoint under the real name. A full disk is a UserError naming the space needed
    (checked before writing, and when a write fails), and the files already there stay as they were.
    """
    path = Path(path)
    kept = [str(p) for _, p in list_checkpoints(path.parent.parent)]
    intact = f"earlier checkpoints are intact (newest: {kept[-1]})" if kept else "no earlier checkpoint exists"
    return atomic_write(path, lambda f: torch.save(obj, f), needed=_nbytes(obj) + (1 << 16),  # + pickle, zip headers
                        what="checkpoint", hint=f"{intact}; free some space and resume with --resume latest")


@dataclass
class TrainingState:
    """The live objects a training updates (model, EMA, optimizer, grad scaler) with its position
    (optimizer steps done, dataset items consumed): what a checkpoint saves and restores."""

    model: torch.nn.Module
    ema: Any                                 # torch.optim.swa_utils.AveragedModel around a copy of model
    opt: torch.optim.Optimizer
    scaler: Any = None                       # accelerate's GradScaler under fp16, else None
    step: int = 0
    data_pos: int = 0

    def load(self, ckpt: dict) -> None:
        """Restore from a checkpoint dict (read_checkpoint); call before the objects are prepared."""
        self.model.load_state_dict(ckpt["model"])
        self.ema.module.load_state_dict(ckpt["ema"])
        self.ema.n_averaged.fill_(int(ckpt["ema_updates"]))
        self.opt.load_state_dict(ckpt["opt"])
        if ckpt.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.data_pos = int(ckpt["step"]), int(ckpt["data_pos"])

    def save(self, path: str | os.PathLike, *, config: dict, model_info: dict, data_info: dict, rng: list,
             world_size: int, loss: float) -> Path:
        """One checkpoint file (atomic; a full disk is one line and keeps the older checkpoints)."""
        return atomic_torch_save({
            "format": FORMAT, "version": VERSION, "step": self.step, "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(), "opt": self.opt.state_dict(), "args": config,
            "ema_updates": int(self.ema.n_averaged),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng, "data_pos": self.data_pos, "world_size": world_size,
            "model_info": model_info, "data_info": data_info, "loss": loss,
        }, path)


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[Path]:
    """Delete `.tmp-*` files a killed writer left in the checkpoint folder; returns them."""
    return fileio.remove_stale_temporaries(checkpoint_dir(out_dir))


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
            # mmap: tensors are read when used, so a check that only looks at the metadata (a resume's
            # compatibility, before a run opens) costs no time for a multi-GB checkpoint
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
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


def check_compatible(ckpt: dict, model_info: dict, data_info: dict, path: Path) -> None:
    """A checkpoint must fit the model this config builds; say exactly what differs."""
    new = model_info["kwargs"]
    # A setting added after the checkpoint was written (e.g. label_dropout) counts as its old default.
    old = {"label_dropout": "shared", **(ckpt.get("model_info") or {}).get("kwargs", {})}
    if "label_dropout" not in new:
        old.pop("label_dropout")
    diff = [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k != "grad_checkpointing" and old.get(k) != new.get(k)]
    if ckpt.get("model_info", {}).get("name") != model_info["name"]:
        diff.insert(0, f"model: checkpoint {ckpt.get('model_info', {}).get('name')!r}, now {model_info['name']!r}")
    if diff:
        hint = ""
        if old.get("in_channels") != new.get("in_channels"):
            hint = (f" (the data has {data_info['channels']} channels but the checkpoint's model takes "
                    f"{old.get('in_channels')}: latent channels do not match the model)")
        raise UserError(f"cannot resume from {path}: it was trained with another model{hint}; "
                        f"differences: {'; '.join(diff)}")


def resume_source(out_dir: str | os.PathLike, resume: str | None) -> tuple[Path | None, dict | None]:
    """What a training into `out_dir` resumes from: (None, None) for a fresh run (refused if the
    folder already has checkpoints), the newest valid checkpoint for "latest", the given file, or
    the newest valid checkpoint of a given run folder.
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
    if path.is_dir():  # a run folder (or its checkpoints/ folder): its newest valid checkpoint
        folder = path.parent if path.name == CHECKPOINT_DIR else path
        found = find_latest_checkpoint(folder)
        if found is None:
            raise UserError(f"--resume {str(path)!r} is a folder without valid checkpoints ({checkpoint_dir(folder)}"
                            f"/step_*.pt); pass a run folder that has them, a checkpoint file or --resume latest")
        return found
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass --resume latest, a run folder or a "
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
