"""FCDM block components: channel mixers and block families, each registered by name.

Every ablation axis of the paper is a constructor argument (timm style), never a new class:
`kernel` (depthwise kernel size), `mixer` (grn | cca | se | none, with the mixer's own options),
`bottleneck` and `ratio` (the inverted bottleneck), `ffn` and `ffn_ratio` (an extra feed-forward
module). Block families (`convnext`, the FCDM block, and `resnet`) share the adaLN-zero conditioning,
the gated residual and the optional feed-forward through `AdaLNBlock`; a family only defines its
main path.

Options are declared, never parsed by hand: a block family and a channel mixer each declare
`OPTIONS = {name: (type, default, help)}`, and a spec is validated against them by the one coercion
policy of `fcdm_lab.schema`. A block's `mixer` option is a mixer name (`"cca"`) or a table with the
mixer's options (`{name = "se", rd_ratio = 0.25}`, as timm's `create_attn` takes keyword arguments);
see `resolve_mixer_spec` for its canonical form.

Speed: the trunk runs in channels_last memory, so `x.permute(0, 2, 3, 1)` is a free view and
LayerNorm, modulation, GRN and the 1x1 convs (applied as `F.linear`) all work on contiguous
(B, H, W, C) tensors with no copies. Parameters keep the reference's Conv2d shapes, so reference
checkpoints load unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, choices
from ..schema import check_value, from_dict
from .registry import BLOCKS, MIXERS


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

# The declared type of a block option that names a channel mixer: its name, or a table of the name
# and the mixer's options. `resolve_block_spec` resolves every option of this type.
MixerSpec = Union[str, Dict[str, Any]]


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in channels_last memory -> (B, H, W, C) contiguous, a free view."""
    return x.permute(0, 2, 3, 1)


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) contiguous -> (B, C, H, W) in channels_last memory, a free view."""
    return x.permute(0, 3, 1, 2)


class Pointwise(nn.Conv2d):
    """A 1x1 conv kept in Conv2d layout (reference checkpoint shapes) but applied as a Linear
    on channels-last (B, H, W, C) tensors: one GEMM, no permutes."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, Cin) -> (B, H, W, Cout)
        return F.linear(x, self.weight.view(self.out_channels, self.in_channels), self.bias)


class _DepthwiseConvFunction(torch.autograd.Function):
    """Depthwise conv, stride 1, odd kernel k, padding k//2, with a hand-written backward (CPU).

    Why by hand: on CPU, oneDNN computes this op's forward and input gradient fast but its WEIGHT
    gradient 5-10x slower than the forward (14-19 ms against 1.5 ms for a 7x7 kernel at FCDM-S
    level 1, batch 8, one thread), the largest single cost of the block. The weight gradient is
    itself a depthwise conv: dW[c] = sum_b corr(x[b, c], g[b, c]), i.e. the B*C images x[b, c] as one
    sample's channels, each correlated with its own H x W "kernel" g[b, c]; oneDNN's forward kernel
    runs that 2-5x faster. The input gradient is the conv of g with the flipped kernel (the fast
    forward kernel again), the bias gradient a sum. `gradcheck` covers it in tests.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        k = weight.shape[-1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(g, weight.flip((2, 3)), padding=k // 2, groups=c)
        if ctx.needs_input_grad[1]:
            # images: (1, B*C, H, W) in channels_last memory (H, W, B*C), a copy of x (channels_last)
            # that moves whole C-vectors; kernels: (B*C, 1, H, W) in plain order, a transposing copy of g
            images = x.permute(2, 3, 0, 1).reshape(1, h, w, b * c).permute(0, 3, 1, 2)
            kernels = g.reshape(b * c, 1, h, w)
            grad_w = F.conv2d(images, kernels, padding=k // 2, groups=b * c).view(b, c, k, k).sum(0)
            grad_w = grad_w.unsqueeze(1).contiguous(memory_format=torch.channels_last)  # the weight's layout
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(dim=(0, 2, 3))
        return grad_x, grad_w, grad_b


class DepthwiseConv2d(nn.Conv2d):
    """The block's depthwise conv (Conv2d parameters and names), stride 1 and 'same' padding, with
    the fast hand-written backward of `_DepthwiseConvFunction` when training on CPU."""

    def __init__(self, channels: int, kernel: int):
        super().__init__(channels, channels, kernel, padding=kernel // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"):
            return _DepthwiseConvFunction.apply(x, self.weight, self.bias)
        return super().forward(x)


def hidden_channels(dim: int, ratio: float) -> int:
    """Channels of an expansion or reduction: round(ratio * dim), at least 1."""
    return max(1, int(round(dim * ratio)))


def layer_norm_modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine over channels, then adaLN: h*(1+scale)+shift. h is (B, H, W, C)."""
    h = F.layer_norm(h, h.shape[-1:], eps=1e-6)
    return torch.addcmul(shift[:, None, None], h, 1 + scale[:, None, None])


