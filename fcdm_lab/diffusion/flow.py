"""Flow matching with the linear interpolant (SiT's "Linear" path, velocity prediction).

x_t = t * x1 + (1 - t) * x0 with x0 ~ N(0, I) noise and x1 the data, t ~ U(0, 1); the model
regresses the velocity x1 - x0. The model is told t * time_scale: 1 (the default) gives it t in
[0, 1] as the reference implementation and SiT do; 1000 matches the 0..1000 range the DDPM models'
sinusoidal timestep embedder sees (a named setting, `diffusion.time_scale`). A model with learned
sigma outputs 2C channels; only the first C are the velocity.

Samplers, from t = 0 (noise) to t = 1 (data):
- "euler", "heun": the probability-flow ODE dx/dt = v(x, t) in equal steps (deterministic);
- "sde": the reference's sampler (SiT's `sample_sde` defaults): Euler-Maruyama on
  dx = [v + w(t) * score] dt + sqrt(2 w(t)) dW with w(t) = 1 - t (diffusion form "sigma"), on a
  grid of `steps` points from 0 to 1 - 0.04, then a last noise-free ("Mean") step of 0.04 to t = 1;
  `steps` model calls in all (250 for the paper). For the linear path the score is
  (t v - x) / (1 - t), so the drift simplifies to (1 + t) v - x.

Hand-written (a few lines of arithmetic): diffusers' FlowMatchEulerDiscreteScheduler runs time the
other way (sigma from 1 to 0, velocity = noise - data, SD3's convention), has no training side and no
SiT-style SDE; restating SiT's convention directly is shorter and clearer than adapting it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import UserError
from ..progress import track
from .gaussian import ModelFn, initial_noise, mean_flat, resolve_sampler


class FlowMatching:
    """The flow-matching objective (the `Objective` interface of fcdm_lab.diffusion)."""

    name = "flow"
    samplers: tuple[str, ...] = ("euler", "heun", "sde")
    default_steps = 50
    sde_default_steps = 250
    sde_last_step = 0.04  # SiT's last_step_size: the final noise-free step to t = 1

    def __init__(self, time_scale: float = 1.0, default_sampler: str = "euler"):
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise UserError(f"time_scale must be a positive number, got {time_scale}")
        self.time_scale = float(time_scale)
        self.default_sampler = resolve_sampler(default_sampler, self.samplers, "euler")

    def steps_for(self, sampler: str | None) -> int:
        """The default step count of a sampler (None = the default sampler)."""
        sampler = resolve_sampler(sampler, self.samplers, self.default_sampler)
        return self.sde_default_steps if sampler == "sde" else self.default_steps

    @staticmethod
    def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target velocity) for noise x0, data x1 and t of shape (B,)."""
        t_ = t.reshape(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
        return t_ * x1 + (1 - t_) * x0, x1 - x0

    def velocity(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The model's velocity at x and t in [0, 1] (shape (B,)): the first C output channels."""
        out = model_fn(x, t * self.time_scale, **(model_kwargs or {}))
        C = x.shape[1]
        if out.shape[1] not in (C, 2 * C) or out.shape[2:] != x.shape[2:]:
            raise UserError(
                f"model output {tuple(out.shape)} does not fit input {tuple(x.shape)}: "
                f"flow needs {C} or {2 * C} channels"
            )
        return out[:, :C]

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Velocity MSE at t ~ U(0, 1); t then the noise are drawn from `generator`, in that order.

        Returns (B,) tensors "loss" (= "mse") and "t_frac" (= t).
        """
        B = x_start.shape[0]
        t = torch.rand(B, generator=generator, device=x_start.device)
        x0 = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t, target = self.interpolate(x0, x_start, t)
        mse = mean_flat((self.velocity(model_fn, x_t, t, model_kwargs) - target) ** 2)
        return {"loss": mse, "mse": mse, "t_frac": t}

    @torch.no_grad()
    def integrate(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        *,
        sampler: str = "euler",
        steps: int = 50,
        model_kwargs: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate dx/dt = v(x, t) from t = 0 to 1 in `steps` equal steps (Heun: 2 model calls a step)."""
        sampler = resolve_sampler(sampler, self.samplers, self.default_sampler)
        times = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64).tolist()
        B = x.shape[0]

        def v(x_: torch.Tensor, t: float) -> torch.Tensor:
            return self.velocity(
                model_fn, x_, torch.full((B,), t, device=x.device, dtype=torch.float32), model_kwargs
            )

        if sampler == "sde":
            raise UserError("integrate() solves the ODE (euler, heun); the sde sampler is sample_sde()")
        for i in track(range(steps), progress, f"{sampler} sampling", steps):
            t0, t1 = times[i], times[i + 1]
            dt = t1 - t0
            v0 = v(x, t0)
            if sampler == "euler":
                x = x + dt * v0
            else:
                x_pred = x + dt * v0
                x = x + 0.5 * dt * (v0 + v(x_pred, t1))
        return x

    @torch.no_grad()
    def sample_sde(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        *,
        steps: int = 250,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """The reference's SDE sampler from noise x (see the module docstring): steps - 1
        Euler-Maruyama steps on linspace(0, 1 - 0.04, steps), then the mean step of 0.04.
        Each stochastic step draws its noise from `generator`."""
        if steps < 2:
            raise UserError(f"the sde sampler needs steps >= 2 (one stochastic and the last step), got {steps}")
        t_end = 1.0 - self.sde_last_step
        times = torch.linspace(0.0, t_end, steps, dtype=torch.float64).tolist()
        dt = t_end / (steps - 1)
        B = x.shape[0]

        def drift(x_: torch.Tensor, t: float) -> torch.Tensor:
            v = self.velocity(model_fn, x_, torch.full((B,), t, device=x.device, dtype=torch.float32),
                              model_kwargs)
            return (1.0 + t) * v - x_  # v + w(t) * score, w = 1 - t, score = (t v - x) / (1 - t)

        for t in track(times[:-1], progress, "sde sampling", steps - 1):
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + drift(x, t) * dt + math.sqrt(2.0 * (1.0 - t) * dt) * noise
        return x + drift(x, t_end) * self.sde_last_step

    def sample(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        *,
        sampler: str | None = None,
        steps: int | str | None = None,
        eta: float = 0.0,
        noise: torch.Tensor | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        clip_denoised: bool = False,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Samples of `shape` from noise (drawn from `generator` unless given).

        sampler "euler" (the default unless the objective was made with another), "heun" (ODE, default
        50 steps) or "sde" (the reference's, default 250 steps; its noise comes from `generator`).
        eta is a DDIM setting and must be 0. clip_denoised=True clamps the final sample to [-1, 1]
        (the flow has no per-step x_0 to clip).
        """
        sampler = resolve_sampler(sampler, self.samplers, self.default_sampler)
        if eta != 0.0:
            raise UserError(
                f"eta is a DDIM setting; the flow samplers ({', '.join(self.samplers)}) take no eta"
            )
        steps = self.steps_for(sampler) if steps is None else steps
        if isinstance(steps, str) and steps.strip().isdigit():
            steps = int(steps)  # a count typed on the command line
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise UserError(f"steps must be a positive integer for the flow objective, got {steps!r}")
        steps = int(steps)
        x = initial_noise(shape, noise, generator, device, model_fn)
        if sampler == "sde":
            x = self.sample_sde(model_fn, x, steps=steps, model_kwargs=model_kwargs, generator=generator,
                                progress=progress)
        else:
            x = self.integrate(
                model_fn, x, sampler=sampler, steps=steps, model_kwargs=model_kwargs, progress=progress
            )
        return x.clamp(-1, 1) if clip_denoised else x
