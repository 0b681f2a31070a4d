"""Class-conditional generation: labels, batches with their own noise, decoding to uint8 images.

Sampling is deterministic per (seed, batch_size): batch b draws its noise (the initial noise, then
any sampler noise) from a generator seeded by (seed, b), so the images do not depend on how many
processes share the work, and a batch can be recomputed on its own (resumable sampling, shards.py).
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..data.latents import load_vae
from ..diffusion import guided_model_fn
from ..errors import UserError, choices
from ..progress import track
from ..eval.samples_io import to_uint8
from ..rng import all_gather, derive_seed

IMAGE_CHANNELS = (1, 3)  # what a PNG can hold; anything else needs a VAE to decode
LABEL_MODES = ("cycle", "random")
_RANDOM_LABELS_STREAM = 7  # derive_seed(seed, stream): the labels' own stream, apart from every batch's noise


def resolve_labels(class_labels: Any, num: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """int64 (num,) labels.

    None, [] or "cycle": 0..num_classes-1 repeated (a balanced set); "random": uniform at random from
    a generator seeded by `seed` (the ADM / reference protocol for FID); a label or a list is
    repeated to length num.
    """
    if isinstance(class_labels, str):
        if class_labels not in LABEL_MODES:
            raise UserError(f"unknown label mode {class_labels!r}; choose one of: {choices(LABEL_MODES)} "
                            f"or give the labels")
        if class_labels == "random":
            gen = torch.Generator().manual_seed(derive_seed(seed, _RANDOM_LABELS_STREAM))
            return torch.randint(0, num_classes, (num,), generator=gen)
        class_labels = None
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


def load_vae_for(data_info: dict | None, vae: Any = None, device: str | torch.device = "cpu"):
    """(AutoencoderKL, latent scale) for decoding latents: `vae` (a local folder, a hub name or a
    model) or the one named in the data info; the scale is the data's, else the VAE config's."""
    named = ((data_info or {}).get("vae") or {})
    ident = vae if vae is not None else named.get("id")
    if ident is None:
        raise UserError("this model works on latents: pass a VAE (--vae: a local AutoencoderKL folder or a hub "
                        "name such as stabilityai/sd-vae-ft-ema) to decode them")
    model = load_vae(str(ident)) if isinstance(ident, (str, os.PathLike)) else ident
    model = model.to(device).eval().requires_grad_(False)
    scale = named.get("scale_factor") or float(model.config.scaling_factor)
    return model, float(scale)


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


class BatchSampler:
    """Batch b of a sample set, computable on its own: `sampler(b) -> (uint8 images, labels)`.

    Holds the model function (guided when cfg_scale != 1), the objective and its settings, the
    labels of the whole set and the decoding VAE; `num_batches` batches of `batch_size` (the last
    may be shorter).
    """

    def __init__(self, model: torch.nn.Module, objective, *, num: int, class_labels: Any = None,
                 sampler: str | None = None, steps: int | str | None = None, eta: float = 0.0,
                 cfg_scale: float = 1.0, guidance_channels: int | None = None, batch_size: int = 64,
                 seed: int = 0, device: str | torch.device = "cpu", vae=None, latent_scale: float | None = None,
                 image_size: int | None = None):
        if num < 1 or batch_size < 1:
            raise UserError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
        if sampler is not None and sampler not in objective.samplers:
            raise UserError(f"unknown sampler {sampler!r} for the {objective.name} objective; choose one of: "
                            f"{choices(objective.samplers)}")
        config = model.config
        self.C, num_classes = int(config.in_channels), int(config.num_classes)
        self.size = int(image_size or config.input_size)
        if vae is not None:
            latent_channels = int(vae.config.latent_channels)
            if latent_channels != self.C:
                raise UserError(f"the VAE's latents have {latent_channels} channels but the model takes {self.C}: "
                                f"latent channels do not match the model; use the VAE the model was trained with")
            latent_scale = float(latent_scale or vae.config.scaling_factor)
        elif self.C not in IMAGE_CHANNELS:
            raise UserError(f"the model makes {self.C}-channel latents, which are not images: pass a VAE to "
                            f"decode them")
        self.labels = resolve_labels(class_labels, num, num_classes, seed)
        self.fn = guided_model_fn(model, cfg_scale, guidance_channels)
        self.objective, self.sampler, self.steps, self.eta = objective, sampler, steps, eta
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.vae, self.latent_scale = vae, latent_scale
        self.num_batches = math.ceil(num / batch_size)

    @torch.no_grad()
    def __call__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.labels[b * self.batch_size:(b + 1) * self.batch_size]
        gen = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, b))
        shape = (len(y), self.C, self.size, self.size)
        noise = torch.randn(shape, generator=gen, device=self.device)
        x = self.objective.sample(self.fn, shape, sampler=self.sampler, steps=self.steps, eta=self.eta,
                                  noise=noise, model_kwargs={"y": y.to(self.device)}, generator=gen,
                                  device=self.device)
        return decode_and_quantize(x, self.vae, self.latent_scale), y


@torch.no_grad()
def generate(model: torch.nn.Module, objective, *, num: int, class_labels: Any = None, sampler: str | None = None,
             steps: int | str | None = None, eta: float = 0.0, cfg_scale: float = 1.0,
             guidance_channels: int | None = None, batch_size: int = 64, seed: int = 0,
             device: str | torch.device | None = None, vae=None, latent_scale: float | None = None,
             image_size: int | None = None, progress: bool = True, distributed: bool | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-conditional samples in memory: (images uint8 (num, C, H, W), labels int64 (num,)).

    class_labels: see `resolve_labels` ("random" for the ADM protocol). sampler/steps/eta: the
    objective's (None = its defaults); cfg_scale > 1 uses classifier-free guidance on
    `guidance_channels` (None = all). vae: an AutoencoderKL for latent models (with `latent_scale`,
    default its config's scaling factor). image_size: the model-space side (default the model's
    input_size). Under a multi-process launch (distributed None or True) each process samples every
    world-th batch and all get the gathered result. The model is moved to `device`. For large sets
    kept on disk and resumable, see `shards.sample_to_shards`.
    """
    state, dist = _distributed(distributed)
    device = torch.device(device) if device is not None else state.device
    batches = BatchSampler(model, objective, num=num, class_labels=class_labels, sampler=sampler, steps=steps,
                           eta=eta, cfg_scale=cfg_scale, guidance_channels=guidance_channels, batch_size=batch_size,
                           seed=seed, device=device, vae=vae, latent_scale=latent_scale, image_size=image_size)
    was_training = model.training
    model.to(device).eval()
    rank, world = (state.process_index, state.num_processes) if dist else (0, 1)
    mine = list(range(rank, batches.num_batches, world))
    results = []
    try:
        for b in track(mine, progress and rank == 0, "sampling", total=len(mine)):
            results.append((b, batches(b)[0]))
    finally:
        model.train(was_training)
    if dist:
        results = [r for part in all_gather(results) for r in part]
    images = torch.cat([imgs for _, imgs in sorted(results, key=lambda r: r[0])])
    return images, batches.labels
