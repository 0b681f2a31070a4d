"""Side effects of a training, attached to the loop as hooks (lightning-hydra-template's callbacks):
the run folder's files, sample grids, and (fcdm_lab/runner.py) tracking and held-out losses.

    train(cfg, out_dir, hooks=[RunFiles(), SampleGrids(log_image=...), MyHook()])

Every hook method is called on every process of a distributed run (collectives need them all); a
hook that writes or logs does so on `run.main` only. Time spent in `on_step` and `on_checkpoint`
is not counted in the training's images/s.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from ..config import config_to_toml
from ..diffusers_pipeline import save_run_pipeline
from ..errors import UserError
from ..fileio import atomic_write_text
from ..inference.generation import generate, grid_labels, load_vae_for
from ..inference.samples import save_grid
from ..rng import all_gather
from .state import TrainingState


@dataclasses.dataclass
class TrainingRun:
    """What hooks see of a training: its settings, where it writes, the live state, its position."""

    cfg: Any                                 # ExperimentConfig
    out_dir: Path
    accelerator: Any
    main: bool                               # the process that writes and logs
    world: int
    device: torch.device
    state: TrainingState                     # model, EMA, optimizer, step, data position
    objective: Any                           # the diffusion objective (training losses, samplers)
    model_info: dict
    data_info: dict
    start_step: int
    end_step: int
    last_checkpoint: Optional[Path] = None
    exported: List[Path] = dataclasses.field(default_factory=list)   # what RunFiles wrote at the end

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def ema_model(self) -> torch.nn.Module:
        return self.state.ema.module


class TrainHook:
    """Base class: override what you need."""

    def on_start(self, run: TrainingRun) -> None:
        """After the model, data and random streams are set up (resumed), before the first step."""

    def on_step(self, run: TrainingRun) -> None:
        """After every optimizer step."""

    def on_log(self, run: TrainingRun, metrics: dict) -> None:
        """At a log step, with the window's metrics (loss, loss_q1..4, lr, images_per_s, ...)."""

    def on_checkpoint(self, run: TrainingRun, path: Path) -> None:
        """After a checkpoint was written (by the main process; every process gets the call)."""

    def on_end(self, run: TrainingRun) -> None:
        """After the last step (also when a resumed run had nothing left to do)."""


class RunFiles(TrainHook):
    """The run folder's files: config.toml (the resolved config) at the start, and at the end the EMA
    model in its one format, the diffusers folder (model_index.json, model/ with fcdm_lab.json,
    scheduler/): `run.exported` lists what was written."""

    def on_start(self, run: TrainingRun) -> None:
        if run.main:
            atomic_write_text(run.out_dir / "config.toml", config_to_toml(run.cfg))

    def on_end(self, run: TrainingRun) -> None:
        if run.main:
            run.exported = save_run_pipeline(run.ema_model, run.cfg, run.out_dir, run.data_info, step=run.step,
                                             model_info=run.model_info)


class SampleGrids(TrainHook):
    """A grid of the EMA model's samples every `train.sample_every` steps and at the last step
    (fixed labels and noise seeded by train.seed, the [eval] sampler): samples/step_NNNNNNN.png,
    and `log_image(grid, "samples", step)` when given (the tracker's stepped image series).

    At the start it samples two steps once, so that a wrong [eval] setting fails before hours of
    training rather than at the first grid."""

    def __init__(self, log_image: Callable[[Any, str, int], None] | None = None):
        self.log_image = log_image
        self.labels = self.vae = self.vae_scale = None

    def _sample(self, run: TrainingRun, **overrides) -> torch.Tensor:
        ev = run.cfg.eval
        settings = dict(sampler=ev.sampler, steps=ev.steps, eta=ev.eta, cfg_scale=ev.cfg_scale,
                        guidance_channels=ev.guidance_channels, seed=run.cfg.train.seed, device=run.device,
                        num=len(self.labels), class_labels=self.labels, batch_size=len(self.labels), progress=False,
                        distributed=False, vae=self.vae, latent_scale=self.vae_scale)
        settings.update(overrides)
        # fork_rng: sampling must not move the training's random streams
        with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
            images, _ = generate(run.ema_model, run.objective, **settings)
        return images

    def on_start(self, run: TrainingRun) -> None:
        problem = None
        if run.main:
            self.labels = grid_labels(run.data_info["num_classes"])
            if run.data_info.get("vae"):
                try:
                    self.vae, self.vae_scale = load_vae_for(run.data_info, None, run.device)
                except UserError as e:
                    import warnings

                    warnings.warn(f"sample grids disabled: {e}", stacklevel=2)
                    self.labels = None
            if self.labels is not None:
                try:
                    self._sample(run, num=1, class_labels=self.labels[:1], batch_size=1, steps=2)
                except UserError as e:
                    problem = str(e)
        if run.world > 1:  # every process must stop, or the others would wait for the main one forever
            problem = next((p for p in all_gather(problem) if p), None)
        if problem:
            raise UserError(f"[eval] settings (used for sample grids): {problem}")

    def on_step(self, run: TrainingRun) -> None:
        every = run.cfg.train.sample_every
        if not ((every > 0 and run.step % every == 0) or run.step == run.end_step):
            return
        if run.main and self.labels is not None:
            grid = save_grid(self._sample(run), run.out_dir / "samples" / f"step_{run.step:07d}.png", nrow=8)
            if self.log_image is not None:
                self.log_image(grid, "samples", run.step)
        run.accelerator.wait_for_everyone()


def default_hooks() -> List[TrainHook]:
    """What every training does: the run folder's files and the sample grids."""
    return [RunFiles(), SampleGrids()]


__all__ = ["RunFiles", "SampleGrids", "TrainHook", "TrainingRun", "default_hooks"]
