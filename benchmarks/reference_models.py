"""FCDM in the REFERENCE layout, for timing the paper's protocol side by side with fcdm-lab's model.

Written for fcdm-lab from the layout described in the facts file (sections 2, 3, 10) and from reading
the public reference's behaviour; no code is taken from it. What makes it "the reference layout" is
how the tensors flow, because that decides which kernels a GPU runs:

  - activations stay NCHW (no channels_last conversion of the weights or of the input);
  - every 1x1 projection is an `nn.Conv2d` (cuDNN convolution; under PyTorch's defaults those run in
    TF32 while `nn.Linear`/`F.linear` matmuls run in full FP32, facts section 15);
  - LayerNorm over channels is `F.layer_norm` between two permutes, then adaLN modulation with
    `torch.addcmul(shift, h, 1 + scale)` on (B, C, 1, 1) vectors;
  - GRN takes `torch.norm` over (H, W) of the NCHW map;
  - gate by multiplication, residual by addition; the final layer's modulation as x*(1+scale)+shift;
  - the reference wraps every block in non-reentrant gradient checkpointing, even for inference.
    Here `checkpointing` chooses: "always" (as shipped), "train" (only when training with grad),
    or "off" (the default: the paper protocol times inference, training benchmarks time without).

Parameter names and shapes are the reference's (facts section 10), which are also fcdm-lab's, so
`RefFCDM.load_state_dict(fcdm_lab_model.state_dict())` works and both compute the same function
(tests/test_gpu_bench.py checks it).

`label(name)` marks regions for the per-op profile of benchmarks/gpu.py (a no-op unless
`LABELS_ON` is set by the profiler section).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LABELS_ON = False  # benchmarks/gpu.py's profile section turns record_function labels on


def label(name: str):
    if LABELS_ON:
        return torch.profiler.record_function(f"fcdm_bench::{name}")
    return contextlib.nullcontext()


def norm_channels(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over the channels of an NCHW map, through two permutes."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=1e-6).permute(0, 3, 1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (256: cos half, then sin half) -> Linear -> SiLU -> Linear."""

    def __init__(self, width: int, n_freq: int = 256):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.n_freq // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        phase = t.float()[:, None] * torch.exp(k * (-math.log(10000.0) / half))[None]
        return self.mlp(torch.cat([phase.cos(), phase.sin()], dim=1))


