"""Sample sets on disk: PNGs, an ADM-style .npz and a grid; `sample_checkpoint` (the `fcdm-lab
sample` command) loads a checkpoint, samples and writes them.

    sample_checkpoint("runs/tiny", "runs/tiny/samples-ddim50", num=500, steps=50, sampler="ddim")
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..accel import configure_tf32
from ..errors import UserError, choices
from ..fileio import check_output_dir
from ..eval.samples_io import NPZ_KEYS, check_images_uint8
from .checkpoints import diffusion_settings, load_checkpoint, objective_for
from .generation import IMAGE_CHANNELS, _distributed, generate, load_vae_for


def grid_array(images: torch.Tensor, nrow: int = 8, min_tile: int = 32) -> np.ndarray:
    """uint8 (N, C, H, W) -> one HWC uint8 RGB grid; small images are enlarged (nearest) to `min_tile`."""
    from torchvision.utils import make_grid

    images = check_images_uint8(images)
    k = max(1, min_tile // images.shape[-1])
    if k > 1:
        images = images.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=0)  # (3, H', W'), gray images become RGB
    return grid.permute(1, 2, 0).contiguous().numpy()


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> np.ndarray:
    """Write a grid PNG; returns the grid as an HWC uint8 array (for trackers)."""
    from PIL import Image

    grid = grid_array(images, nrow)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return grid


_IMAGE_NAME = re.compile(r"^\d{6}_c\d+\.png$")


def write_samples(out_dir: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, nrow: int = 10,
                  npz_key: str = "arr_0", pngs: bool = True) -> dict:
    """images/000000_c3.png ..., samples.npz (uint8 NHWC under `npz_key`: ADM's "arr_0" or the
    reference's "arr", plus labels), grid.png."""
    from PIL import Image

    if npz_key not in NPZ_KEYS:
        raise UserError(f"npz key {npz_key!r} is not one of {choices(NPZ_KEYS)}")
    images = check_images_uint8(images)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    if pngs:
        image_dir.mkdir(parents=True, exist_ok=True)
        for old in image_dir.iterdir():  # a previous run's images would mix with these
            if _IMAGE_NAME.match(old.name):
                old.unlink()
        for i, (img, label) in enumerate(zip(nhwc, labels.tolist())):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(image_dir / f"{i:06d}_c{label}.png")
    out_dir.mkdir(parents=True, exist_ok=True)
    # np.savez directly (not samples_io.save_npz) to store the labels next to the images.
    npz = out_dir / "samples.npz"
    np.savez(npz, **{npz_key: nhwc}, labels=labels.numpy().astype(np.int64))
    grid = out_dir / "grid.png"
    save_grid(images[:100], grid, nrow=nrow)
    return {"images_dir": image_dir if pngs else None, "npz": npz, "grid": grid}


def sample_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, num: int = 100,
                      steps: int | str | None = None, sampler: str | None = None, eta: float = 0.0,
                      cfg_scale: float = 1.0, class_labels: Sequence[int] | int | str | None = None,
                      use_ema: bool = True, guidance_channels: int | None = None, seed: int = 0,
                      batch_size: int = 64, device: str | torch.device | None = None, vae: Any = None,
                      objective: str | None = None, time_scale: float | None = None, tf32: bool = True,
                      npz_key: str = "arr_0", progress: bool = True) -> dict:
    """Sample a checkpoint to `out_dir`: images/NNNNNN_cK.png, samples.npz, grid.png, samples.json.

    The objective is the one the checkpoint records (ours: its config; the reference's: its args,
    e.g. a flow run's SDE sampler with t in [0, 1]); `objective` / `time_scale` override it. steps
    None = the sampler's default (250 for ddpm / ddim / sde, 50 for euler / heun). vae: for latent
    models, a VAE to decode with (default: the one the training data names). tf32: TF32 CUDA math
    (the reference's setting; no effect on CPU). Returns a dict with the written paths (out_dir,
    images_dir, npz, grid, json) and the settings used. Under a multi-process launch the work is
    shared and the main process writes.
    """
    start = time.time()
    check_output_dir(out_dir)  # before any sampling: an existing file there fails in a second, not after minutes
    state, _ = _distributed(None)
    device = torch.device(device) if device is not None else state.device
    if device.type == "cuda":
        configure_tf32(tf32)
    model, cfg, info = load_checkpoint(checkpoint, use_ema=use_ema, device=device)
    obj = objective_for(cfg, model, info, objective=objective, time_scale=time_scale)
    if sampler is not None and sampler not in obj.samplers:
        raise UserError(f"unknown sampler {sampler!r} for the {obj.name} objective; choose one of: "
                        f"{choices(obj.samplers)}")
    sampler = sampler or obj.default_sampler
    steps = default_steps(obj, sampler) if steps is None else steps
    latent_scale = None
    if vae is not None or int(model.config.in_channels) not in IMAGE_CHANNELS:
        vae, latent_scale = load_vae_for(info.get("data_info"), vae, device)
    images, labels = generate(model, obj, num=num, class_labels=class_labels, sampler=sampler, steps=steps,
                              eta=eta, cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                              batch_size=batch_size, seed=seed, device=device, vae=vae, latent_scale=latent_scale,
                              progress=progress)
    out_dir = Path(out_dir)
    num_classes = int(model.config.num_classes)
    result = {"out_dir": out_dir, "images_dir": out_dir / "images", "npz": out_dir / "samples.npz",
              "grid": out_dir / "grid.png", "json": out_dir / "samples.json"}
    settings = {"checkpoint": info["path"], "weights": info["weights"], "step": info["step"], "num": num,
                **diffusion_settings(obj), "diffusion_source": (info.get("diffusion") or {}).get("source"),
                "sampler": sampler, "steps": steps, "eta": eta, "cfg_scale": cfg_scale,
                "guidance_channels": guidance_channels, "seed": seed, "batch_size": batch_size,
                "tf32": bool(tf32 and device.type == "cuda"), "npz_key": npz_key,
                "wall_time_s": time.time() - start}
    if state.is_main_process:
        write_samples(out_dir, images, labels, nrow=num_classes if num_classes <= 10 else 10, npz_key=npz_key)
        result["json"].write_text(json.dumps({**settings, "model_info": info["model_info"]}, indent=2, default=str))
    state.wait_for_everyone()
    return {**result, **settings}


def default_steps(objective, sampler: str | None = None) -> int:
    """The step count a sampler runs by default: the paper's 250 for ddpm / ddim and the flow SDE,
    50 for the flow ODE samplers."""
    if objective.name == "flow":
        return objective.steps_for(sampler)
    return objective.default_steps
