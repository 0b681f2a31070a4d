"""Evaluation protocols that papers report, reproduced exactly: `--protocol adm` is the FID-50K of
ADM / DiT / the FCDM paper.

adm: 50,000 samples, labels drawn uniformly at random, 250-step DDPM (a flow model: the reference's
250-step SDE sampler), classifier-free guidance at the given scale on the first 3 latent channels
(the reference's forward_with_cfg), images rounded to uint8 and stored as an .npz under the
reference's key `arr`; scored with Inception-v3 (torch-fidelity's port of the TF-FID network)
against the ADM reference batch, whose precomputed `mu`/`sigma` (statistics of the whole training
set) are used for FID when the .npz carries them; FID, IS, precision and recall, named with the
sample count: fid50k, is50k, precision50k, recall50k.

Sampling goes to one shard per batch under `out_dir/shards` (inference.shards): distributed under
accelerate, resumable (finished shards are kept; a killed evaluation resumes where it stopped), with
a progress bar. An existing sample folder or .npz (key arr or arr_0) is scored without sampling.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from ..errors import UserError, choices
from ..fileio import atomic_write
from ..inference.generation import BatchSampler
from ..inference.shards import read_shards, sample_to_shards
from .metrics import count_tag


@dataclass(frozen=True)
class Protocol:
    name: str
    num_samples: int
    labels: str                      # "random" | "cycle" (inference.generation.LABEL_MODES)
    steps: int
    samplers: Dict[str, str]         # objective name -> sampler
    guidance_channels: int | None    # None = all channels
    metrics: tuple                   # torch-fidelity's names (fidelity.METRICS)
    npz_key: str


PROTOCOLS = {
    "adm": Protocol(name="adm", num_samples=50_000, labels="random", steps=250,
                    samplers={"ddpm": "ddpm", "flow": "sde"}, guidance_channels=3,
                    metrics=("fid", "is", "prc"), npz_key="arr"),
}

_RENAME = {"fid": "fid", "is": "is", "precision": "precision", "recall": "recall", "kid": "kid"}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"unknown evaluation protocol {name!r}; choose one of: {choices(PROTOCOLS)}")
    return PROTOCOLS[name]


def protocol_metric_names(values: Dict[str, float], n: int) -> Dict[str, float]:
    """compute_metrics' Inception keys -> the protocol's: fid_inception_50k -> fid50k,
    is_inception_50k_std -> is50k_std, precision_inception_50k -> precision50k."""
    tag = count_tag(n)
    out = {}
    for key, value in values.items():
        metric, rest = key.split("_inception_", 1)
        out[f"{_RENAME[metric]}{tag}{'_std' if rest.endswith('_std') else ''}"] = value
    return out


def score_samples(samples, reference, *, protocol: str = "adm", inception_weights=None,
                  cache_dir=None) -> Dict[str, float]:
    """The protocol's metrics of a sample set: a uint8 tensor (N, C, H, W), a folder of images or an
    .npz (key arr or arr_0), against `reference` (the ADM reference batch .npz: its mu/sigma are
    used for FID when present; a reference with only mu/sigma gives FID and IS, no precision/recall)."""
    from .fidelity import compute_metrics, reference_statistics, resolve_images

    p = get_protocol(protocol)
    images = resolve_images(samples, "samples")
    metrics = p.metrics
    stats = reference_statistics(reference)
    if stats is not None and not stats["has_images"]:  # mu/sigma only: precision/recall need real images
        metrics = tuple(m for m in metrics if m in ("fid", "is"))
    values = compute_metrics(images, reference, extractor="inception", metrics=metrics,
                             inception_weights=inception_weights, cache_dir=cache_dir)
    return protocol_metric_names(values, len(images))


def sample_for_protocol(model: torch.nn.Module, objective, out_dir, *, protocol: str = "adm",
                        num_samples: int | None = None, cfg_scale: float = 1.0,
                        guidance_channels: int | None | str = "protocol", sampler: str | None = None,
                        steps: int | None = None, batch_size: int = 125, seed: int = 0, device="cpu", vae=None,
                        latent_scale: float | None = None, source: dict | None = None, progress: bool = True
                        ) -> dict:
    """Sample the protocol's set into `out_dir` (shards/, then samples.npz under the protocol's key,
    written by the main process); resumes from the shards already there. Returns {"npz", "num",
    "settings", "sampled", "reused"}."""
    from accelerate import PartialState


    p = get_protocol(protocol)
    num = p.num_samples if num_samples is None else int(num_samples)
    sampler = sampler or p.samplers.get(objective.name, objective.default_sampler)
    steps = p.steps if steps is None else steps
    gc = p.guidance_channels if guidance_channels == "protocol" else guidance_channels
    if gc is not None:
        gc = min(gc, int(model.config.in_channels))  # 3 of 4 latent channels; all of a 1- or 3-channel image
    model.to(device).eval()
    batches = BatchSampler(model, objective, num=num, class_labels=p.labels, sampler=sampler, steps=steps,
                           cfg_scale=cfg_scale, guidance_channels=gc, batch_size=batch_size, seed=seed,
                           device=device, vae=vae, latent_scale=latent_scale)
    settings = {"protocol": p.name, "num": num, "labels": p.labels, "objective": objective.name,
                "time_scale": getattr(objective, "time_scale", None), "sampler": sampler, "steps": steps,
                "cfg_scale": cfg_scale, "guidance_channels": gc, **(source or {})}
    out_dir = Path(out_dir)
    run = sample_to_shards(batches, out_dir / "shards", settings=settings, progress=progress)
    npz = out_dir / "samples.npz"
    state = PartialState()
    if state.is_main_process:
        images, labels = read_shards(out_dir / "shards", batches.num_batches)
        nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
        atomic_write(npz, lambda f: np.savez(f, **{p.npz_key: nhwc}, labels=labels.numpy().astype(np.int64)))
    state.wait_for_everyone()
    return {"npz": npz, "num": num, "settings": {**settings, "seed": seed, "batch_size": batch_size},
            "sampled": run["sampled"], "reused": run["reused"]}


def require_reference(reference) -> None:
    if reference is None:
        raise UserError("the adm protocol scores against the ADM reference batch: pass --reference "
                        "PATH/VIRTUAL_imagenet256_labeled.npz (or another .npz / image folder of real images)")


def evaluate_protocol(*, reference, protocol: str = "adm", model: torch.nn.Module | None = None, objective=None,
                      samples=None, out_dir=None, inception_weights=None, tracker=None, step: int | None = None,
                      weights: str = "ema", progress: bool = True, cache_dir=None, **sampling: Any
                      ) -> Dict[str, float]:
    """Score `samples` (existing files) or sample `model` by the protocol into `out_dir` first
    (`sampling`: sample_for_protocol's settings), then compute the protocol's metrics against
    `reference`; with a tracker, log them at `step` with the sampling settings as tags."""
    from accelerate import PartialState

    require_reference(reference)
    start = time.time()
    settings: dict = {"protocol": protocol}
    if samples is None:
        if model is None or out_dir is None:
            raise UserError("give a model to sample (and an output folder) or existing samples to score")
        run = sample_for_protocol(model, objective, out_dir, protocol=protocol, progress=progress, **sampling)
        samples, settings = run["npz"], run["settings"]
    sample_time = time.time() - start
    values: Dict[str, float] = {}
    if PartialState().is_main_process:
        values = score_samples(samples, reference, protocol=protocol, inception_weights=inception_weights,
                               cache_dir=cache_dir)
        if tracker is not None:
            tracker.log_metrics({**values, "eval.sample_time_s": sample_time,
                                 "eval.wall_time_s": time.time() - start}, step=step or 0)
            tracker.set_tags({"eval.weights": weights, "eval.reference": str(reference),
                              "eval.samples": str(samples),
                              **{f"eval.{k}": v for k, v in settings.items() if v is not None}})
    return values
