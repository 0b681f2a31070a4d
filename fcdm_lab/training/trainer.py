"""The training loop: one `train(cfg, out_dir)` for a laptop CPU, one GPU or many (accelerate).

    result = train(load_experiment("tiny-digits"), "runs/tiny")          # plain python: 1 process
    accelerate launch -m fcdm_lab train fcdm-s-imagenet256 ...           # N processes (DDP)

The recipe is DiT's (AdamW, constant lr, EMA, label dropout inside the model), driven by an
`ExperimentConfig`. Determinism is part of the design, so that ablations are *paired*: with the same
`train.seed`, two runs see the same data order (`ResumableSampler`) and the same diffusion timesteps
and noise (a generator seeded from (seed, process index)), whatever the model. A run killed at any
moment and resumed with `resume="latest"` ends bit-identical to an uninterrupted one (on CPU, where
kernels are deterministic): the checkpoint holds the `TrainingState` and every random stream.

This module is the loop only. What a training writes besides checkpoints (config.toml, sample grids,
the final model) and what it reports (tracking, held-out losses) are hooks (training/hooks.py).
"""
from __future__ import annotations

import collections
import contextlib
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

import torch
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from ..accel import configure_tf32
from ..config import ExperimentConfig
from ..data.build import build_dataset
from ..diffusion import create_objective
from ..errors import UserError
from ..fileio import check_output_dir
from ..models.build import build_model
from ..models.info import data_config
from ..progress import StepProgress
from ..rng import all_gather, derive_seed, rng_state, seed_streams, set_rng_state
from ..signals import StopRequest, ignore_in_worker, stop_on_signals
from . import state as ckpt_io
from .components import LogWindow, ResumableSampler, ema_multi_avg_fn, lr_at, make_accelerator, micro_batch
from .hooks import TrainHook, TrainingRun, default_hooks
from .preflight import check_model_memory, run_folder_lock
from .state import TrainingState


@dataclass
class TrainResult:
    out_dir: Path
    step: int                  # optimizer steps done in total
    checkpoint: Path           # the final checkpoint
    model_dir: Path | None     # the EMA model in diffusers layout (out_dir/model), None if not exported
    final_loss: float          # mean loss over the last `log_every` steps (nan if none ran)
    wall_time_s: float         # the whole call, setup included
    images_per_s: float        # training throughput of this call (checkpoints, sampling, hooks excluded)
    model_info: dict
    data_info: dict
    ema_model: Any = None      # the in-memory EMA network (main process), evaluated without a reload


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


