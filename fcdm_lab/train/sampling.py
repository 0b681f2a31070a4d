"""Sampling from trained models: load a checkpoint (ours or the reference repository's), generate
class-conditional images, write them as PNGs + an ADM-style .npz + a grid.

    model, cfg, info = load_checkpoint("runs/tiny/checkpoints/step_0001500.pt")   # EMA weights
    images, labels = generate(model, objective_for(cfg, model), num=100, steps=50, sampler="ddim")
    sample_checkpoint("runs/tiny", "runs/tiny/samples-ddim50", num=500, steps=50, sampler="ddim")

Sampling is deterministic per (seed, batch_size): batch b draws its noise from a generator seeded by
(seed, b), so the images do not depend on how many processes share the work.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ExperimentConfig, config_from_dict
from ..diffusion import create_objective, guided_model_fn
from ..errors import UserError, choices
from ..eval.samples_io import check_images_uint8, to_uint8
from ..models import create_model
from . import checkpoint as ckpt_io
from .rng import all_gather, derive_seed

IMAGE_CHANNELS = (1, 3)  # what a PNG can hold; anything else needs a VAE to decode


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _strip_prefixes(state: dict) -> dict:
    """Drop wrapper prefixes a saved state dict may carry (DDP 'module.', torch.compile '_orig_mod.')."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def infer_fcdm_kwargs(state: dict, args: Any = None) -> dict:
    """create_model("FCDM", ...) kwargs from a reference state dict's shapes (facts section 10).

    x_embedder.weight (C, in, 3, 3); y_embedder_1 table (num_classes + 1, C); L = number of
    encoder_level_1 blocks; final conv out = 2 * in (learned sigma) or in. The input size only
    matters for FLOP counts (the model is fully convolutional): image_size / 8 from the reference
    args when present, else 32 (256x256 images in latent space).
    """
    try:
        C, in_channels = (int(s) for s in state["x_embedder.weight"].shape[:2])
        num_classes = int(state["y_embedder_1.embedding_table.weight"].shape[0]) - 1
        out_channels = int(state["final_layer.conv.weight"].shape[0])
    except KeyError as e:
        raise UserError(f"not an FCDM state dict: it has no {e.args[0]!r} (found e.g. "
                        f"{choices(sorted(state)[:5])})") from None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"encoder_level_1\.(\d+)\.", k))}
    if not blocks:
        raise UserError("not an FCDM state dict: it has no encoder_level_1 blocks")
    args = vars(args) if hasattr(args, "__dict__") and not isinstance(args, dict) else (args or {})
    image_size = args.get("image_size") if isinstance(args, dict) else None
    input_size = int(image_size) // 8 if isinstance(image_size, int) and image_size % 32 == 0 else 32
    return dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, L=max(blocks) + 1, C=C,
                learn_sigma=out_channels == 2 * in_channels)


def _load_state(model: torch.nn.Module, state: dict, where: str) -> None:
    result = model.load_state_dict(_strip_prefixes(state), strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} (e.g. {choices(result.missing_keys[:3])})")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} (e.g. {choices(result.unexpected_keys[:3])})")
        raise UserError(f"weights in {where} do not fit the model: {'; '.join(parts)}")


def _config_or_none(args: Any) -> ExperimentConfig | None:
    if not isinstance(args, dict):
        return None
    try:
        return config_from_dict(args)
    except UserError:  # written by another version of the config schema: the weights still load
        return None


def _resolve_path(path: Path) -> Path:
    """A run folder means its newest checkpoint, else its ema.safetensors."""
    if path.is_dir():
        found = ckpt_io.find_latest_checkpoint(path)
        if found is not None:
            return found[0]
        if (path / "ema.safetensors").is_file():
            return path / "ema.safetensors"
        raise UserError(f"{path} is a folder without checkpoints/step_*.pt or ema.safetensors; pass a checkpoint file")
    return path


