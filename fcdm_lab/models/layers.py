"""Layers shared by every model family (FCDM, DiT, DiCo).

Names follow DiT's `models.py` (`mlp.0`, `mlp.2`, `embedding_table`) so that reference checkpoints
of all three families load with `strict=True`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation for channels-first maps: x (B, C, H, W), shift/scale (B, C)."""
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features of size 256, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        # As in GLIDE/ADM/DiT: [cos, sin] of t times geometric frequencies.
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with label dropout for classifier-free guidance.

    The table has num_classes + 1 rows when dropout is used: row `num_classes` is the null class.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class GuidedModelMixin:
    """The classifier-free-guidance path shared by every family (DiT's `forward_with_cfg`).

    The batch holds a conditional first half and an unconditional second half (labels =
    `num_classes`, the null class). Guidance is applied to every output channel of the noise
    prediction by default; `guidance_channels=3` reproduces the reference's DiT legacy behaviour.
    """

    def forward_with_cfg(self, x, t, y, cfg_scale: float, guidance_channels: int | None = None):
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self(combined, t, y)
        gc = self.config.in_channels if guidance_channels is None else guidance_channels
        eps, rest = model_out[:, :gc], model_out[:, gc:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)