class LabelEmbedder(nn.Module):
    """Class table with one extra "null" row; in training each embedder drops labels on its own draw."""

    def __init__(self, num_classes: int, width: int, p_drop: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (p_drop > 0), width)
        self.num_classes, self.p_drop = num_classes, p_drop

    def forward(self, y: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.p_drop > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.p_drop
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class GRN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        g = torch.norm(x, p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class RefBlock(nn.Module):
    """7x7 depthwise -> LN + adaLN -> 1x1 conv up (r=3) -> GELU -> GRN -> 1x1 conv down -> gate, add."""

    def __init__(self, dim: int, ratio: int = 3, kernel: int = 7):
        super().__init__()
        hidden = ratio * dim
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.pwconv1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.pwconv2 = nn.Conv2d(hidden, dim, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c)[:, :, None, None]           # (B, 3C, 1, 1)
        shift, scale, gate = mod.chunk(3, dim=1)
        h = self.dwconv(x)
        with label("norm_mod"):
            h = torch.addcmul(shift, norm_channels(h), scale + 1)
        h = self.pwconv2(self.grn(self.act(self.pwconv1(h))))
        return x + h * gate


class Resample(nn.Module):
    """3x3 conv (no bias) then Pixel(Un)Shuffle(2): down to c_out/4 channels, or up to 4*c_out."""

    def __init__(self, c_in: int, c_out: int, down: bool):
        super().__init__()
        shuffle = nn.PixelUnshuffle(2) if down else nn.PixelShuffle(2)
        self.conv = nn.Sequential(nn.Conv2d(c_in, c_out // 4 if down else 4 * c_out, 3, padding=1, bias=False), shuffle)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class RefFinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.conv = nn.Conv2d(dim, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        with label("norm_mod"):
            x = norm_channels(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return self.conv(x)


CHECKPOINTING = ("always", "train", "off")


class RefFCDM(nn.Module):
    """The reference FCDM U-shape: widths C, 2C, 4C, 2C, C with L, 2L, 4L, 2L, L blocks."""

    _repeated_blocks = ["RefBlock"]  # for regional compilation, as fcdm-lab's models declare

    def __init__(self, L: int = 3, C: int = 512, in_channels: int = 4, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1, learn_sigma: bool = True, checkpointing: str = "off"):
        super().__init__()
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
        self.checkpointing = checkpointing
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        widths = (C, 2 * C, 4 * C)
        for i, w in enumerate(widths, start=1):
            self.add_module(f"t_embedder_{i}", TimestepEmbedder(w))
            self.add_module(f"y_embedder_{i}", LabelEmbedder(num_classes, w, class_dropout_prob))
        self.x_embedder = nn.Conv2d(in_channels, C, 3, padding=1)
        self.encoder_level_1 = nn.ModuleList(RefBlock(C) for _ in range(L))
        self.down1_2 = Resample(C, 2 * C, down=True)
        self.encoder_level_2 = nn.ModuleList(RefBlock(2 * C) for _ in range(2 * L))
        self.down2_3 = Resample(2 * C, 4 * C, down=True)
        self.latent = nn.ModuleList(RefBlock(4 * C) for _ in range(4 * L))
        self.up3_2 = Resample(4 * C, 2 * C, down=False)
        self.reduce_chans_2 = nn.Conv2d(4 * C, 2 * C, 1)
        self.decoder_level_2 = nn.ModuleList(RefBlock(2 * C) for _ in range(2 * L))
        self.up2_1 = Resample(2 * C, C, down=False)
        self.reduce_chans_1 = nn.Conv2d(2 * C, C, 1)
        self.decoder_level_1 = nn.ModuleList(RefBlock(C) for _ in range(L))
        self.output_layer = nn.Conv2d(C, C, 3, padding=1)
        self.final_layer = RefFinalLayer(C, self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reference initialisation (facts section 2): xavier everywhere, zero adaLN and output."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i in (1, 2, 3):
            nn.init.normal_(getattr(self, f"y_embedder_{i}").embedding_table.weight, std=0.02)
            for j in (0, 2):
                nn.init.normal_(getattr(self, f"t_embedder_{i}").mlp[j].weight, std=0.02)
        for m in self.modules():
            if isinstance(m, (RefBlock, RefFinalLayer)):
                nn.init.zeros_(m.adaLN_modulation[1].weight)
                nn.init.zeros_(m.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.conv.weight)
        nn.init.zeros_(self.final_layer.conv.bias)

    def _level(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        wrap = self.checkpointing == "always" or (
            self.checkpointing == "train" and self.training and torch.is_grad_enabled())
        for blk in blocks:
            x = checkpoint(blk, x, c, use_reentrant=False) if wrap else blk(x, c)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c1, c2, c3 = (getattr(self, f"t_embedder_{i}")(t) + getattr(self, f"y_embedder_{i}")(y, self.training)
                      for i in (1, 2, 3))
        e1 = self._level(self.encoder_level_1, self.x_embedder(x), c1)
        e2 = self._level(self.encoder_level_2, self.down1_2(e1), c2)
        m = self._level(self.latent, self.down2_3(e2), c3)
        d2 = self._level(self.decoder_level_2, self.reduce_chans_2(torch.cat([self.up3_2(m), e2], dim=1)), c2)
        d1 = self._level(self.decoder_level_1, self.reduce_chans_1(torch.cat([self.up2_1(d2), e1], dim=1)), c1)
        return self.final_layer(self.output_layer(d1), c1)
