"""Diffusion objectives and samplers, independent of the model family.

`create_objective("ddpm")` is the DiT/ADM recipe (T = 1000 linear betas, epsilon prediction,
learned-range variance, iDDPM hybrid loss, 250-step respaced DDPM or DDIM sampling);
`create_objective("flow")` is linear-interpolant flow matching (SiT) with Euler / Heun ODE samplers
and the reference's Euler-Maruyama SDE sampler ("sde").
Both take any `model_fn(x, t, **model_kwargs) -> (B, C or 2C, H, W)`; `guided_model_fn` wraps a
class-conditional model for classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import UserError, choices
from .flow import FlowMatching
from .gaussian import DDPMObjective, GaussianDiffusion, LossType, ModelFn, VarType, linear_beta_schedule
from .guidance import guided_model_fn
from .respace import respace_betas, space_timesteps

OBJECTIVES = ("ddpm", "flow")


@runtime_checkable
class Objective(Protocol):
    """What the trainer and the sampler CLI use; `DDPMObjective` and `FlowMatching` implement it."""

    name: str
    samplers: tuple[str, ...]
    default_sampler: str

    def training_losses(
        self,
        model_fn: ModelFn,
        x_start: torch.Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample (B,) "loss", "mse", ("vb" for ddpm with learned sigma) and "t_frac" in [0, 1)."""
        ...

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
        """Samples of `shape`, generated without gradients."""
        ...


def create_objective(
    name: str = "ddpm",
    *,
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    learn_sigma: bool = True,
    time_scale: float = 1.0,
    flow_sampler: str = "euler",
) -> Objective:
    """The training objective and its samplers by name (see OBJECTIVES).

    ddpm: linear betas beta_start..beta_end (values for T = 1000; other T scale them by 1000 / T as
    ADM does); learn_sigma=True is DiT's learned-range variance with the hybrid loss (model outputs
    2C channels), False a fixed beta_t variance with plain epsilon MSE (C channels), as DiT.
    flow: the model is told t * time_scale (1 = t in [0, 1], the reference's; 1000 = the DDPM
    range); flow_sampler is its default sampler ("sde" for the reference's checkpoints); the ddpm
    settings are ignored, and a 2C-channel output is accepted (the first C channels are the velocity).
    """
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; choose one of: {choices(OBJECTIVES)}")
    if name == "flow":
        return FlowMatching(time_scale=time_scale, default_sampler=flow_sampler)
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise UserError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    if not 0 < beta_start < beta_end:
        raise UserError(f"need 0 < beta_start < beta_end, got {beta_start} and {beta_end}")
    diffusion = GaussianDiffusion(
        linear_beta_schedule(num_timesteps, beta_start, beta_end),
        var_type=VarType.LEARNED_RANGE if learn_sigma else VarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )
    return DDPMObjective(diffusion)


__all__ = [
    "OBJECTIVES",
    "DDPMObjective",
    "FlowMatching",
    "GaussianDiffusion",
    "LossType",
    "Objective",
    "VarType",
    "create_objective",
    "guided_model_fn",
    "linear_beta_schedule",
    "respace_betas",
    "space_timesteps",
]