# ---------------------------------------------------------------------------------------------
# Channel mixers: (B, H, W, C) -> (B, H, W, C). A mixer is built as `cls(channels, **options)`;
# a mixer with options declares them as `OPTIONS = {name: (type, default, help)}`.
# ---------------------------------------------------------------------------------------------

class _GRNFunction(torch.autograd.Function):
    """GRN on (B, H, W, C) with a hand-written backward.

    Why by hand: autograd's graph of this formula makes ~6 full-size passes in backward (square,
    its scalar and broadcast products, two addcmul products, a sum); the closed form below makes 4,
    about 1.6x faster for the op on CPU (measured at FCDM-S level 1). `gradcheck` covers it in tests.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta):
        b, h, w, c = x.shape
        # sqrt(sum of squares) over (B, H*W, C) rows: several times faster on CPU than
        # linalg.vector_norm over two strided dims
        gx = x.reshape(b, h * w, c).square().sum(dim=1).sqrt().view(b, 1, 1, c)  # (B, 1, 1, C)
        denom = gx.mean(dim=-1, keepdim=True) + 1e-6
        nx = gx / denom
        scale = 1 + gamma * nx
        ctx.save_for_backward(x, gamma, gx, denom, nx, scale)
        # x * (1 + gamma*N) + beta == gamma*(x*N) + beta + x, with one full-size pass instead of three
        return torch.addcmul(beta, x, scale)

    @staticmethod
    def backward(ctx, g):
        x, gamma, gx, denom, nx, scale = ctx.saved_tensors
        c = x.shape[-1]
        grad_scale = (g * x).sum(dim=(1, 2), keepdim=True)                       # (B, 1, 1, C)
        grad_gamma = (grad_scale * nx).sum(dim=0, keepdim=True)
        grad_beta = g.sum(dim=(0, 1, 2), keepdim=True)
        grad_nx = grad_scale * gamma
        # N_k = G_k / (mean_c G + eps): dN_k/dG_j = delta_kj / d - G_k / (C d^2)
        grad_gx = grad_nx / denom - (grad_nx * gx).sum(dim=-1, keepdim=True) / (c * denom * denom)
        # dG/dx = x / G (G = 0 only when a whole channel is zero; its gradient is then 0)
        ratio = torch.where(gx > 0, grad_gx / gx, torch.zeros_like(gx))
        return torch.addcmul(g * scale, x, ratio), grad_gamma, grad_beta


@MIXERS.register("grn", doc="Global Response Normalization (ConvNeXt V2), the FCDM default")
class GRN(nn.Module):
    """out = gamma * (x * N) + beta + x, with N = per-channel L2 norm over H, W divided by its
    mean over channels. gamma, beta start at zero, so GRN starts as the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        return _GRNFunction.apply(x, self.gamma.view(1, 1, 1, -1), self.beta.view(1, 1, 1, -1))


@MIXERS.register("cca", doc="compact channel attention of DiCo: avgpool -> 1x1 conv C->C -> sigmoid gate")
class CompactChannelAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Pointwise(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(1, 2), keepdim=True)                         # (B, 1, 1, C)
        return x * torch.sigmoid(self.conv(pooled))


@MIXERS.register("se", doc="squeeze-and-excitation (Hu et al. 2018): avgpool -> 1x1 C->rd -> ReLU -> 1x1 rd->C "
                           "-> sigmoid gate (CCA with a bottleneck)")
