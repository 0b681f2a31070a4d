"""Accelerator settings shared by training, sampling and evaluation (torch only, no other imports)."""
from __future__ import annotations

import torch


def configure_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, as the reference implementation turns on in
    training and sampling. A no-op for CPU math; recorded as a named setting wherever it is used."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
