"""The training loop: one `train(cfg, out_dir)` for a laptop CPU, one GPU or many (accelerate).

    result = train(load_experiment("tiny-digits"), "runs/tiny")          # plain python: 1 process
    accelerate launch -m fcdm_lab train fcdm-s-imagenet256 ...           # N processes (DDP)

The recipe is DiT's (AdamW, constant lr, EMA, label dropout inside the model), driven by an
`ExperimentConfig`. Determinism is part of the design, so that ablations are *paired*: with the same
`train.seed`, two runs see the same data order (`ResumableSampler`) and the same diffusion timesteps
and noise (a generator seeded from (seed, process index)), whatever the model. A run killed at any
moment and resumed with `resume="latest"` ends bit-identical to an uninterrupted one (on CPU, where
kernels are deterministic): the checkpoint holds the model, EMA, optimizer, every RNG and the data
position.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Sampler

from ..accel import configure_tf32
from ..config import ExperimentConfig
from ..data.build import build_dataset
from ..diffusion import create_objective
from ..errors import UserError, choices
from ..models.build import build_model
from ..models.info import data_config
from . import checkpoint as ckpt_io
from ..fileio import atomic_write, atomic_write_text, check_output_dir
from .preflight import check_model_memory, run_folder_lock
from ..inference import generate, grid_labels, load_vae_for, save_grid
from ..rng import all_gather, derive_seed, rng_state, seed_streams, set_rng_state
from ..signals import StopRequest, ignore_in_worker, stop_on_signals


@dataclass
class TrainResult:
    out_dir: Path
    step: int                  # optimizer steps done in total
    checkpoint: Path           # the final checkpoint
    ema_path: Path             # out_dir/ema.safetensors
    final_loss: float          # mean loss over the last `log_every` steps (nan if none ran)
    wall_time_s: float         # the whole call, setup included
    images_per_s: float        # training throughput of this call (checkpoints and sampling excluded)
    model_info: dict
    data_info: dict
    ema_model: Any = None      # the in-memory EMA network (main process), evaluated without a reload


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# ---------------------------------------------------------------------------------------------
# Data order and seeds
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# EMA, learning rate, accelerator
# ---------------------------------------------------------------------------------------------

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


def _make_accelerator(cfg: ExperimentConfig):
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


def _micro_batch(cfg: ExperimentConfig, world: int) -> int:
    per = world * cfg.train.grad_accum
    if cfg.train.batch_size % per:
        valid = [b for b in range(per, 4 * per + 1, per)]
        raise UserError(f"train.batch_size {cfg.train.batch_size} (the global batch) must be divisible by "
                        f"processes x grad_accum = {world} x {cfg.train.grad_accum} = {per}; e.g. {choices(valid)}")
    return cfg.train.batch_size // per


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, (list, tuple)):
        return [_drop_none(v) for v in d if v is not None]
    return d


def write_config_toml(cfg: ExperimentConfig, path: str | os.PathLike) -> Path:
    """The resolved config as TOML (None values dropped: TOML has no null)."""
    import tomli_w

    return atomic_write_text(path, tomli_w.dumps(_drop_none(cfg.to_dict())))


def save_ema_safetensors(state: dict, path: str | os.PathLike, metadata: dict) -> Path:
    """EMA weights as safetensors; `metadata` values are JSON-encoded (safetensors takes str -> str)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    data = save(tensors, metadata={k: json.dumps(v) for k, v in metadata.items()})
    return atomic_write(path, lambda f: f.write(data), needed=len(data) + 4096, what="EMA weights",
                        hint="free some space, then run the same command with --resume latest")


# ---------------------------------------------------------------------------------------------
# Logging window and progress
# ---------------------------------------------------------------------------------------------

class _Window:
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


