"""Exact parameter counts and multiply-accumulates (the paper's "FLOPs").

Uses `torch.utils.flop_counter.FlopCounterMode`, which reports 2 x MACs for convs and linears.
Attention is counted under the math SDPA backend: on CPU the fused kernel has no formula and
would count as 0 (see the facts file, section 5). Forward passes only: the depthwise-conv backward
formula ignores groups.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Every parameter, trainable or not (DiT's fixed positional table included, as its paper does)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, input_shape: Sequence[int]) -> float:
    """GMACs of one forward pass for ONE sample of shape (C, H, W)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(x, t, y)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
