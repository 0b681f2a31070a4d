"""FCDM: the fully convolutional diffusion model (a 3-level U-shape of adaLN ConvNeXt blocks).

The whole family is defined by two numbers, blocks per level `L` and base width `C`, plus a block
spec (see `blocks.py`). Module names and shapes follow the reference implementation (facts
section 10), so reference checkpoints load with `strict=True`.

    x (B, in, H, W) -> stem 3x3 -> [L blocks @ C] -> down -> [2L @ 2C] -> down -> [4L @ 4C]
      -> up -> concat skip -> 1x1 -> [2L @ 2C] -> up -> concat skip -> 1x1 -> [L @ C]
      -> 3x3 -> LN + adaLN -> 3x3 -> (B, 2*in, H, W)    (eps and learned variance)
"""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..errors import UserError
from .blocks import Pointwise, build_block, layer_norm_modulate, resolve_block_spec, to_nchw, to_nhwc
from .layers import (GuidedModelMixin, LabelEmbedder, PretrainedMixin, TimestepEmbedder, pixel_shuffle_up,
                     pixel_unshuffle_down, run_blocks)
from .registry import MODELS, register_preset

CL = torch.channels_last


class Downsample(nn.Module):
    """3x3 conv to c_out/4 channels, then PixelUnshuffle(2): (B, c_in, H, W) -> (B, c_out, H/2, W/2)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = pixel_unshuffle_down(c_in, c_out)

    def forward(self, x):
        return self.conv(x).contiguous(memory_format=CL)


class Upsample(nn.Module):
    """3x3 conv to 4*c_out channels, then PixelShuffle(2): (B, c_in, H, W) -> (B, c_out, 2H, 2W)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = pixel_shuffle_up(c_in, c_out)

    def forward(self, x):
        return self.conv(x).contiguous(memory_format=CL)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) + adaLN shift/scale, then a 3x3 conv to the output channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))
        self.conv = nn.Conv2d(dim, out_channels, 3, padding=1)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.conv(to_nchw(layer_norm_modulate(to_nhwc(x), shift, scale)))


