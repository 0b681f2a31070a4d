"""Large sample sets (FID-50K) on disk, one shard per batch: distributed under accelerate and
resumable after a crash.

    folder/manifest.json        the settings the shards were made with (a resume must match them)
    folder/shard_000123.npz     batch 123: arr (uint8 NHWC, the reference's key), labels

Batch b is fully determined by (seed, b) (see generation.BatchSampler), so a shard written by any
process in any earlier attempt is exactly the shard this attempt would write: finished shards are
kept and only the missing ones are sampled. Each process takes every world-th missing shard; a shard
is written to a temporary name and renamed, so a killed process never leaves a half-written shard.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import atomic_write, atomic_write_json
from ..progress import track
from .generation import BatchSampler, _distributed

MANIFEST = "manifest.json"


def shard_path(folder: Path, b: int) -> Path:
    return folder / f"shard_{b:06d}.npz"


def _check_manifest(folder: Path, settings: dict) -> None:
    """Write the manifest, or check that an existing one was made with the same settings."""
    path = folder / MANIFEST
    settings = json.loads(json.dumps(settings, default=str))  # the form it takes on disk
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in sorted(set(old) | set(settings))
                if old.get(k) != settings.get(k)]
        if diff:
            raise UserError(f"{folder} holds shards made with other settings ({'; '.join(diff[:4])}); use another "
                            f"output folder or delete it")
        return
    atomic_write_json(path, settings)


def _done(folder: Path, n: int) -> list[int]:
    return [b for b in range(n) if shard_path(folder, b).is_file()]


def sample_to_shards(batches: BatchSampler, folder: str | os.PathLike, *, settings: dict, progress: bool = True,
                     distributed: bool | None = None) -> dict:
    """Sample every batch of `batches` into `folder`, skipping shards already there; returns
    {"folder", "num_batches", "sampled": batches sampled by this process, "reused": shards found}.

    settings: what determines the samples besides the batch index (checkpoint, sampler, steps,
    guidance, seed, batch size, number, ...): recorded in the manifest and checked on resume.
    """
    state, dist = _distributed(distributed)
    folder = Path(folder)
    if state.is_main_process:
        _check_manifest(folder, {**settings, "num_batches": batches.num_batches, "batch_size": batches.batch_size,
                                 "seed": batches.seed})
    if dist:
        state.wait_for_everyone()
        _check_manifest(folder, {**settings, "num_batches": batches.num_batches, "batch_size": batches.batch_size,
                                 "seed": batches.seed})
    n = batches.num_batches
    done = _done(folder, n)
    rank, world = (state.process_index, state.num_processes) if dist else (0, 1)
    missing = [b for b in range(n) if b not in set(done)]
    mine = missing[rank::world]
    for b in track(mine, progress and rank == 0, f"sampling {n} batches ({len(done)} done before)", total=len(mine)):
        images, labels = batches(b)
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        atomic_write(shard_path(folder, b), lambda f: np.savez(f, arr=nhwc, labels=labels.numpy().astype(np.int64)))
    if dist:
        state.wait_for_everyone()
    return {"folder": folder, "num_batches": n, "sampled": len(mine), "reused": len(done)}


def read_shards(folder: str | os.PathLike, num_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All shards of a folder in batch order: (uint8 images (N, C, H, W), labels (N,)). UserError if
    any of the manifest's batches is missing (the sampling has not finished)."""
    folder = Path(folder)
    if num_batches is None:
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise UserError(f"{folder} has no {MANIFEST}: not a shard folder")
        num_batches = int(json.loads(manifest.read_text())["num_batches"])
    missing = [b for b in range(num_batches) if not shard_path(folder, b).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {len(missing)} of {num_batches} shards (e.g. {shard_path(folder, missing[0]).name}): "
                        f"the sampling has not finished; run it again to resume")
    images, labels = [], []
    for b in range(num_batches):
        with np.load(shard_path(folder, b)) as data:
            images.append(torch.from_numpy(data["arr"]).permute(0, 3, 1, 2))
            labels.append(torch.from_numpy(data["labels"]))
    return torch.cat(images).contiguous(), torch.cat(labels)
