"""Profiling: exact parameters, GMACs (the paper's "FLOPs") and, optionally, measured throughput.

GMACs are counted on the meta device (no memory, no compute). Throughput builds the real model on
the current device and times inference (no grad) and a full training step (forward, backward,
fused AdamW). Peak memory is `torch.cuda.max_memory_allocated` on GPU; on CPU it is the peak rise of
the process's resident memory during the measurement, sampled every 2 ms (an approximation: torch
has no CPU allocator statistics).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Dict, Iterable, List, Sequence

import torch

from ..errors import UserError, choices
from ..schema import check_value
from .blocks import resolve_block_spec
from .factory import create_model, model_family, valid_model_kwargs
from .flops import count_gmacs, count_params
from .matching import match_flops
from .registry import BLOCKS, MODELS

# The papers' compute figures (G multiply-accumulates), facts sections 4, 5 (256x256, 1000 classes).
PAPER_GMACS = {
    "FCDM-S": 3.1, "FCDM-B": 12.2, "FCDM-L": 48.3, "FCDM-XL": 64.6,
    "DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.6,
    "DiCo-XL": 87.3,
}


MAX_RESOLUTION = 16384


def input_shape(resolution: int, pixel: bool = False, in_channels: int | None = None) -> tuple[int, int, int]:
    """Image side -> model input (C, H, W): SD-VAE latents (side/8, 4 channels) unless `pixel`."""
    if not 1 <= resolution <= MAX_RESOLUTION:
        raise UserError(f"resolution must be an image side from 1 to {MAX_RESOLUTION} pixels, got {resolution}")
    if in_channels is not None and in_channels < 1:
        raise UserError(f"in_channels must be >= 1, got {in_channels}")
    if pixel:
        return (in_channels or 3, resolution, resolution)
    if resolution % 8:
        raise UserError(f"latent models need an image side divisible by 8 (VAE factor), got {resolution}; use --pixel for pixel-space models")
    return (in_channels or 4, resolution // 8, resolution // 8)


def split_overrides(name: str, overrides: Dict[str, Any]) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """`--set` keys are block options (kernel=5, mixer=cca, family=resnet) or model settings (L=3)."""
    model_keys = set(valid_model_kwargs(name)) - {"block", "input_size", "in_channels", "num_classes"}
    fcdm = model_family(name) == "fcdm"
    block_keys = {"family"}
    if fcdm:
        for cls in (BLOCKS.get(f) for f in BLOCKS.names()):
            block_keys |= set(cls.OPTIONS)
    model_kw, block_kw = {}, {}
    for key, value in overrides.items():
        if key in model_keys:
            model_kw[key] = value
        elif key in block_keys:
            block_kw[key] = value
        else:
            valid = sorted(model_keys | (block_keys if fcdm else set()))
            raise UserError(f"unknown --set key {key!r} for {name}; valid: {choices(valid)}")

    for key in ("L", "C"):
        if key in model_kw:
            model_kw[key] = check_value(f"--set {key}", model_kw[key], int)
    return model_kw, block_kw


def profile_model(
    name: str,
    *,
    resolution: int = 256,
    pixel: bool = False,
    in_channels: int | None = None,
    num_classes: int = 1000,
    overrides: Dict[str, Any] | None = None,
    block: Dict[str, Any] | None = None,
    match: str | None = None,
    match_target: float | None = None,
    batch_size: int = 8,
    throughput: bool = False,
    device: str | None = None,
    iters: int = 5,
) -> Dict[str, Any]:
    """Profile one model. Returns a JSON-able dict (model, params, gmacs, resolution, ...)."""
    MODELS.get(name)
    shape = input_shape(resolution, pixel, in_channels)
    model_kw, block_kw = split_overrides(name, overrides or {})
    kwargs: Dict[str, Any] = dict(input_size=shape[1], in_channels=shape[0], num_classes=num_classes, **model_kw)
    fcdm = model_family(name) == "fcdm"
    if fcdm:
        spec = dict(block or {})
        spec.update(block_kw)
        kwargs["block"] = resolve_block_spec(spec)
        if name == "FCDM" and ("L" not in kwargs or "C" not in kwargs):
            raise UserError("model 'FCDM' needs --set L=... --set C=... (or use a preset: FCDM-S, FCDM-B, FCDM-L, FCDM-XL)")
    elif block or match:
        raise UserError(f"block options and --match apply to FCDM models only, not {name!r}")
    result: Dict[str, Any] = {"model": name, "family": model_family(name), "resolution": resolution,
                              "input_shape": list(shape)}
    if match:
        meta = MODELS.meta(name)
        kwargs.setdefault("L", meta.get("L"))
        kwargs.setdefault("C", meta.get("C"))
        kwargs, m = match_flops(kwargs, match, match_target)
        result["match"] = m.to_dict()
    with torch.device("meta"):
        meta_model = create_model(name, **kwargs)
    result["params"] = count_params(meta_model)
    result["gmacs"] = round(count_gmacs(meta_model, shape), 6)
    if fcdm:
        result["block"] = kwargs["block"]
        cfg = meta_model.config
        result["L"], result["C"] = cfg.L, cfg.C
    paper = PAPER_GMACS.get(name)
    if paper is not None and resolution == 256 and not pixel and not overrides and not block and num_classes == 1000:
        result["paper_gmacs"] = paper
    if throughput:
        result.update(measure_throughput(name, kwargs, shape, batch_size=batch_size, device=device, iters=iters))
    return result


class _RssSampler:
    """Peak resident-memory rise of this process while active (CPU peak-memory approximation)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def measure_throughput(name: str, kwargs: Dict[str, Any], shape: Sequence[int], *, batch_size: int = 8,
                       device: str | None = None, iters: int = 5, warmup: int = 2) -> Dict[str, Any]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    model = create_model(name, **kwargs).to(dev)
    num_classes = kwargs["num_classes"]
    x = torch.randn(batch_size, *shape, device=dev)
    t = torch.randint(0, 1000, (batch_size,), device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    model.eval()
    with torch.no_grad():
        for _ in range(warmup):
            model(x, t, y)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x, t, y)
        sync()
        infer = batch_size * iters / (time.perf_counter() - t0)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)

    def step():
        loss = model(x, t, y).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    sampler = _RssSampler() if dev.type == "cpu" else None
    if sampler:
        sampler.__enter__()
    try:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
        train = batch_size * iters / (time.perf_counter() - t0)
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else sampler.peak_mb
    return {"device": str(dev), "batch_size": batch_size, "threads": torch.get_num_threads(),
            "train_img_per_s": round(train, 2), "infer_img_per_s": round(infer, 2),
            "peak_mem_mb": round(peak, 1)}


def all_model_names() -> List[str]:
    """Presets and baselines (the open `FCDM` family needs L and C, so it is not listed)."""
    return [n for n in MODELS.names() if n != "FCDM"]


def profile_many(names: Iterable[str], resolutions: Sequence[int], **kw) -> List[Dict[str, Any]]:
    return [profile_model(n, resolution=r, **kw) for n in names for r in resolutions]
