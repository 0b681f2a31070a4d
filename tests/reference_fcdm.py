"""An independent, literal re-implementation of the reference FCDM layout (facts sections 2, 3, 10).

Plain NCHW tensors, LayerNorm through permutes, 1x1 convs, GRN over dims (2, 3), every block
wrapped in gradient checkpointing as the reference ships it. It is deliberately naive: the tests use
it to check that the fast `fcdm_lab` model computes the same function from the same weights, and
`benchmarks/speed.py` uses it as the "reference as shipped" baseline.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq = freq

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding_table(y)


class GRN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, dim, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x):
        gx = torch.norm(x, p=2, dim=(2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class Block(nn.Module):
    def __init__(self, dim, r=3, kernel=7):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pwconv1 = nn.Conv2d(dim, r * dim, 1)
        self.act = nn.GELU()
        self.grn = GRN(r * dim)
        self.pwconv2 = nn.Conv2d(r * dim, dim, 1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, x, c):
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        h = self.dwconv(x)
        h = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        h = self.pwconv2(self.grn(self.act(self.pwconv1(h))))
        return x + gate[:, :, None, None] * h


class Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout // 4, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout * 4, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x):
        return self.conv(x)


class Final(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.conv = nn.Conv2d(dim, out, 3, padding=1)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv(x * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


class ReferenceFCDM(nn.Module):
    def __init__(self, in_channels=4, num_classes=1000, L=2, C=128, checkpointing=True):
        super().__init__()
        self.checkpointing = checkpointing
        for i, w in enumerate((C, 2 * C, 4 * C), start=1):
            setattr(self, f"t_embedder_{i}", TimestepEmbedder(w))
            setattr(self, f"y_embedder_{i}", LabelEmbedder(num_classes, w))
        self.x_embedder = nn.Conv2d(in_channels, C, 3, padding=1)
        self.encoder_level_1 = nn.ModuleList(Block(C) for _ in range(L))
        self.down1_2 = Down(C, 2 * C)
        self.encoder_level_2 = nn.ModuleList(Block(2 * C) for _ in range(2 * L))
        self.down2_3 = Down(2 * C, 4 * C)
        self.latent = nn.ModuleList(Block(4 * C) for _ in range(4 * L))
        self.up3_2 = Up(4 * C, 2 * C)
        self.reduce_chans_2 = nn.Conv2d(4 * C, 2 * C, 1)
        self.decoder_level_2 = nn.ModuleList(Block(2 * C) for _ in range(2 * L))
        self.up2_1 = Up(2 * C, C)
        self.reduce_chans_1 = nn.Conv2d(2 * C, C, 1)
        self.decoder_level_1 = nn.ModuleList(Block(C) for _ in range(L))
        self.output_layer = nn.Conv2d(C, C, 3, padding=1)
        self.final_layer = Final(C, 2 * in_channels)

    def run(self, blocks, x, c):
        for b in blocks:
            x = checkpoint(b, x, c, use_reentrant=False) if self.checkpointing and self.training else b(x, c)
        return x

    def forward(self, x, t, y):
        c = [getattr(self, f"t_embedder_{i}")(t) + getattr(self, f"y_embedder_{i}")(y) for i in (1, 2, 3)]
        x = self.x_embedder(x)
        s1 = x = self.run(self.encoder_level_1, x, c[0])
        s2 = x = self.run(self.encoder_level_2, self.down1_2(x), c[1])
        x = self.run(self.latent, self.down2_3(x), c[2])
        x = self.run(self.decoder_level_2, self.reduce_chans_2(torch.cat([self.up3_2(x), s2], 1)), c[1])
        x = self.run(self.decoder_level_1, self.reduce_chans_1(torch.cat([self.up2_1(x), s1], 1)), c[0])
        return self.final_layer(self.output_layer(x), c[0])
