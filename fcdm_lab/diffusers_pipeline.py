"""`FCDMPipeline`: a trained model as a diffusers `DiffusionPipeline`, DiTPipeline's interface.

    from fcdm_lab.diffusers_pipeline import FCDMPipeline
    pipe = FCDMPipeline.from_pretrained("runs/tiny-digits")          # a run folder
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=50).images

Every training run writes its EMA model as this pipeline into the run folder (`model_index.json`,
`model/`, `scheduler/`) and logs it as the MLflow artifact `pipeline/`. The schedulers are diffusers'
own, configured as ADM/DiT: linear betas, epsilon prediction, no clipping, learned-range variance.
They reproduce fcdm-lab's samplers (tests/test_diffusers.py cross-checks them):
- `DDPMScheduler(timestep_spacing="linspace")` = `--sampler ddpm --steps N` (ADM's N-of-T respacing);
- `DDIMScheduler(timestep_spacing="leading")` = fcdm-lab's DDIM on the "ddimN" respacing (stride T // N).
  fcdm-lab's `--sampler ddim --steps N` spaces N steps evenly (round(i (T-1) / (N-1))), which diffusers'
  DDIM cannot follow (it always steps back by T // N): there the two differ slightly.
Flow-matching models (`diffusion.objective = "flow"`) get no pipeline: diffusers'
FlowMatchEulerDiscreteScheduler runs time the other way (see fcdm_lab/diffusion/flow.py); their run
folder holds `model/` only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .diffusion import guided_model_fn
from .errors import UserError, choices
from .fileio import atomic_write_json, atomic_write_text, replaced_folder
from .inference.checkpoints import MODEL_INFO_FILE
from .inference.generation import IMAGE_CHANNELS, decode_and_quantize
from .models.pretrained import MODEL_SUBFOLDER

SCHEDULERS = ("ddpm", "ddim")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def adm_scheduler(sampler: str = "ddpm", *, num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02, learn_sigma: bool = True):
    """diffusers' DDPM or DDIM scheduler configured as fcdm-lab's (ADM's) diffusion.

    beta_start / beta_end are the T = 1000 values, scaled by 1000 / T as `linear_beta_schedule` does.
    """
    if sampler not in SCHEDULERS:
        raise UserError(f"no diffusers scheduler for sampler {sampler!r}; choose one of: {choices(SCHEDULERS)}")
    scale = 1000.0 / num_timesteps
    common = dict(num_train_timesteps=num_timesteps, beta_schedule="linear", beta_start=scale * beta_start,
                  beta_end=scale * beta_end, prediction_type="epsilon", clip_sample=False)
    if sampler == "ddpm":
        return DDPMScheduler(**common, timestep_spacing="linspace",
                             variance_type="learned_range" if learn_sigma else "fixed_large")
    return DDIMScheduler(**common, timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True)


class FCDMPipeline(DiffusionPipeline):
    """Class-conditional sampling from an FCDM (or DiT / DiCo) with a diffusers scheduler.

    Components: `model` (the denoiser, `model(x, t, y)`), `scheduler` (DDPMScheduler or DDIMScheduler,
    see `adm_scheduler`), `vae` (an AutoencoderKL for latent models, optional). `latent_scale`: the
    latents' scale factor (default the VAE's `scaling_factor`).
    """

    model_cpu_offload_seq = "model->vae"
    _optional_components = ["vae"]

    def __init__(self, model, scheduler, vae=None, latent_scale: Optional[float] = None):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler, vae=vae)
        self.register_to_config(latent_scale=latent_scale)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, Sequence[int], torch.Tensor],
        guidance_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: int = 250,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_channels: Optional[int] = None,
    ):
        """Sample one image per class label (DiTPipeline's arguments).

        guidance_scale: classifier-free guidance (1 = none; fcdm-lab's `--cfg-scale`), on all output
        channels unless `guidance_channels` (3 = the reference's legacy). output_type: "pil" (a list of
        PIL images), "np" (float NHWC in [0, 1]), "pt" (uint8 NCHW), "latent" (the model-space samples).
        """

        if output_type not in OUTPUT_TYPES:
            raise UserError(f"unknown output_type {output_type!r}; choose one of: {choices(OUTPUT_TYPES)}")
        config = self.model.config
        C, size, num_classes = int(config.in_channels), int(config.input_size), int(config.num_classes)
        labels = torch.as_tensor(class_labels).long().reshape(-1)
        if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"class_labels must be non-empty and in 0..{num_classes - 1} (the model has "
                            f"{num_classes} classes), got {labels.tolist()}")
        if output_type != "latent" and self.vae is None and C not in IMAGE_CHANNELS:
            raise UserError(f"the model makes {C}-channel latents: pass vae=AutoencoderKL.from_pretrained(...) "
                            f"to the pipeline, or output_type='latent'")
        device = self._execution_device
        dtype = next(self.model.parameters()).dtype
        y = labels.to(device)
        x = randn_tensor((len(y), C, size, size), generator=generator, device=device, dtype=dtype)
        x = x * self.scheduler.init_noise_sigma
        fn = guided_model_fn(self.model, guidance_scale, guidance_channels)
        learned = self.scheduler.config.get("variance_type") in ("learned", "learned_range")
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_in = self.scheduler.scale_model_input(x, t)
            out = fn(model_in, t.expand(len(y)).to(device), y)
            if not learned:  # a learned variance is only used by DDPMScheduler's learned_range mode
                out = out[:, :C]
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        self.maybe_free_model_hooks()

        if output_type == "latent":
            images = x
        else:
            scale = self.config.latent_scale or (self.vae.config.scaling_factor if self.vae is not None else None)
            uint8 = decode_and_quantize(x, self.vae, scale)
            if output_type == "pt":
                images = uint8
            else:
                nhwc = uint8.permute(0, 2, 3, 1).numpy()
                images = nhwc.astype(np.float32) / 255.0 if output_type == "np" else self._to_pil(nhwc)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    @staticmethod
    def _to_pil(nhwc: np.ndarray):
        from PIL import Image

        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in nhwc]


def save_run_pipeline(model: torch.nn.Module, cfg: Any, out_dir: str | os.PathLike,
                      data_info: dict | None = None, *, step: int | None = None,
                      model_info: dict | None = None) -> list[Path]:
    """Write a trained model in diffusers layout into its run folder; returns what was written.

    ddpm objective: the whole pipeline (model_index.json, model/, scheduler/), so both
    `FCDMPipeline.from_pretrained(out_dir)` and `FCDM.from_pretrained(out_dir)` work. flow: model/ only.
    model/fcdm_lab.json records the step, the model and data info and the run's config, so that the
    folder alone samples with the objective it was trained with (inference.load_checkpoint).
    Each part is written aside and swapped into place whole (fileio.replaced_folder).
    """

    out_dir = Path(out_dir)
    d = cfg.diffusion
    meta = {"format": "fcdm-lab-model", "step": step, "model_info": model_info, "data_info": data_info,
            "config": cfg.to_dict()}
    hint = "free some space, then run the same command with --resume latest"
    with replaced_folder(out_dir / MODEL_SUBFOLDER, hint=hint) as folder:
        model.save_pretrained(folder)
        atomic_write_json(folder / MODEL_INFO_FILE, meta)
    if d.objective != "ddpm":
        return [out_dir / MODEL_SUBFOLDER]
    scheduler = adm_scheduler("ddpm", num_timesteps=d.num_timesteps, beta_start=d.beta_start, beta_end=d.beta_end,
                              learn_sigma=bool(model.config.learn_sigma))
    scale = ((data_info or {}).get("vae") or {}).get("scale_factor")
    with replaced_folder(out_dir / "scheduler", hint=hint) as folder:
        scheduler.save_pretrained(folder)
    pipe = FCDMPipeline(model=model, scheduler=scheduler, latent_scale=scale)
    atomic_write_text(out_dir / pipe.config_name, pipe.to_json_string(), hint=hint)  # model_index.json
    return [out_dir / "model_index.json", out_dir / MODEL_SUBFOLDER, out_dir / "scheduler"]


__all__ = ["FCDMPipeline", "adm_scheduler", "save_run_pipeline"]
