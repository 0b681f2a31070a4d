"""Classifier-free guidance as a model function the samplers can call like the plain model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..errors import UserError


def guided_model_fn(
    model: torch.nn.Module, cfg_scale: float = 1.0, guidance_channels: int | None = None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """fn(x, t, y) -> model output, guided with scale `cfg_scale`.

    cfg_scale == 1: the plain model(x, t, y). Otherwise the batch is doubled to [x; x] with labels
    [y; null] (null = model.config.num_classes, the label embedder's extra row) and the model's
    `forward_with_cfg` returns uncond + s * (cond - uncond) on the first `guidance_channels` channels
    (all input channels when None; 3 reproduces the reference's DiT legacy); the first half is returned.
    """
    if not (math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise UserError(f"cfg_scale must be a number >= 0 (1 = no guidance), got {cfg_scale}")
    # Checked whatever the scale, so that a wrong setting fails on a scale-1 test run, not later.
    in_channels = getattr(getattr(model, "config", None), "in_channels", None)
    if guidance_channels is not None and in_channels is not None and not 1 <= guidance_channels <= int(in_channels):
        raise UserError(
            f"guidance_channels must be between 1 and {in_channels} (None = all), got {guidance_channels}"
        )
    if cfg_scale == 1.0:

        def plain(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, t, y)

        return plain

    if not hasattr(model, "forward_with_cfg"):
        raise UserError(
            f"{type(model).__name__} has no forward_with_cfg: it cannot use classifier-free guidance"
        )
    null_label = int(model.config.num_classes)

    def guided(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        x2 = torch.cat([x, x], dim=0)  # (2B, C, H, W): conditional half, then unconditional half
        t2 = torch.cat([t, t], dim=0)
        y2 = torch.cat([y, torch.full_like(y, null_label)], dim=0)
        out = model.forward_with_cfg(x2, t2, y2, cfg_scale, guidance_channels)
        return out[:B]

    return guided