def train(cfg: ExperimentConfig, out_dir: str | os.PathLike, *, resume: str | None = None,
          hooks: Sequence[TrainHook] | None = None, progress: bool = True, max_steps: int | None = None
          ) -> TrainResult:
    """Train `cfg` into `out_dir` (checkpoints/; with the default hooks also config.toml, samples/ and
    the EMA model in diffusers layout).

    resume: None (fresh; refused if out_dir already has checkpoints), "latest" (the newest valid
    checkpoint in out_dir), a checkpoint path or a run folder. max_steps: stop once this many steps
    are done in total (<= cfg.train.steps; the schedule and config stay those of cfg, so a later
    resume continues). hooks: what the run does besides training (default: hooks.default_hooks()).

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
        return _train(cfg, Path(out_dir), stop, resume=resume, progress=progress, max_steps=max_steps,
                      hooks=list(default_hooks() if hooks is None else hooks))


def _train(cfg: ExperimentConfig, out_dir: Path, stop: StopRequest, *, resume: str | None, progress: bool,
           max_steps: int | None, hooks: List[TrainHook]) -> TrainResult:
    wall_start, tcfg = time.time(), cfg.train
    if tcfg.threads is not None:
        torch.set_num_threads(tcfg.threads)
    configure_tf32(tcfg.tf32)
    accelerator = make_accelerator(cfg)
    world, rank, main, device = (accelerator.num_processes, accelerator.process_index, accelerator.is_main_process,
                                 accelerator.device)
    micro = micro_batch(cfg, world)
    end_step = tcfg.steps if max_steps is None else min(tcfg.steps, max_steps)
    if end_step < 1:
        raise UserError(f"max_steps must be >= 1, got {max_steps}")
    if main:
        ckpt_io.remove_stale_temporaries(out_dir)
    ckpt_path, ckpt = ckpt_io.resume_source(out_dir, resume)

    # ---- data, model, objective, optimizer (identical init on every process: seeded before building)
    dataset, data_info = build_dataset(data_config(cfg), "train")
    check_model_memory(cfg.model, data_info, device)  # on the meta device, before allocating
    torch.manual_seed(tcfg.seed)
    model, model_info = build_model(cfg.model, input_size=data_info["image_size"],
                                    in_channels=data_info["channels"], num_classes=data_info["num_classes"])
    model.to(device).train()
    d = cfg.diffusion
    objective = create_objective(d.objective, num_timesteps=d.num_timesteps, beta_start=d.beta_start,
                                 beta_end=d.beta_end, learn_sigma=cfg.model.learn_sigma, time_scale=d.time_scale)
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(tcfg.ema_decay, tcfg.ema_warmup,
                                                             count=lambda: int(ema.n_averaged)))
    ema.update_parameters(model)  # the EMA starts as a copy of the initial weights (DiT)
    ema.module.eval().requires_grad_(False)
    fused = tcfg.fused_adamw and device.type in ("cpu", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                            fused=True if fused else None)
    state = TrainingState(model, ema, opt, accelerator.scaler)
    if ckpt is not None:
        ckpt_io.check_compatible(ckpt, model_info, data_info, ckpt_path)
        state.load(ckpt)
    start_step = state.step
    if tcfg.compile:
        # Regional compilation (diffusers): each repeated block is compiled once and reused, so the
        # adaLN blocks compile in seconds instead of the whole U-shape in minutes; speed is the same.
        # compile_mode "reduce-overhead" captures each block in CUDA graphs (launch-bound small models).
        model.compile_repeated_blocks(**({} if tcfg.compile_mode == "default" else {"mode": tcfg.compile_mode}))
    train_model, opt = accelerator.prepare(model, opt)

    # ---- the data stream and the random streams (restored last: building the above draws from them)
    sampler = ResumableSampler(len(dataset), tcfg.seed, start=state.data_pos, rank=rank, world=world)
    workers = cfg.data.num_workers
    # Pinned host memory makes the copies in the loop asynchronous; workers prefetch two batches each.
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, num_workers=workers, worker_init_fn=ignore_in_worker,
                        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
                        generator=torch.Generator().manual_seed(derive_seed(tcfg.seed, rank, state.data_pos, 4)))
    batches = iter(loader)
    noise_gen = seed_streams(tcfg.seed, rank, device)
    if ckpt is not None:
        if len(ckpt["rng"]) == world:
            set_rng_state(ckpt["rng"][rank], noise_gen)
        else:  # the data order still continues exactly; only the noise streams restart
            warnings.warn(f"checkpoint written by {len(ckpt['rng'])} processes, resumed by {world}: "
                          f"noise and label-dropout streams are re-seeded", stacklevel=2)
            noise_gen = seed_streams(tcfg.seed, rank, device, start_step)

    run = TrainingRun(cfg, out_dir, accelerator, main, world, device, state, objective, model_info, data_info,
                      start_step, end_step, last_checkpoint=ckpt_path)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    for hook in hooks:
        hook.on_start(run)

    def save_checkpoint(loss: float) -> Path:
        """Collective: gathers every process's RNG state; only the main process writes."""
        rng = all_gather(rng_state(noise_gen)) if world > 1 else [rng_state(noise_gen)]
        path = ckpt_io.checkpoint_path(out_dir, state.step)
        if main:
            state.save(path, config=cfg.to_dict(), model_info=model_info, data_info=data_info, rng=rng,
                       world_size=world, loss=loss)
            ckpt_io.prune_checkpoints(out_dir, tcfg.keep_last)
        accelerator.wait_for_everyone()
        run.last_checkpoint = path
        for hook in hooks:
            hook.on_checkpoint(run, path)
        return path

    # ---- the loop. No host synchronisation per step (on a GPU it would stall the queue of kernels):
    # losses stay on the device and are read at logging steps and before every checkpoint, where a
    # non-finite loss stops the run naming its first bad step, so a bad step never reaches a checkpoint.
    bar = StepProgress(progress and main, end_step, start_step, cfg.name)
    if ckpt_path is not None:
        bar.print(f"resumed from {ckpt_path} at step {start_step}")
    recent: collections.deque[torch.Tensor] = collections.deque(maxlen=tcfg.log_every)
    unchecked: list[torch.Tensor] = []  # step losses since the last finiteness check
    window = LogWindow()
    run_start, run_paused, stats = time.perf_counter(), 0.0, ""

    def check_finite() -> None:
        """Collective: every process learns whether any process saw a non-finite loss."""
        losses = accelerator.reduce(torch.stack(unchecked), "sum") if world > 1 else torch.stack(unchecked)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = state.step - len(unchecked) + int(bad[0]) + 1
            last = run.last_checkpoint
            good = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(f"training diverged: loss is {float(losses[int(bad[0])])} at step {first} "
                                   f"(lr {lr_at(first - 1, tcfg.lr, tcfg.warmup_steps):g}); {good}; "
                                   f"lower train.lr or set train.grad_clip, then resume")
        unchecked.clear()

    try:
        while state.step < end_step:
            lr = lr_at(state.step, tcfg.lr, tcfg.warmup_steps)
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
            state.step += 1
            state.data_pos += tcfg.batch_size
            recent.append(step_loss)
            unchecked.append(step_loss)
            window.images += tcfg.batch_size

            log_now = state.step % tcfg.log_every == 0 or state.step == end_step
            ckpt_now = state.step % tcfg.ckpt_every == 0 or state.step == end_step
            if log_now or ckpt_now:
                check_finite()
            if log_now:
                metrics = window.metrics(accelerator, lr)
                stats = f"loss {metrics['loss']:.4f}  {metrics['images_per_s']:.0f} img/s"
                for hook in hooks:
                    hook.on_log(run, metrics)
                bar.log(state.step, metrics)
                window = LogWindow()
            bar.update(stats)
            paused = time.perf_counter()
            if ckpt_now:
                save_checkpoint(torch.stack(list(recent)).mean().item())
            for hook in hooks:
                hook.on_step(run)
            pause = time.perf_counter() - paused
            window.paused += pause
            run_paused += pause
            if state.step < end_step and stop.agree(state.step, world, accelerator):  # a signal: save, then stop
                if not ckpt_now:
                    if unchecked:
                        check_finite()
                    save_checkpoint(torch.stack(list(recent)).mean().item())
                raise stop.interrupted(f"at step {state.step} of {end_step}; checkpoint {run.last_checkpoint}",
                                       checkpoint=run.last_checkpoint, out_dir=out_dir, step=state.step)
    finally:
        bar.stop()
        del batches  # stops DataLoader workers

    for hook in hooks:
        hook.on_end(run)
    accelerator.wait_for_everyone()
    steps_run = state.step - start_step
    run_time = max(time.perf_counter() - run_start - run_paused, 1e-9)
    final_loss = torch.stack(list(recent)).mean().item() if recent else float((ckpt or {}).get("loss", float("nan")))
    model_dir = next((p for p in run.exported if p.name == "model"), None)
    return TrainResult(out_dir=out_dir, step=state.step, checkpoint=Path(run.last_checkpoint), model_dir=model_dir,
                       final_loss=final_loss, wall_time_s=time.time() - wall_start,
                       images_per_s=steps_run * tcfg.batch_size / run_time if steps_run else 0.0,
                       model_info=model_info, data_info=data_info, ema_model=ema.module if main else None)


__all__ = ["TrainResult", "TrainingDiverged", "train"]
