"""Layers and model mixins shared by every model family (FCDM, DiT, DiCo).

Names follow DiT's `models.py` (`mlp.0`, `mlp.2`, `embedding_table`) so that reference checkpoints
of all three families load with `strict=True`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


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


class LabelDropout(nn.Module):
    """Label dropout for classifier-free guidance, the part every label embedder shares: in training
    each sample's label becomes the null class (index `num_classes`) with probability `dropout_prob`.
    A table needs `table_rows` rows: num_classes + 1 when dropout is used (the null row)."""

    def __init__(self, num_classes: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def table_rows(self) -> int:
        return self.num_classes + (self.dropout_prob > 0)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def drop(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The labels to embed: dropped in training (or where `force_drop_ids` == 1), else unchanged."""
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return labels


class LabelEmbedder(LabelDropout):
    """Class labels -> vectors, with label dropout for classifier-free guidance (row `num_classes`
    of the table is the null class)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__(num_classes, dropout_prob)
        self.embedding_table = nn.Embedding(self.table_rows, hidden_size)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        return self.embedding_table(self.drop(labels, train, force_drop_ids))


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, c: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """x through `blk(x, c)` for each block in turn; with `checkpointing` (a model's gradient
    checkpointing flag, in training) and gradients on, each block's activations are recomputed in
    backward (non-reentrant checkpointing) instead of stored."""
    checkpointing = checkpointing and torch.is_grad_enabled()
    for blk in blocks:
        x = checkpoint(blk, x, c, use_reentrant=False) if checkpointing else blk(x, c)
    return x


def pixel_unshuffle_down(c_in: int, c_out: int) -> nn.Sequential:
    """2x downsampling of the U-shapes: 3x3 conv (no bias) to c_out/4 channels, then PixelUnshuffle(2):
    (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out // 4, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


def pixel_shuffle_up(c_in: int, c_out: int) -> nn.Sequential:
    """2x upsampling of the U-shapes: 3x3 conv (no bias) to 4*c_out channels, then PixelShuffle(2):
    (B, c_in, H, W) -> (B, c_out, 2H, 2W)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out * 4, 3, padding=1, bias=False), nn.PixelShuffle(2))


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


MODEL_SUBFOLDER = "model"  # where the model lives inside a pipeline / run folder


class PretrainedMixin:
    """diffusers-native loading (`FCDM.from_pretrained(folder)`), put first in a model's bases
    (before diffusers' ModelMixin): also accepts a run or pipeline folder (its `model/`), and puts the
    weights back into the memory layout the model trains and samples fastest in (diffusers loads
    every tensor contiguous, which silently undoes FCDM's channels_last weights)."""

    weights_memory_format = torch.contiguous_format  # FCDM overrides: channels_last

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        folder = Path(os.fspath(pretrained_model_name_or_path))
        if "subfolder" not in kwargs and folder.is_dir() and not (folder / "config.json").is_file() \
                and (folder / MODEL_SUBFOLDER / "config.json").is_file():
            kwargs["subfolder"] = MODEL_SUBFOLDER  # a run or pipeline folder: its model
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return model.to(memory_format=cls.weights_memory_format)
