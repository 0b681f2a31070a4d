"""DiCo: the convolutional baseline ("Revitalizing ConvNets for Scalable and Efficient Diffusion
Modeling", public code shallowdream204/DiCo `dico_models.py`).

Same layout and state-dict names as the reference (`x_embedder.proj`, `t_embedder_{1,2,3}`,
`y_embedder.embedding_table_{0,1,2}`, `encoder_level_1.N.conv1..conv5`, `...ca.1`, `down1_2.body.0`,
`up3_2.body.0`, `reduce_chan_level{2,1}`, `final_layer.out_proj`), so DiCo checkpoints load with
`strict=True` and the parameter counts are the reference's exactly.

U-shape (C = hidden_size): encoder-1 at C, encoder-2 at 2C, middle at 4C, decoder-2 at 2C, and
decoder-1 at 2C (unlike FCDM, the last level stays at 2C: its skip concat is reduced to 2C, not C).
Conditioning: c1 = t1 + y1 at C for encoder-1; c2 at 2C for encoder-2, both decoders and the final
layer; c3 at 4C for the middle.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from ..errors import UserError
from .layers import (GuidedModelMixin, LabelDropout, PretrainedMixin, TimestepEmbedder, modulate, pixel_shuffle_up,
                     pixel_unshuffle_down, run_blocks)
from .registry import register_preset


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MultiWidthLabelEmbedder(LabelDropout):
    """Class labels -> one vector per level width (C, 2C, 4C), with label dropout for CFG.

    One module rather than three `LabelEmbedder`s because the three tables must share ONE drop
    decision per sample (separate embedders would drop independently), and to keep DiCo's
    state-dict names `embedding_table_{0,1,2}`. Row `num_classes` is the null class.
    """

    def __init__(self, num_classes: int, widths: Sequence[int], dropout_prob: float):
        super().__init__(num_classes, dropout_prob)
        for i, width in enumerate(widths):
            self.add_module(f"embedding_table_{i}", nn.Embedding(self.table_rows, width))
        self.num_tables = len(widths)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None):
        labels = self.drop(labels, train, force_drop_ids)
        return tuple(getattr(self, f"embedding_table_{i}")(labels) for i in range(self.num_tables))


class DiCoBlock(nn.Module):
    """Conv "attention" part, then a separate feed-forward part; each adaLN-modulated and gated.

    x -> LN + modulate -> 1x1 conv -> 3x3 depthwise conv -> GELU -> x * CCA(x) -> 1x1 conv -> gate, add;
    then LN + modulate -> 1x1 conv C->rC -> GELU -> 1x1 conv rC->C -> gate, add.
    CCA (compact channel attention): global average pool -> 1x1 conv C->C -> sigmoid.
    """

    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.conv1 = nn.Conv2d(hidden_size, hidden_size, kernel_size=1, bias=True)
        self.conv2 = nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size, bias=True)
        self.conv3 = nn.Conv2d(hidden_size, hidden_size, kernel_size=1, bias=True)
        self.ca = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(hidden_size, hidden_size, kernel_size=1, bias=True),
            nn.Sigmoid(),
        )
        ffn_channels = int(mlp_ratio * hidden_size)
        self.conv4 = nn.Conv2d(hidden_size, ffn_channels, kernel_size=1, bias=True)
        self.conv5 = nn.Conv2d(ffn_channels, hidden_size, kernel_size=1, bias=True)
        self.norm1 = LayerNorm2d(hidden_size, affine=False, eps=1e-6)
        self.norm2 = LayerNorm2d(hidden_size, affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, inp: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = modulate(self.norm1(inp), shift_msa, scale_msa)
        x = F.gelu(self.conv2(self.conv1(x)))
        x = x * self.ca(x)                                   # (B, C, H, W) * (B, C, 1, 1)
        x = inp + gate_msa[:, :, None, None] * self.conv3(x)
        h = self.conv5(F.gelu(self.conv4(modulate(self.norm2(x), shift_mlp, scale_mlp))))
        return x + gate_mlp[:, :, None, None] * h


class FinalLayer(nn.Module):
    """adaLN LayerNorm, then a 3x3 conv to the output channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm2d(hidden_size, affine=False, eps=1e-6)
        self.out_proj = nn.Conv2d(hidden_size, out_channels, kernel_size=3, padding=1, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.out_proj(modulate(self.norm_final(x), shift, scale))


class OverlapPatchEmbed(nn.Module):
    """Stem: 3x3 conv in_channels -> C at full resolution."""

    def __init__(self, in_c: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=3, padding=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """(B, n, H, W) -> (B, 2n, H/2, W/2): 3x3 conv to n/2 channels, then PixelUnshuffle(2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = pixel_unshuffle_down(n_feat, 2 * n_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """(B, n, H, W) -> (B, n/2, 2H, 2W): 3x3 conv to 2n channels, then PixelShuffle(2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = pixel_shuffle_up(n_feat, n_feat // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DiCo(PretrainedMixin, ModelMixin, ConfigMixin, GuidedModelMixin):
    """Diffusion ConvNet; `forward(x, t, y) -> (B, out_channels, H, W)`.

    `depth` lists the blocks of (encoder-1, encoder-2, middle, decoder-2, decoder-1).
    `input_size` is not used by the layers (any H, W divisible by 4 works); it is recorded so every
    family's config says what resolution it was built for.
    """

    # diffusers regional compilation (`compile_repeated_blocks`): compile one block, reuse it for all
    _repeated_blocks = ["DiCoBlock"]

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        hidden_size: int = 416,
        depth: Sequence[int] = (9, 9, 10, 9, 9),
        mlp_ratio: float = 2.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if len(depth) != 5:
            raise UserError(
                f"DiCo: depth needs 5 block counts (encoder-1, encoder-2, middle, decoder-2, decoder-1); got {list(depth)}"
            )
        if input_size % 4:
            raise UserError(f"DiCo: input_size {input_size} must be a multiple of 4 (two 2x downsamples)")
        if hidden_size % 2:
            raise UserError(f"DiCo: hidden_size {hidden_size} must be even (Downsample halves it before PixelUnshuffle)")
        C = hidden_size
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        # The attribute diffusers' enable_/disable_gradient_checkpointing() toggles.
        self.gradient_checkpointing = grad_checkpointing

        self.x_embedder = OverlapPatchEmbed(in_channels, C, bias=True)
        self.t_embedder_1 = TimestepEmbedder(C)
        self.y_embedder = MultiWidthLabelEmbedder(num_classes, (C, 2 * C, 4 * C), class_dropout_prob)
        self.t_embedder_2 = TimestepEmbedder(2 * C)
        self.t_embedder_3 = TimestepEmbedder(4 * C)

        self.encoder_level_1 = nn.ModuleList([DiCoBlock(C, mlp_ratio) for _ in range(depth[0])])
        self.down1_2 = Downsample(C)
        self.encoder_level_2 = nn.ModuleList([DiCoBlock(2 * C, mlp_ratio) for _ in range(depth[1])])
        self.down2_3 = Downsample(2 * C)
        self.latent = nn.ModuleList([DiCoBlock(4 * C, mlp_ratio) for _ in range(depth[2])])

        self.up3_2 = Upsample(4 * C)
        self.reduce_chan_level2 = nn.Conv2d(4 * C, 2 * C, kernel_size=1, bias=True)
        self.decoder_level_2 = nn.ModuleList([DiCoBlock(2 * C, mlp_ratio) for _ in range(depth[3])])
        self.up2_1 = Upsample(2 * C)
        self.reduce_chan_level1 = nn.Conv2d(2 * C, 2 * C, kernel_size=1, bias=True)
        self.decoder_level_1 = nn.ModuleList([DiCoBlock(2 * C, mlp_ratio) for _ in range(depth[4])])

        self.final_layer = FinalLayer(2 * C, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Stem initialised like nn.Linear (instead of nn.Conv2d), as DiT's patch embedding.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        for i in range(self.y_embedder.num_tables):
            nn.init.normal_(getattr(self.y_embedder, f"embedding_table_{i}").weight, std=0.02)
        for t_embedder in (self.t_embedder_1, self.t_embedder_2, self.t_embedder_3):
            nn.init.normal_(t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity.
        for block in self.all_blocks():
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero output layer: the untrained model predicts exactly 0.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.out_proj.weight, 0)
        nn.init.constant_(self.final_layer.out_proj.bias, 0)

    def all_blocks(self) -> list[DiCoBlock]:
        levels = (self.encoder_level_1, self.encoder_level_2, self.latent, self.decoder_level_2, self.decoder_level_1)
        return [block for level in levels for block in level]

    def _run_level(self, level: nn.ModuleList, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return run_blocks(level, x, c, self.gradient_checkpointing and self.training)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) latents, t: (B,) timesteps, y: (B,) class labels."""
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise UserError(f"DiCo needs H and W divisible by 4; got {tuple(x.shape[-2:])}")
        x = self.x_embedder(x)                                    # (B, C, H, W)
        y1, y2, y3 = self.y_embedder(y, self.training)
        c1 = self.t_embedder_1(t) + y1                            # (B, C)
        c2 = self.t_embedder_2(t) + y2                            # (B, 2C)
        c3 = self.t_embedder_3(t) + y3                            # (B, 4C)

        enc1 = self._run_level(self.encoder_level_1, x, c1)                   # (B, C, H, W)
        enc2 = self._run_level(self.encoder_level_2, self.down1_2(enc1), c2)  # (B, 2C, H/2, W/2)
        mid = self._run_level(self.latent, self.down2_3(enc2), c3)            # (B, 4C, H/4, W/4)

        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(mid), enc2], dim=1))   # (B, 2C, H/2, W/2)
        dec2 = self._run_level(self.decoder_level_2, dec2, c2)
        dec1 = self.reduce_chan_level1(torch.cat([self.up2_1(dec2), enc1], dim=1))  # (B, 2C, H, W)
        dec1 = self._run_level(self.decoder_level_1, dec1, c2)
        return self.final_layer(dec1, c2)                         # (B, out_channels, H, W)


#################################################################################
#                                  DiCo Configs                                 #
#################################################################################

DICO_PRESETS = {
    "DiCo-S": dict(hidden_size=128, depth=(5, 4, 4, 4, 4), mlp_ratio=2.0),
    "DiCo-B": dict(hidden_size=256, depth=(5, 4, 4, 4, 4), mlp_ratio=2.0),
    "DiCo-L": dict(hidden_size=352, depth=(9, 8, 9, 8, 9), mlp_ratio=2.0),
    "DiCo-XL": dict(hidden_size=416, depth=(9, 9, 10, 9, 9), mlp_ratio=2.0),
}
for _name, _arch in DICO_PRESETS.items():
    register_preset(DiCo, _name, "dico", **_arch)
