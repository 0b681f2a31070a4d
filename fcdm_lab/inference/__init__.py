"""Inference in one place: loading checkpoints (ours and the reference's) with the objective they
need, generating class-conditional samples, writing sample sets, and resumable sharded sampling.
Training (sample grids) and evaluation both use it; neither imports the other.

    model, cfg, info = load_checkpoint("runs/tiny/checkpoints/step_0001500.pt")   # EMA weights
    images, labels = generate(model, objective_for(cfg, model, info), num=100, steps=50, sampler="ddim")
    sample_checkpoint("runs/tiny", "runs/tiny/samples-ddim50", num=500, steps=50, sampler="ddim")
"""
from .checkpoints import diffusion_settings, infer_fcdm_kwargs, load_checkpoint, objective_for, reference_diffusion
from .generation import (IMAGE_CHANNELS, BatchSampler, decode_and_quantize, generate, grid_labels, load_vae_for,
                         resolve_labels)
from .samples import default_steps, grid_array, sample_checkpoint, save_grid, write_samples

__all__ = ["IMAGE_CHANNELS", "BatchSampler", "decode_and_quantize", "default_steps", "diffusion_settings",
           "generate", "grid_array", "grid_labels", "infer_fcdm_kwargs", "load_checkpoint", "load_vae_for",
           "objective_for", "reference_diffusion", "resolve_labels", "sample_checkpoint", "save_grid",
           "write_samples"]