class SqueezeExcite(nn.Module):
    """The classic channel attention that DiCo's CCA compacts: CCA is SE without the bottleneck
    and its ReLU (one C->C conv, C^2 weights and MACs per sample); SE's two convs through
    rd = rd_ratio*C channels cost 2*rd_ratio*C^2, an eighth of CCA's at the SE paper's default
    reduction r = 16 (rd_ratio 1/16, also timm's). Next to `cca` it asks whether the gate needs CCA's
    full-rank map. Parameter names follow timm's SEModule (`fc1`, `fc2`)."""

    OPTIONS = {
        "rd_ratio": (float, 1 / 16, "bottleneck width relative to the channels (rd = max(1, round(rd_ratio*C)))"),
    }

    def __init__(self, channels: int, rd_ratio: float = 1 / 16):
        super().__init__()
        rd = hidden_channels(channels, rd_ratio)
        self.fc1 = Pointwise(channels, rd)
        self.fc2 = Pointwise(rd, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(1, 2), keepdim=True)                         # (B, 1, 1, C)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))


@MIXERS.register("none", doc="no channel mixer")
class NoMixer(nn.Module):
    def __init__(self, channels: int):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ---------------------------------------------------------------------------------------------
# Block families
# ---------------------------------------------------------------------------------------------

class FeedForward(nn.Module):
    """The optional extra feed-forward module: (LN + adaLN) -> 1x1 C->rC -> GELU -> 1x1 rC->C."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Pointwise(dim, hidden)
        self.fc2 = Pointwise(hidden, dim)

    def forward(self, h: torch.Tensor, shift, scale) -> torch.Tensor:  # (B, H, W, C)
        return self.fc2(F.gelu(self.fc1(layer_norm_modulate(h, shift, scale))))


class AdaLNBlock(nn.Module):
    """adaLN-zero conditioned residual block; subclasses define `main(x, shift, scale)`.

    Options are declared in `OPTIONS` (name -> (type, default, help)); `resolve_block_spec`
    validates a user's spec against them, so the backbone never needs to know a family's name.
    """

    OPTIONS: Dict[str, tuple] = {}

    def __init__(self, dim: int, ffn: bool = False, ffn_ratio: float = 3.0):
        super().__init__()
        self.has_ffn = ffn
        n_mod = 6 if ffn else 3  # shift, scale, gate for the main path (and for the FFN)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mod * dim, bias=True))
        # adaLN-zero: gates start at zero, so every block starts as the identity
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)
        self.ffn = FeedForward(dim, hidden_channels(dim, ffn_ratio)) if ffn else None

    def add_mixer(self, channels: int, spec: "MixerSpec") -> None:
        """Build the channel mixer a spec names, registered under the mixer's own name (so the
        default block has the reference's `grn.*` parameters); `self.mixer` calls it."""
        name, mixer = build_mixer(channels, spec)
        if hasattr(self, name):
            raise ValueError(f"channel mixer name {name!r} clashes with an attribute of {type(self).__name__}")
        self.mixer_name = name
        self.add_module(name, mixer)

    def mixer(self, h: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.mixer_name)(h)

    def main(self, x: torch.Tensor, shift, scale) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) channels_last memory; c: (B, C) condition
        mods = self.adaLN_modulation(c).chunk(6 if self.has_ffn else 3, dim=1)
        shift, scale, gate = mods[:3]
        x = torch.addcmul(x, self.main(x, shift, scale), gate[:, :, None, None])
        if self.ffn is not None:
            shift, scale, gate = mods[3:]
            h = self.ffn(to_nhwc(x), shift, scale)
            x = torch.addcmul(x, to_nchw(h), gate[:, :, None, None])
        return x


