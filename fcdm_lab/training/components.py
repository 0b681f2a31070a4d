"""The parts a training is built from, each replaceable on its own: the resumable data stream,
the EMA update, the learning-rate schedule, the accelerator and the logging window.
"""
from __future__ import annotations

import time
from typing import Iterator

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import Sampler

from ..config import ExperimentConfig
from ..errors import UserError, choices


class ResumableSampler(Sampler[int]):
    """An endless, resumable stream of dataset indices, split over processes.

    The global stream is the concatenation of one permutation per epoch (from
    torch.Generator(seed + epoch)). Process `rank` of `world` takes global positions
    start + rank, start + rank + world, ...; so the global batch of every step is the same set of
    items whatever the number of processes, and resuming is starting at `start` = items consumed.
    Hand-written because torch's DistributedSampler cannot start mid-epoch and drops or pads at
    epoch ends.
    """

    def __init__(self, num_items: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if num_items < 1:
            raise UserError("the training dataset is empty")
        self.num_items, self.seed, self.start, self.rank, self.world = num_items, seed, start, rank, world
        self._epoch, self._perm = -1, None

    def index_at(self, position: int) -> int:
        epoch, i = divmod(position, self.num_items)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_items, generator=g).tolist()
        return self._perm[i]

    def __iter__(self) -> Iterator[int]:
        position = self.start + self.rank
        while True:
            yield self.index_at(position)
            position += self.world


def ema_multi_avg_fn(decay: float, warmup: bool, count=None):
    """EMA update for AveragedModel; with warm-up the decay is min(decay, (1 + n) / (10 + n)), n = the
    number of updates so far, so short runs are not dominated by the random init. `count()` gives n
    from host memory (AveragedModel keeps `n_averaged` on the CPU), so that the warm-up costs no
    GPU->CPU synchronisation per step; AveragedModel hands the update a device copy of it."""
    if not warmup:
        return get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(ema_params, params, num_averaged):
        n = count() if count is not None else int(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant (DiT). `step` counts from 0."""
    return lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else lr


def make_accelerator(cfg: ExperimentConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs

    mp = cfg.train.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision = 'fp16' needs a CUDA GPU; on this machine use 'bf16' or 'no'")
    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision;
    # studies call train() many times in one process, so drop the old state (private API, accelerate 1.x).
    old = AcceleratorState._shared_state.get("_mixed_precision")
    if old is not None and old != mp:
        AcceleratorState._reset_state()
    # Gradients as views of DDP's buckets: the weights live in channels_last memory, and without this
    # DDP copies every gradient into a contiguous bucket each step ("grad strides do not match bucket
    # view strides"); as views, backward accumulates straight into the bucket, in the parameter's layout.
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    # torch.compile is applied per block by train() (regional compilation), not by accelerate.
    return Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.train.grad_accum,
                       dynamo_backend="no", kwargs_handlers=[ddp])


def micro_batch(cfg: ExperimentConfig, world: int) -> int:
    per = world * cfg.train.grad_accum
    if cfg.train.batch_size % per:
        valid = [b for b in range(per, 4 * per + 1, per)]
        raise UserError(f"train.batch_size {cfg.train.batch_size} (the global batch) must be divisible by "
                        f"processes x grad_accum = {world} x {cfg.train.grad_accum} = {per}; e.g. {choices(valid)}")
    return cfg.train.batch_size // per


class LogWindow:
    """Per-sample losses and t since the last log, for the mean loss and the per-quartile losses."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []
        self.t_fracs: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        self.images = 0
        self.start = time.perf_counter()
        self.paused = 0.0

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start - self.paused, 1e-9)

    def metrics(self, accelerator, lr: float) -> dict:
        """Collective (every process must call it): gathers the window from all processes."""
        loss = accelerator.gather(torch.cat(self.losses)).float()
        t = accelerator.gather(torch.cat(self.t_fracs)).float()
        quartile = (t * 4).long().clamp_(0, 3)
        out = {"loss": loss.mean().item()}
        for q in range(4):
            sel = loss[quartile == q]
            if sel.numel():
                out[f"loss_q{q + 1}"] = sel.mean().item()
        out["lr"] = lr
        out["images_per_s"] = self.images / self.elapsed()
        if self.grad_norms:
            out["grad_norm"] = torch.stack(self.grad_norms).mean().item()
        return out


__all__ = ["LogWindow", "ResumableSampler", "ema_multi_avg_fn", "lr_at", "make_accelerator", "micro_batch"]