def load_checkpoint(path: str | os.PathLike, *, use_ema: bool = True, device: str | torch.device = "cpu"
                    ) -> tuple[torch.nn.Module, ExperimentConfig | None, dict]:
    """(model in eval mode on `device`, its config or None, info) from a checkpoint.

    Accepts our training checkpoints (`step_*.pt`), our `ema.safetensors`, a run folder (its newest
    checkpoint), and reference FCDM checkpoints {"model", "ema", "opt", "args"} (the architecture is
    inferred from the weights' shapes). info: path, source ("fcdm-lab" | "fcdm-lab-ema" |
    "reference"), weights ("ema" | "model": which were loaded), step (or None), model_info,
    data_info (or None).
    """
    path = _resolve_path(Path(path))
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        model, cfg, info = _load_safetensors(path)
    else:
        ckpt = ckpt_io.read_checkpoint(path)
        if ckpt_io.is_training_checkpoint(ckpt):
            mi = ckpt["model_info"]
            model = create_model(mi["name"], **{**mi["kwargs"], "grad_checkpointing": False})
            cfg, source, step = _config_or_none(ckpt.get("args")), "fcdm-lab", ckpt["step"]
            data_info = ckpt.get("data_info")
        elif "model" in ckpt or "ema" in ckpt:
            weights = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
            if not isinstance(weights, dict):
                raise UserError(f"{path} has no state dict under 'model' or 'ema'")
            kwargs = infer_fcdm_kwargs(_strip_prefixes(weights), ckpt.get("args"))
            model = create_model("FCDM", **kwargs)
            mi = {"name": "FCDM", "family": "fcdm", "kwargs": kwargs}
            cfg, source, data_info, step = None, "reference", None, None
        else:
            raise UserError(f"{path} is not a checkpoint: expected keys 'model'/'ema' (reference) or an "
                            f"fcdm-lab training checkpoint, found {choices(sorted(map(str, ckpt))[:8])}")
        use = "ema" if use_ema and ckpt.get("ema") is not None else "model"
        if ckpt.get(use) is None:
            hint = "; use the EMA weights (use_ema=True, the default)" if not use_ema else ""
            raise UserError(f"{path} holds no {use!r} weights{hint}")
        if use_ema and use == "model":
            warnings.warn(f"{path} holds no EMA weights; using the raw model weights", stacklevel=2)
        _load_state(model, ckpt[use], f"{path} ['{use}']")
        info = {"path": str(path), "source": source, "weights": use, "step": step, "model_info": mi,
                "data_info": data_info}
    model.to(device).eval().requires_grad_(False)
    return model, cfg, info


def _load_safetensors(path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        state = load_file(str(path))
    except Exception as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != "fcdm-lab-ema":
        raise UserError(f"{path} has no fcdm-lab metadata (model name and settings), so its model cannot be "
                        f"rebuilt; pass a training checkpoint instead")
    mi = meta["model_info"]
    model = create_model(mi["name"], **{**mi["kwargs"], "grad_checkpointing": False})
    _load_state(model, state, str(path))
    info = {"path": str(path), "source": "fcdm-lab-ema", "weights": "ema", "step": meta.get("step"),
            "model_info": mi, "data_info": meta.get("data_info")}
    return model, _config_or_none(meta.get("config")), info


def objective_for(cfg: ExperimentConfig | None, model: torch.nn.Module):
    """The diffusion objective a model was trained with (the DDPM recipe when no config is known)."""
    learn_sigma = bool(getattr(model.config, "learn_sigma", True))
    if cfg is None:
        return create_objective("ddpm", learn_sigma=learn_sigma)
    d = cfg.diffusion
    return create_objective(d.objective, num_timesteps=d.num_timesteps, beta_start=d.beta_start,
                            beta_end=d.beta_end, learn_sigma=learn_sigma, time_scale=d.time_scale)


def load_vae_for(data_info: dict | None, vae: Any = None, device: str | torch.device = "cpu"):
    """(AutoencoderKL, latent scale) for decoding latents: `vae` (a local folder, a hub name or a
    model) or the one named in the data info; the scale is the data's, else the VAE config's."""
    from ..data.latents import load_vae

    named = ((data_info or {}).get("vae") or {})
    ident = vae if vae is not None else named.get("id")
    if ident is None:
        raise UserError("this model works on latents: pass a VAE (a local AutoencoderKL folder or a hub name "
                        "such as stabilityai/sd-vae-ft-ema) to decode them")
    model = load_vae(str(ident)) if isinstance(ident, (str, os.PathLike)) else ident
    model = model.to(device).eval().requires_grad_(False)
    scale = named.get("scale_factor") or float(model.config.scaling_factor)
    return model, float(scale)


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def resolve_labels(class_labels: Any, num: int, num_classes: int) -> torch.Tensor:
    """int64 (num,): None (or []) cycles 0..num_classes-1; a label or a list is repeated to length num."""
    if isinstance(class_labels, int):
        class_labels = [class_labels]
    if class_labels is None or len(class_labels) == 0:  # [] is what a CLI gives for "none given"
        return torch.arange(num, dtype=torch.long) % num_classes
    labels = torch.as_tensor(class_labels).long().flatten()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"class labels must be in 0..{num_classes - 1} (the model has {num_classes} classes), "
                        f"got {labels.min().item()}..{labels.max().item()}")
    return labels.repeat(math.ceil(num / labels.numel()))[:num]