@BLOCKS.register("convnext", doc="the FCDM block: dwconv -> LN+adaLN -> 1x1 up -> GELU -> mixer -> 1x1 down")
class ConvNeXtBlock(AdaLNBlock):
    OPTIONS = {
        "kernel": (int, 7, "depthwise kernel size (odd)"),
        "mixer": (MixerSpec, "grn", "channel mixer after the activation: a name, or {name = ..., option = value}"),
        "bottleneck": (bool, True, "inverted bottleneck on (hidden = ratio*C) or off (hidden = C)"),
        "ratio": (float, 3.0, "inverted-bottleneck expansion ratio r"),
        "ffn": (bool, False, "add a separate feed-forward module (adaLN then gives 6 vectors)"),
        "ffn_ratio": (float, 3.0, "expansion ratio of the extra feed-forward module"),
    }

    def __init__(self, dim: int, kernel: int = 7, mixer: MixerSpec = "grn", bottleneck: bool = True,
                 ratio: float = 3.0, ffn: bool = False, ffn_ratio: float = 3.0):
        super().__init__(dim, ffn=ffn, ffn_ratio=ffn_ratio)
        hidden = hidden_channels(dim, ratio) if bottleneck else dim
        self.dwconv = DepthwiseConv2d(dim, kernel)
        self.pwconv1 = Pointwise(dim, hidden)
        self.add_mixer(hidden, mixer)
        self.pwconv2 = Pointwise(hidden, dim)

    def main(self, x, shift, scale):
        h = layer_norm_modulate(to_nhwc(self.dwconv(x)), shift, scale)   # (B, H, W, C)
        h = self.mixer(F.gelu(self.pwconv1(h)))                          # (B, H, W, rC)
        return to_nchw(self.pwconv2(h))                                  # (B, C, H, W)