class _Progress:
    """Progress on the main process: a rich bar on a terminal; otherwise (a log file, a cluster job's
    stdout) one plain, flushed line per log step, since a bar writes nothing to a file until it ends."""

    def __init__(self, enabled: bool, total: int, done: int, description: str):
        from rich.console import Console

        self.bar, self.lines = None, False
        if not enabled:
            return
        console = Console()
        if not (console.is_terminal or console.is_jupyter):
            self.lines, self.total, self.description = True, total, description
            self.start_step, self.start = done, time.perf_counter()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[stats]}"), TimeRemainingColumn(), console=console)
        self.task = self.bar.add_task(description, total=total, completed=done, stats="")
        self.bar.start()

    def update(self, stats: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, stats=stats)

    def log(self, step: int, metrics: dict) -> None:
        """At a log step (line mode): step, loss, images/s and the ETA from this run's mean pace."""
        if not self.lines:
            return
        elapsed = time.perf_counter() - self.start
        eta = (self.total - step) * elapsed / max(step - self.start_step, 1)
        print(f"{self.description} step {step}/{self.total}  loss {metrics['loss']:.4f}  "
              f"{metrics['images_per_s']:.0f} images/s  ETA {_hms(eta)}", flush=True)

    def print(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message)
        elif self.lines:
            print(message, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------

def train(cfg: ExperimentConfig, out_dir: str | os.PathLike, *, resume: str | None = None, tracker=None,
          progress: bool = True, max_steps: int | None = None) -> TrainResult:
    """Train `cfg` into `out_dir` (checkpoints/, samples/, ema.safetensors, config.toml).

    resume: None (fresh; refused if out_dir already has checkpoints), "latest" (the newest valid
    checkpoint in out_dir), or a checkpoint path. max_steps: stop once this many steps are done in
    total (<= cfg.train.steps; the schedule and config stay those of cfg, so a later resume continues).
    tracker: duck-typed `log_metrics(dict, step)`, `log_image(array_or_pil, key, step)`,
    `log_artifact(local_path, artifact_path=None)`; only the main process calls it.

    SIGTERM, SIGINT and SIGUSR1 stop the run after the current step with a checkpoint, raising
    `signals.Interrupted` (exit code 143 / 130 / 143, resume with resume="latest"); every process
    of a distributed run stops at the same step. One training at a time per out_dir: a second is
    refused while the first runs (an OS file lock, released however the first ends).
    """
    check_output_dir(out_dir)
    # The global rank from the launcher's environment (torchrun, accelerate launch): the Accelerator
    # does not exist yet, and creating accelerate's state here would fix it before train() configures it.
    main = int(os.environ.get("RANK", "0")) == 0
    lock = run_folder_lock(out_dir) if main else contextlib.nullcontext()
    with lock, stop_on_signals() as stop:
        return _train(cfg, out_dir, stop, resume=resume, tracker=tracker, progress=progress, max_steps=max_steps)


def _train(cfg: ExperimentConfig, out_dir: str | os.PathLike, stop: StopRequest, *, resume: str | None = None,
           tracker=None, progress: bool = True, max_steps: int | None = None) -> TrainResult:
    wall_start = time.time()
    tcfg = cfg.train
    out_dir = Path(out_dir)
    if tcfg.threads is not None:
        torch.set_num_threads(tcfg.threads)
    configure_tf32(tcfg.tf32)
    accelerator = _make_accelerator(cfg)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    device = accelerator.device
    micro = _micro_batch(cfg, world)
    end_step = tcfg.steps if max_steps is None else min(tcfg.steps, max_steps)
    if end_step < 1:
        raise UserError(f"max_steps must be >= 1, got {max_steps}")

    # ---- what to resume from
    if main:
        ckpt_io.remove_stale_temporaries(out_dir)
    ckpt_path, ckpt = ckpt_io.resume_source(out_dir, resume)

    # ---- data, model, objective (identical init on every process: seeded before building)
    dataset, data_info = build_dataset(data_config(cfg), "train")
    check_model_memory(cfg.model, data_info, device)  # on the meta device, before allocating
    torch.manual_seed(tcfg.seed)
    model, model_info = build_model(cfg.model, input_size=data_info["image_size"],
                                    in_channels=data_info["channels"], num_classes=data_info["num_classes"])
    model.to(device).train()
    objective = create_objective(cfg.diffusion.objective, num_timesteps=cfg.diffusion.num_timesteps,
                                 beta_start=cfg.diffusion.beta_start, beta_end=cfg.diffusion.beta_end,
                                 learn_sigma=cfg.model.learn_sigma, time_scale=cfg.diffusion.time_scale)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(tcfg.ema_decay, tcfg.ema_warmup,
                                                             count=lambda: int(ema.n_averaged)))
    ema.update_parameters(model)  # the EMA starts as a copy of the initial weights (DiT)
    ema.module.eval().requires_grad_(False)
    fused = tcfg.fused_adamw and device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                            fused=True if fused else None)

    start_step, data_pos = 0, 0
    if ckpt is not None:
        ckpt_io.check_compatible(ckpt, model_info, data_info, ckpt_path)
        model.load_state_dict(ckpt["model"])
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.fill_(int(ckpt["ema_updates"]))
        opt.load_state_dict(ckpt["opt"])
        start_step, data_pos = int(ckpt["step"]), int(ckpt["data_pos"])

    if tcfg.compile:
        # Regional compilation (diffusers): each repeated block is compiled once and reused, so the
        # adaLN blocks compile in seconds instead of the whole U-shape in minutes; speed is the same.
        model.compile_repeated_blocks()
    train_model, opt = accelerator.prepare(model, opt)
    if ckpt is not None and ckpt.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt["scaler"])

    # ---- the data stream and the random streams (restored last: building the above draws from them)
    sampler = ResumableSampler(len(dataset), tcfg.seed, start=data_pos, rank=rank, world=world)
    workers = cfg.data.num_workers
    # Pinned host memory makes the copies in the loop asynchronous; workers prefetch two batches each.
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=workers, worker_init_fn=ignore_in_worker,
                        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
                        generator=torch.Generator().manual_seed(derive_seed(tcfg.seed, rank, data_pos, 4)))
    batches = iter(loader)
    noise_gen = seed_streams(tcfg.seed, rank, device)
    if ckpt is not None:
        states = ckpt["rng"]
        if len(states) == world:
            set_rng_state(states[rank], noise_gen)
        else:  # the data order still continues exactly; only the noise streams restart
            warnings.warn(f"checkpoint written by {len(states)} processes, resumed by {world}: "
                          f"noise and label-dropout streams are re-seeded", stacklevel=2)
            noise_gen = seed_streams(tcfg.seed, rank, device, start_step)

    # ---- sample grids: fixed labels and noise (seeded by train.seed), EMA weights
    sample_cfg = dict(sampler=cfg.eval.sampler, steps=cfg.eval.steps, eta=cfg.eval.eta, cfg_scale=cfg.eval.cfg_scale,
                      guidance_channels=cfg.eval.guidance_channels, seed=tcfg.seed, device=device)
    labels = grid_labels(data_info["num_classes"])
    vae, vae_scale, problem = None, None, None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if data_info.get("vae"):
            try:
                vae, vae_scale = load_vae_for(data_info, None, device)
            except UserError as e:
                warnings.warn(f"sample grids disabled: {e}", stacklevel=2)
                labels = None
        if labels is not None:  # fail now, not after hours of training, if the [eval] sampler is wrong
            try:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    generate(ema.module, objective, num=1, class_labels=labels[:1], batch_size=1, progress=False,
                             distributed=False, vae=vae, latent_scale=vae_scale, **{**sample_cfg, "steps": 2})
            except UserError as e:
                problem = str(e)
    if world > 1:  # every process must stop, or the others would wait for the main one forever
        problem = next((p for p in all_gather(problem) if p), None)
    if problem:
        raise UserError(f"[eval] settings (used for sample grids): {problem}")

    def sample_grid(step: int) -> None:
        if labels is None:
            return
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            images, _ = generate(ema.module, objective, num=len(labels), class_labels=labels, batch_size=len(labels),
                                 progress=False, distributed=False, vae=vae, latent_scale=vae_scale, **sample_cfg)
        name = f"step_{step:07d}.png"
        grid = save_grid(images, out_dir / "samples" / name, nrow=8)
        if tracker is not None:
            tracker.log_image(grid, "samples", step)

    def save_checkpoint(step: int, loss: float) -> Path:
        """Collective: gathers every process's RNG state; only the main process writes."""
        rng = all_gather(rng_state(noise_gen)) if world > 1 else [rng_state(noise_gen)]
        path = ckpt_io.checkpoint_path(out_dir, step)
        if main:
            state = {
                "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION, "step": step,
                "model": model.state_dict(), "ema": ema.module.state_dict(), "opt": opt.state_dict(),
                "args": cfg.to_dict(), "ema_updates": int(ema.n_averaged),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "rng": rng, "data_pos": data_pos + (step - start_step) * tcfg.batch_size, "world_size": world,
                "model_info": model_info, "data_info": data_info, "loss": loss,
            }
            ckpt_io.atomic_torch_save(state, path)
            ckpt_io.prune_checkpoints(out_dir, tcfg.keep_last)
        accelerator.wait_for_everyone()
        return path

    # ---- the loop. No host synchronisation per step (on a GPU it would stall the queue of kernels):
    # losses stay on the device and are read at logging steps and before every checkpoint, where a
    # non-finite loss stops the run naming its first bad step, so a bad step never reaches a checkpoint.
    bar = _Progress(progress and main, end_step, start_step, cfg.name)
    if ckpt_path is not None:
        bar.print(f"resumed from {ckpt_path} at step {start_step}")
    step, last_ckpt = start_step, ckpt_path
    recent: collections.deque[torch.Tensor] = collections.deque(maxlen=tcfg.log_every)
    unchecked: list[torch.Tensor] = []  # step losses since the last finiteness check
    window = _Window()
    run_start, run_paused, stats = time.perf_counter(), 0.0, ""
    images_per_step = tcfg.batch_size

    def check_finite() -> None:
        """Collective: every process learns whether any process saw a non-finite loss."""
        losses = accelerator.reduce(torch.stack(unchecked), "sum") if world > 1 else torch.stack(unchecked)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = step - len(unchecked) + int(bad[0]) + 1
            good = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise TrainingDiverged(f"training diverged: loss is {float(losses[int(bad[0])])} at step {first} "
                                   f"(lr {lr_at(first - 1, tcfg.lr, tcfg.warmup_steps):g}); {good}; "
                                   f"lower train.lr or set train.grad_clip, then resume")
        unchecked.clear()

    try:
        while step < end_step:
            lr = lr_at(step, tcfg.lr, tcfg.warmup_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for _ in range(tcfg.grad_accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with accelerator.accumulate(train_model):  # no gradient all-reduce until the last micro-step
                    terms = objective.training_losses(train_model, x, {"y": y}, generator=noise_gen)
                    loss = terms["loss"].mean()
                    accelerator.backward(loss)
                step_loss += loss.detach() / tcfg.grad_accum
                window.losses.append(terms["loss"].detach())
                window.t_fracs.append(terms["t_frac"].detach())
            if tcfg.grad_clip is not None:
                norm = accelerator.clip_grad_norm_(train_model.parameters(), tcfg.grad_clip)
                window.grad_norms.append(torch.as_tensor(norm).detach().float())
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update_parameters(model)
            step += 1
            recent.append(step_loss)
            unchecked.append(step_loss)
            window.images += images_per_step

            log_now = step % tcfg.log_every == 0 or step == end_step
            ckpt_now = step % tcfg.ckpt_every == 0 or step == end_step
            if log_now or ckpt_now:
                check_finite()
            if log_now:
                metrics = window.metrics(accelerator, lr)
                stats = f"loss {metrics['loss']:.4f}  {metrics['images_per_s']:.0f} img/s"
                if main and tracker is not None:
                    tracker.log_metrics(metrics, step)
                bar.log(step, metrics)
                window = _Window()
            bar.update(stats)
            paused = time.perf_counter()
            if ckpt_now:
                last_ckpt = save_checkpoint(step, torch.stack(list(recent)).mean().item())
            if (tcfg.sample_every > 0 and step % tcfg.sample_every == 0) or step == end_step:
                if main:
                    sample_grid(step)
                accelerator.wait_for_everyone()
            pause = time.perf_counter() - paused
            window.paused += pause
            run_paused += pause
            if step < end_step and stop.agree(step, world, accelerator):  # a signal: save, then stop
                if not ckpt_now:
                    if unchecked:
                        check_finite()
                    last_ckpt = save_checkpoint(step, torch.stack(list(recent)).mean().item())
                raise stop.interrupted(f"at step {step} of {end_step}; checkpoint {last_ckpt}",
                                       checkpoint=last_ckpt, out_dir=out_dir, step=step)
    finally:
        bar.stop()
        del batches  # stops DataLoader workers

    # ---- final artefacts
    ema_path = out_dir / "ema.safetensors"
    if main:
        meta = {"format": "fcdm-lab-ema", "step": step, "model_info": model_info, "data_info": data_info,
                "config": cfg.to_dict()}
        save_ema_safetensors(ema.module.state_dict(), ema_path, meta)
        from ..diffusers_pipeline import save_run_pipeline  # EMA model in diffusers layout (FCDMPipeline)

        diffusers_files = save_run_pipeline(ema.module, cfg, out_dir, data_info, step=step, model_info=model_info)
        config_path = write_config_toml(cfg, out_dir / "config.toml")
        if tracker is not None:
            tracker.log_artifact(str(config_path))
            for path in diffusers_files:  # artifact pipeline/: model_index.json, model/, scheduler/
                tracker.log_artifact(str(path), "pipeline" if path.is_file() else f"pipeline/{path.name}")
    accelerator.wait_for_everyone()
    steps_run = step - start_step
    run_time = max(time.perf_counter() - run_start - run_paused, 1e-9)
    final_loss = torch.stack(list(recent)).mean().item() if recent else float((ckpt or {}).get("loss", float("nan")))
    return TrainResult(out_dir=out_dir, step=step, checkpoint=Path(last_ckpt), ema_path=ema_path,
                       final_loss=final_loss, wall_time_s=time.time() - wall_start,
                       images_per_s=steps_run * images_per_step / run_time if steps_run else 0.0,
                       model_info=model_info, data_info=data_info, ema_model=ema.module if main else None)