def grid_labels(num_classes: int, per_class: int = 8) -> torch.Tensor:
    """Labels of a sample grid with 8 columns: a row per class up to 10 classes, else 64 spread labels."""
    if num_classes <= 10:
        return torch.arange(num_classes).repeat_interleave(per_class)
    return torch.linspace(0, num_classes - 1, 64).round().long()


def decode_and_quantize(x: torch.Tensor, vae=None, latent_scale: float | None = None) -> torch.Tensor:
    """Model-space samples -> uint8 (N, C, H, W) images on the CPU (latents are decoded first)."""
    if vae is not None:
        x = vae.decode(x.to(next(vae.parameters()).dtype) / latent_scale).sample
    return to_uint8(x).cpu()


def _distributed(distributed: bool | None):
    from accelerate import PartialState

    state = PartialState()
    use = state.num_processes > 1 if distributed is None else (distributed and state.num_processes > 1)
    return state, use


@torch.no_grad()
def generate(model: torch.nn.Module, objective, *, num: int, class_labels: Any = None, sampler: str | None = None,
             steps: int | str | None = None, eta: float = 0.0, cfg_scale: float = 1.0,
             guidance_channels: int | None = None, batch_size: int = 64, seed: int = 0,
             device: str | torch.device | None = None, vae=None, latent_scale: float | None = None,
             image_size: int | None = None, progress: bool = True, distributed: bool | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional samples: (images uint8 (num, C, H, W), labels int64 (num,)).

    sampler/steps/eta: the objective's (None = its defaults); cfg_scale > 1 uses classifier-free
    guidance on `guidance_channels` (None = all). vae: an AutoencoderKL for latent models (with
    `latent_scale`, default its config's scaling factor). image_size: the model-space side (default
    the model's input_size). Under a multi-process launch (distributed None or True) each process
    samples every world-th batch and all get the gathered result. The model is moved to `device`.
    """
    if num < 1 or batch_size < 1:
        raise UserError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    if sampler is not None and sampler not in objective.samplers:
        raise UserError(f"unknown sampler {sampler!r} for the {objective.name} objective; choose one of: "
                        f"{choices(objective.samplers)}")
    state, dist = _distributed(distributed)
    device = torch.device(device) if device is not None else state.device
    config = model.config
    C, num_classes = int(config.in_channels), int(config.num_classes)
    size = int(image_size or config.input_size)
    if vae is not None:
        latent_channels = int(vae.config.latent_channels)
        if latent_channels != C:
            raise UserError(f"the VAE's latents have {latent_channels} channels but the model takes {C}: "
                            f"latent channels do not match the model; use the VAE the model was trained with")
        latent_scale = float(latent_scale or vae.config.scaling_factor)
    elif C not in IMAGE_CHANNELS:
        raise UserError(f"the model makes {C}-channel latents, which are not images: pass a VAE to decode them")
    labels = resolve_labels(class_labels, num, num_classes)
    fn = guided_model_fn(model, cfg_scale, guidance_channels)
    was_training = model.training
    model.to(device).eval()
    rank, world = (state.process_index, state.num_processes) if dist else (0, 1)
    mine = list(range(rank, math.ceil(num / batch_size), world))
    results = []
    iterator = mine
    if progress and rank == 0:
        from rich.progress import track

        iterator = track(mine, description="sampling", transient=True)
    try:
        for b in iterator:
            y = labels[b * batch_size:(b + 1) * batch_size].to(device)
            gen = torch.Generator(device=device).manual_seed(derive_seed(seed, b))
            shape = (len(y), C, size, size)
            noise = torch.randn(shape, generator=gen, device=device)
            x = objective.sample(fn, shape, sampler=sampler, steps=steps, eta=eta, noise=noise,
                                 model_kwargs={"y": y}, generator=gen, device=device)
            results.append((b, decode_and_quantize(x, vae, latent_scale)))
    finally:
        model.train(was_training)
    if dist:
        results = [r for part in all_gather(results) for r in part]
    images = torch.cat([imgs for _, imgs in sorted(results, key=lambda r: r[0])])
    return images, labels


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

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


def write_samples(out_dir: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, nrow: int = 10) -> dict:
    """images/000000_c3.png ..., samples.npz (arr_0 uint8 NHWC as ADM, plus labels), grid.png."""
    from PIL import Image

    images = check_images_uint8(images)
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for old in image_dir.iterdir():  # a previous run's images would mix with these
        if _IMAGE_NAME.match(old.name):
            old.unlink()
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    for i, (img, label) in enumerate(zip(nhwc, labels.tolist())):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(image_dir / f"{i:06d}_c{label}.png")
    # np.savez directly (not samples_io.save_npz) to store the labels next to ADM's arr_0.
    npz = out_dir / "samples.npz"
    np.savez(npz, arr_0=nhwc, labels=labels.numpy().astype(np.int64))
    grid = out_dir / "grid.png"
    save_grid(images[:100], grid, nrow=nrow)
    return {"images_dir": image_dir, "npz": npz, "grid": grid}


def sample_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, num: int = 100,
                      steps: int | str | None = 250, sampler: str | None = None, eta: float = 0.0,
                      cfg_scale: float = 1.0, class_labels: Sequence[int] | int | None = None, use_ema: bool = True,
                      guidance_channels: int | None = None, seed: int = 0, batch_size: int = 64,
                      device: str | torch.device | None = None, vae: Any = None, progress: bool = True) -> dict:
    """Sample a checkpoint to `out_dir`: images/NNNNNN_cK.png, samples.npz, grid.png, samples.json.

    vae: for latent models, a VAE to decode with (default: the one the training data names).
    Returns a dict with the written paths (out_dir, images_dir, npz, grid, json) and the settings
    used (checkpoint, weights, step, num, sampler, steps, eta, cfg_scale, guidance_channels, seed,
    wall_time_s). Under a multi-process launch the work is shared and the main process writes.
    """
    start = time.time()
    state, _ = _distributed(None)
    device = torch.device(device) if device is not None else state.device
    model, cfg, info = load_checkpoint(checkpoint, use_ema=use_ema, device=device)
    objective = objective_for(cfg, model)
    if sampler is not None and sampler not in objective.samplers:
        raise UserError(f"unknown sampler {sampler!r} for the {objective.name} objective; choose one of: "
                        f"{choices(objective.samplers)}")
    latent_scale = None
    if vae is not None or int(model.config.in_channels) not in IMAGE_CHANNELS:
        vae, latent_scale = load_vae_for(info.get("data_info"), vae, device)
    images, labels = generate(model, objective, num=num, class_labels=class_labels, sampler=sampler, steps=steps,
                              eta=eta, cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                              batch_size=batch_size, seed=seed, device=device, vae=vae, latent_scale=latent_scale,
                              progress=progress)
    out_dir = Path(out_dir)
    num_classes = int(model.config.num_classes)
    result = {"out_dir": out_dir, "images_dir": out_dir / "images", "npz": out_dir / "samples.npz",
              "grid": out_dir / "grid.png", "json": out_dir / "samples.json"}
    settings = {"checkpoint": info["path"], "weights": info["weights"], "step": info["step"], "num": num,
                "objective": objective.name, "sampler": sampler or objective.default_sampler,
                "steps": steps if steps is not None else getattr(objective, "default_steps", None), "eta": eta,
                "cfg_scale": cfg_scale, "guidance_channels": guidance_channels, "seed": seed,
                "batch_size": batch_size, "wall_time_s": time.time() - start}
    if state.is_main_process:
        write_samples(out_dir, images, labels, nrow=num_classes if num_classes <= 10 else 10)
        result["json"].write_text(json.dumps({**settings, "model_info": info["model_info"]}, indent=2, default=str))
    state.wait_for_everyone()
    return {**result, **settings}