@BLOCKS.register("resnet", doc="ResNet basic block: LN+adaLN -> kxk conv -> GELU -> mixer -> kxk conv")
class ResNetBlock(AdaLNBlock):
    OPTIONS = {
        "kernel": (int, 3, "kernel size of both convs (odd)"),
        "mixer": (MixerSpec, "none", "channel mixer after the activation: a name, or {name = ..., option = value}"),
        "ratio": (float, 1.0, "width of the middle activation relative to C"),
        "ffn": (bool, False, "add a separate feed-forward module (adaLN then gives 6 vectors)"),
        "ffn_ratio": (float, 3.0, "expansion ratio of the extra feed-forward module"),
    }

    def __init__(self, dim: int, kernel: int = 3, mixer: MixerSpec = "none", ratio: float = 1.0,
                 ffn: bool = False, ffn_ratio: float = 3.0):
        super().__init__(dim, ffn=ffn, ffn_ratio=ffn_ratio)
        hidden = hidden_channels(dim, ratio)
        self.conv1 = nn.Conv2d(dim, hidden, kernel, padding=kernel // 2)
        self.add_mixer(hidden, mixer)
        self.conv2 = nn.Conv2d(hidden, dim, kernel, padding=kernel // 2)

    def main(self, x, shift, scale):
        h = to_nchw(layer_norm_modulate(to_nhwc(x), shift, scale))
        h = to_nhwc(F.gelu(self.conv1(h)))
        return self.conv2(to_nchw(self.mixer(h)))


# ---------------------------------------------------------------------------------------------
# Specs: {"family": "convnext", "kernel": 5, "mixer": "cca"}, {"mixer": {"name": "se", "rd_ratio": 0.25}}
# ---------------------------------------------------------------------------------------------

DEFAULT_BLOCK: Dict[str, Any] = {"family": "convnext"}


@functools.lru_cache(maxsize=None)
def options_class(cls: type, head: str = "family") -> type:
    """A block family's (or channel mixer's) declared OPTIONS as a dataclass, so a spec loads
    through the same typed validation (schema.from_dict) as experiment files. `head` is the spec's
    key naming the component: `family` for blocks, `name` for mixers."""
    fields = [(head, str, dataclasses.field(default=None))]
    fields += [(k, typ, dataclasses.field(default=default, metadata={"help": help_}))
               for k, (typ, default, help_) in getattr(cls, "OPTIONS", {}).items()]
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields)


MAX_KERNEL = 63  # the paper's 3-7; larger than any feature map of a 512x512 latent model's inner levels


def _check_ranges(resolved: Dict[str, Any], where: str) -> None:
    """Value rules types cannot express, by option name, for blocks and mixers alike: a `kernel`
    is odd and bounded; every `*ratio` (ratio, ffn_ratio, rd_ratio) is a positive number."""
    if "kernel" in resolved and not (1 <= resolved["kernel"] <= MAX_KERNEL and resolved["kernel"] % 2):
        raise UserError(f"{where}.kernel must be an odd integer from 1 to {MAX_KERNEL}, got {resolved['kernel']}")
    for key, value in resolved.items():
        if key.endswith("ratio") and isinstance(value, float) and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{where}.{key} must be a positive number, got {value}")


def resolve_mixer_spec(value: Any, where: str = "mixer") -> MixerSpec:
    """Validate a channel-mixer spec, a name (`"cca"`) or a table (`{"name": "se", "rd_ratio": 0.25}`),
    against the mixer's declared OPTIONS (the one coercion policy) and return its canonical form:

      - the name alone for a mixer that declares no options: `"grn"`, exactly what specs have always
        said, so older specs, run tags and checkpoints read (and resolve) unchanged;
      - otherwise a table of the name and EVERY declared option, defaults filled in
        (`{"name": "se", "rd_ratio": 0.0625}`), so a recorded spec never depends on a later default.

    Either form is plain JSON/TOML and resolves to itself. Raises a one-line UserError naming the key."""
    value = check_value(where, value, MixerSpec)
    spec = {"name": value} if isinstance(value, str) else dict(value)
    if "name" not in spec:
        raise UserError(f"{where}: a mixer table needs 'name' (a channel mixer: {choices(MIXERS.names())})")
    name = check_value(f"{where}.name", spec["name"], str)
    try:
        cls = MIXERS.get(name)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    options = getattr(cls, "OPTIONS", {})
    unknown = sorted(set(spec) - {"name", *options})
    if unknown and not options:
        raise UserError(f"{where}: channel mixer {name!r} takes no options, got {unknown[0]!r}")
    if unknown:
        raise UserError(f"{where}: unknown option {unknown[0]!r} for channel mixer {name!r}; "
                        f"valid: {choices(['name', *options])}")
    resolved = dataclasses.asdict(from_dict(options_class(cls, "name"), spec, prefix=f"{where}."))
    _check_ranges(resolved, where)
    return resolved if options else name


def build_mixer(channels: int, spec: MixerSpec) -> Tuple[str, nn.Module]:
    """(name, module) of the channel mixer a spec names, built for `channels` with its options."""
    spec = resolve_mixer_spec(spec)
    if isinstance(spec, str):
        return spec, MIXERS.get(spec)(channels)
    options = {k: v for k, v in spec.items() if k != "name"}
    return spec["name"], MIXERS.get(spec["name"])(channels, **options)


def resolve_block_spec(spec: Dict[str, Any] | None, where: str = "block") -> Dict[str, Any]:
    """Validate a block spec against its family's declared options and fill in the defaults; an
    option declared as a `MixerSpec` is resolved to its canonical form (`resolve_mixer_spec`).
    `where` names the spec in messages ("model.block"). Raises a one-line UserError on bad input."""
    spec = dict(DEFAULT_BLOCK if spec is None else spec)
    family = check_value(f"{where}.family", spec.setdefault("family", "convnext"), str)
    try:
        cls = BLOCKS.get(family)
    except UserError as e:
        raise UserError(f"{where}.family: {e}") from None
    unknown = sorted(set(spec) - {"family", *cls.OPTIONS})
    if unknown:
        raise UserError(f"{where}: unknown option {unknown[0]!r} for block family {family!r}; "
                        f"valid: {choices(['family', *cls.OPTIONS])}")
    resolved = dataclasses.asdict(from_dict(options_class(cls), spec, prefix=f"{where}."))
    _check_ranges(resolved, where)
    for key, (typ, _, _) in cls.OPTIONS.items():
        if typ == MixerSpec:
            resolved[key] = resolve_mixer_spec(resolved[key], f"{where}.{key}")
    return resolved


def build_block(dim: int, spec: Dict[str, Any]) -> AdaLNBlock:
    spec = resolve_block_spec(spec)
    options = {k: v for k, v in spec.items() if k != "family"}
    return BLOCKS.get(spec["family"])(dim, **options)