class FCDM(PretrainedMixin, ModelMixin, ConfigMixin, GuidedModelMixin):
    """Fully convolutional diffusion model. `L` blocks per level and width `C` (the paper's names)."""

    # diffusers regional compilation (`compile_repeated_blocks`): compile one block, reuse it for all
    _repeated_blocks = ["ConvNeXtBlock", "ResNetBlock"]

    weights_memory_format = CL  # restored by from_pretrained (see pretrained.py)

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        L: int = 2,
        C: int = 128,
        block: Dict[str, Any] | None = None,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        grad_checkpointing: bool = False,
        label_dropout: str = "per_level",
    ):
        super().__init__()
        validate_fcdm_args(input_size, in_channels, num_classes, L, C)
        if label_dropout not in LABEL_DROPOUT:
            raise UserError(f"label_dropout must be one of {', '.join(LABEL_DROPOUT)}, got {label_dropout!r}")
        spec = resolve_block_spec(block)
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grad_checkpointing = grad_checkpointing

        # One timestep and one label embedder per width; condition c_i = t_emb_i + y_emb_i. In training
        # each label embedder drops the label on its own draw ("per_level", the reference's: ~0.1% of
        # samples unconditional at all three levels, ~27% at one or two, for p = 0.1) or all three share
        # one draw ("shared": p unconditional, none partly).
        for i, width in enumerate((C, 2 * C, 4 * C), start=1):
            self.add_module(f"t_embedder_{i}", TimestepEmbedder(width))
            self.add_module(f"y_embedder_{i}", LabelEmbedder(num_classes, width, class_dropout_prob))

        def level(width: int, n: int) -> nn.ModuleList:
            return nn.ModuleList(build_block(width, spec) for _ in range(n))

        self.x_embedder = nn.Conv2d(in_channels, C, 3, padding=1)
        self.encoder_level_1 = level(C, L)
        self.down1_2 = Downsample(C, 2 * C)
        self.encoder_level_2 = level(2 * C, 2 * L)
        self.down2_3 = Downsample(2 * C, 4 * C)
        self.latent = level(4 * C, 4 * L)
        self.up3_2 = Upsample(4 * C, 2 * C)
        self.reduce_chans_2 = Pointwise(4 * C, 2 * C)  # 1x1 convs as GEMMs on the NHWC view
        self.decoder_level_2 = level(2 * C, 2 * L)
        self.up2_1 = Upsample(2 * C, C)
        self.reduce_chans_1 = Pointwise(2 * C, C)
        self.decoder_level_1 = level(C, L)
        self.output_layer = nn.Conv2d(C, C, 3, padding=1)
        self.final_layer = FinalLayer(C, self.out_channels)
        self.initialize_weights()
        self.to(memory_format=CL)

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i in (1, 2, 3):
            nn.init.normal_(getattr(self, f"y_embedder_{i}").embedding_table.weight, std=0.02)
            t_mlp = getattr(self, f"t_embedder_{i}").mlp
            nn.init.normal_(t_mlp[0].weight, std=0.02)
            nn.init.normal_(t_mlp[2].weight, std=0.02)
        # adaLN-zero: every block starts as the identity, and the output starts at zero.
        for m in self.modules():
            if hasattr(m, "adaLN_modulation"):
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.conv.weight)
        nn.init.zeros_(self.final_layer.conv.bias)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return run_blocks(blocks, x, c, self.grad_checkpointing and self.training)

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The conditioning vectors (c1, c2, c3) of the three widths, with label dropout in training."""
        per_level = self.training and self.config.label_dropout == "per_level"
        if self.training and not per_level and self.y_embedder_1.dropout_prob > 0:
            y = self.y_embedder_1.token_drop(y)  # one draw: every level sees the same (possibly null) class
        return tuple(
            getattr(self, f"t_embedder_{i}")(t) + getattr(self, f"y_embedder_{i}")(y, train=per_level)
            for i in (1, 2, 3)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, in, H, W) noisy input, t: (B,) timesteps, y: (B,) labels -> (B, out, H, W)."""
        c1, c2, c3 = self.condition(t, y)
        x = self.x_embedder(x.contiguous(memory_format=CL))
        skip1 = x = self._run(self.encoder_level_1, x, c1)                    # (B, C, H, W)
        skip2 = x = self._run(self.encoder_level_2, self.down1_2(x), c2)      # (B, 2C, H/2, W/2)
        x = self._run(self.latent, self.down2_3(x), c3)                       # (B, 4C, H/4, W/4)
        x = to_nchw(self.reduce_chans_2(to_nhwc(torch.cat([self.up3_2(x), skip2], dim=1))))
        x = self._run(self.decoder_level_2, x, c2)
        x = to_nchw(self.reduce_chans_1(to_nhwc(torch.cat([self.up2_1(x), skip1], dim=1))))
        x = self._run(self.decoder_level_1, x, c1)
        return self.final_layer(self.output_layer(x), c1).contiguous()


# Upper limits: far beyond the paper's models (L 2-3, C 128-512, 32-64 latents), yet small enough that
# building or counting a model never runs for minutes or overflows a storage size.
MAX_L, MAX_C, MAX_INPUT = 64, 16384, 4096


def validate_fcdm_args(input_size: int, in_channels: int, num_classes: int, L: int, C: int) -> None:
    def need(cond: bool, msg: str):
        if not cond:
            raise UserError(msg)

    for name, v in (("input_size", input_size), ("in_channels", in_channels),
                    ("num_classes", num_classes), ("L", L), ("C", C)):
        need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
    need(L >= 1, f"L (blocks per level) must be >= 1, got {L}")
    need(L <= MAX_L, f"L (blocks per level) must be at most {MAX_L} (FCDM-XL has 3), got {L}")
    need(C >= 8 and C % 2 == 0, f"C (width) must be an even integer >= 8, got {C}")
    need(C <= MAX_C, f"C (width) must be at most {MAX_C} (FCDM-XL has 512), got {C}")
    need(input_size >= 4 and input_size % 4 == 0,
         f"input size must be divisible by 4 (two 2x downsamplings), got {input_size}")
    need(input_size <= MAX_INPUT, f"input size must be at most {MAX_INPUT} (a 512x512 image is 64 latents), "
                                  f"got {input_size}")
    need(in_channels >= 1, f"in_channels must be >= 1, got {in_channels}")
    need(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")


LABEL_DROPOUT = ("per_level", "shared")  # model.label_dropout


# Presets (facts section 4). `FCDM` is the open family: give L and C yourself.
FCDM_PRESETS = {"FCDM-S": (2, 128), "FCDM-B": (2, 256), "FCDM-L": (2, 512), "FCDM-XL": (3, 512)}


for _name, (_L, _C) in FCDM_PRESETS.items():
    register_preset(FCDM, _name, "fcdm", fixed=False, L=_L, C=_C)
MODELS.register("FCDM", family="fcdm", L=None, C=None)(FCDM)
