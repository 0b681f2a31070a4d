"""Evaluate a trained model: sample with its EMA weights, compute metrics, log them to its run.

    metrics = evaluate_checkpoint("runs/tiny/checkpoints/step_0001500.pt")     # the CLI's evaluate
    metrics = evaluate_model(model, cfg, tracker=tracker, step=1500)           # in-process (ablate)

The metric names and what judges them: eval/metrics.py.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Iterable, Mapping

import torch

from ..accel import configure_tf32
from ..config import ExperimentConfig
from ..errors import UserError, choices
from ..inference.checkpoints import load_checkpoint, objective_for
from ..inference.generation import IMAGE_CHANNELS, generate, load_vae_for
from ..inference.samples import grid_array
from ..tracking.client import RunPointer, attach_run, get_client, tracked_run
from ..urls import redact
from .classifier import get_classifier
from .heldout import heldout_loss, split_metric_names
from .protocol import evaluate_protocol, get_protocol, require_reference
from .samples_io import check_sample_source, save_npz
from .metrics import (CLASSIFIER_DATA, INCEPTION_METRICS, ISC_SPLITS, REFERENCES, check_metric_names, check_metrics_for,
                      expand_metric_names, plan_metrics, reference_for, result_key_matches)

GRID_SIZE = 64

def compute_sample_metrics(images: torch.Tensor, labels: torch.Tensor | None, *, metrics: Iterable[str],
                           reference, data_name: str, inception_weights=None) -> Dict[str, float]:
    """Metrics of a uint8 sample set (N, C, H, W) by the names above; `labels` are the classes the
    samples were conditioned on (needed for class_acc_*)."""
    from .fidelity import compute_metrics  # torch-fidelity: seconds to import, only when metrics are computed

    plan = plan_metrics(metrics)
    out: Dict[str, float] = {}
    for tag, data in CLASSIFIER_DATA.items():
        judged = plan["labels"] == tag
        if not (plan[tag] or judged):
            continue
        if data_name != data:
            raise UserError(f"*_{tag} metrics judge with the {tag} classifier and need data.name = {data!r} "
                            f"(got {data_name!r}); use the *_inception metrics ({choices(INCEPTION_METRICS)})")
        if judged and labels is None:
            raise UserError(f"class_acc_{tag} needs the class labels the samples were conditioned on")

        # Train/cache the judge here, with autograd on: class_consistency runs under torch.no_grad,
        # where a first-use training of the classifier would fail.
        get_classifier(tag, "cpu")
        out.update(compute_metrics(images, reference, extractor=tag, metrics=plan[tag],
                                   labels=labels if judged else None))
    if plan["inception"]:
        out.update(compute_metrics(images, reference, extractor="inception", metrics=plan["inception"],
                                   inception_weights=inception_weights))
    wanted = list(metrics)
    return {k: v for k, v in out.items()
            if any(result_key_matches(w, k[:-4] if k.endswith("_std") else k) for w in wanted)}


def check_inputs(*, samples=None, reference=None, inception_weights=None, min_samples: int = 1) -> None:
    """Refuse bad evaluation input before anything is created or sampled: the samples and the
    reference (a named reference set, or a folder / .npz checked from its headers; an .npz of
    precomputed FID statistics counts), and the Inception weights file."""
    from .fidelity import check_inception_weights  # torch-fidelity: seconds to import

    if samples is not None:
        count = check_sample_source(samples, "samples")
        if count is not None and count < min_samples:
            raise UserError(f"samples {str(samples)!r} hold {count} images; the protocol's metrics need at least "
                            f"{min_samples} (Inception Score: one per split)")
    if reference is not None and not (isinstance(reference, str) and reference in REFERENCES):
        path = Path(reference)
        if not path.exists():
            raise UserError(f"reference {str(reference)!r} is neither an existing folder / .npz file nor a "
                            f"reference name ({choices(REFERENCES)})")
        if not _has_fid_statistics(path):
            check_sample_source(path, "reference")
    if inception_weights is not None:  # tensors only, the published file's sha256: never unpickled
        check_inception_weights(inception_weights)


def _has_fid_statistics(path: Path) -> bool:
    """An .npz with precomputed FID statistics (mu, sigma), as the ADM reference batches carry."""
    import zipfile

    if path.suffix != ".npz" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return {"mu.npy", "sigma.npy"} <= set(z.namelist())


def _grid(images: torch.Tensor):
    """First GRID_SIZE samples as one HWC uint8 array (small images enlarged, as the trainer's grids)."""

    return grid_array(images[:GRID_SIZE], nrow=8)


def evaluate_model(model: torch.nn.Module, cfg, *, num_samples: int | None = None, metrics: Iterable[str] | None = None,
                   reference=None, sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                   inception_weights=None, seed: int = 0, batch_size: int | None = None, device="cpu",
                   tracker=None, step: int | None = None, weights: str = "ema", data_info: Mapping | None = None,
                   save_dir=None, progress: bool = True, objective=None, vae=None) -> Dict[str, float]:
    """Sample `num_samples` images from a loaded model (settings default to cfg.eval), compute
    `metrics` and, with a tracker, log them at `step` with the sample grid and tag eval.weights.
    `weights` ("ema" | "raw") only labels what the model holds; `data_info` (the trainer's) names
    the VAE of latent models (`vae`: another one). `objective`: the diffusion objective (default:
    cfg's). Returns {metric: value} (KID/IS with their _std companions)."""

    ev = cfg.eval
    metrics = check_metric_names(expand_metric_names(ev.metrics if metrics is None else metrics, cfg.data.name))
    heldout, metrics = split_metric_names(metrics)
    values: Dict[str, float] = {}
    if heldout:  # the training objective's loss on the held-out split: no sampling
        values = heldout_loss(model, cfg, objective=objective, device=device)
        if tracker is not None:
            tracker.log_metrics(values, step=step or 0)
    if not metrics:
        return values
    num = ev.num_samples if num_samples is None else num_samples
    if num < 1:
        raise UserError(f"num_samples must be >= 1, got {num}")
    reference = reference or reference_for(cfg)
    inception_weights = inception_weights or ev.inception_weights
    if plan_metrics(metrics)["inception"] and inception_weights:
        check_inputs(inception_weights=inception_weights)  # before sampling
    objective = objective or objective_for(cfg, model)
    scale = None
    if vae is not None or (data_info or {}).get("vae") or int(model.config.in_channels) not in IMAGE_CHANNELS:
        vae, scale = load_vae_for(dict(data_info or {}), vae, device)

    start = time.time()
    # labels None: classes cycle 0..K-1, a balanced sample set
    images, labels = generate(model, objective, num=num, class_labels=None, sampler=sampler or ev.sampler,
                              steps=steps or ev.steps, eta=ev.eta,
                              cfg_scale=ev.cfg_scale if cfg_scale is None else cfg_scale,
                              guidance_channels=ev.guidance_channels, batch_size=batch_size or ev.batch_size,
                              seed=seed, device=device, vae=vae, latent_scale=scale, progress=progress,
                              distributed=False)
    sample_time = time.time() - start
    if save_dir is not None:
        save_npz(Path(save_dir) / f"samples_{weights}_step{step or 0}_n{num}.npz", images)
    values.update(compute_sample_metrics(images, labels, metrics=metrics, reference=reference,
                                         data_name=cfg.data.name, inception_weights=inception_weights))
    if tracker is not None:
        tracker.log_metrics({**values, "eval.num_samples": num, "eval.sample_time_s": sample_time,
                             "eval.wall_time_s": time.time() - start}, step=step or 0)
        tracker.set_tags({"eval.weights": weights, "eval.reference": str(reference), "eval.seed": seed})
        tracker.log_image(_grid(images), "eval_samples", step or 0)
    return values


def evaluate_checkpoint(checkpoint, *, num_samples: int | None = None, metrics: Iterable[str] | None = None,
                        reference=None, sampler: str | None = None, steps: int | None = None,
                        cfg_scale: float | None = None, use_ema: bool = True, inception_weights=None, seed: int = 0,
                        run_id: str | None = None, uri: str | None = None, batch_size: int | None = None,
                        tracker=None, progress: bool = True, console=None, protocol: str | None = None,
                        samples=None, vae=None, objective: str | None = None, time_scale: float | None = None,
                        guidance_channels: int | None | str = "protocol", out_dir=None, tf32: bool = True,
                        track: bool = True) -> Dict[str, float]:
    """The `fcdm-lab evaluate` library function: load a checkpoint (EMA weights unless use_ema=False),
    sample, compute metrics and log them into its training run (`run_id`, else the one recorded in
    the training folder's mlflow_run.json), or into a new evaluation run tagged with the source
    when the training run is unknown (track=False: log nothing). Returns {metric: value}.

    protocol="adm": the paper's FID-50K protocol (eval/protocol.py): sampled into resumable shards
    under `out_dir` (default <run>/eval/adm-...), metrics fid50k, is50k, precision50k, recall50k;
    `samples` (a folder or .npz) scores existing samples instead (no checkpoint needed). The
    objective (and flow time scale) is the checkpoint's (config or reference args) unless `objective`
    / `time_scale` are given; `vae` decodes latents; tf32: TF32 CUDA math (the reference's setting).
    """

    say = console.print if console is not None else (print if progress else (lambda *a, **k: None))
    if protocol is not None or samples is not None:

        protocol = get_protocol(protocol or "adm").name
    check_inputs(samples=samples, reference=reference, inception_weights=inception_weights,
                 min_samples=ISC_SPLITS if samples is not None else 1)
    if checkpoint is None:
        if samples is None:
            raise UserError("give a checkpoint to evaluate (--checkpoint) or existing samples to score (--samples)")

        require_reference(reference)
        return _log_samples_eval(samples, lambda tr: evaluate_protocol(
            reference=reference, protocol=protocol, samples=samples, inception_weights=inception_weights,
            tracker=tr, progress=progress), track=track, uri=uri, say=say, run_id=run_id)
    path = Path(checkpoint)
    if not path.exists():
        raise UserError(f"checkpoint {str(path)!r} does not exist (a training folder's checkpoints/step_*.pt "
                        f"or ema.safetensors)")
    from accelerate import PartialState

    state = PartialState()  # under `accelerate launch` each process samples its share on its own device
    device = state.device if state.num_processes > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda":
        configure_tf32(tf32)
    model, cfg, info = load_checkpoint(path, use_ema=use_ema, device=device)
    info = dict(info or {})
    obj = objective_for(cfg, model, info, objective=objective, time_scale=time_scale)
    data_info = info.get("data_info") or {}
    if cfg is None:  # a reference checkpoint: no recorded config, evaluation settings from the defaults

        cfg = ExperimentConfig(name=path.stem)
        cfg.data.name = data_info.get("name", "latents" if int(model.config.in_channels) == 4 else "unknown")
    weights = "ema" if info.get("weights", "ema" if use_ema else "model") == "ema" else "raw"
    step = info.get("step")
    check_inputs(reference=reference or cfg.eval.reference, inception_weights=inception_weights or cfg.eval.inception_weights)
    if protocol is None:  # every refusal before a run is opened or a sample drawn
        check_metrics_for(cfg.eval.metrics if metrics is None else metrics, cfg.data.name)
    else:

        require_reference(reference or cfg.eval.reference)
    say(f"Evaluating the {'EMA' if weights == 'ema' else 'raw (non-EMA)'} weights of {path}"
        + (f" (step {step})" if step is not None else "") + f" ({obj.name}"
        + (f", time scale {obj.time_scale:g}" if obj.name == "flow" else "")
        + f", from {'the command line' if objective or time_scale else (info.get('diffusion') or {}).get('source', 'config')})")
    if protocol is not None:

        scale = None
        if vae is not None or int(model.config.in_channels) not in IMAGE_CHANNELS:
            vae, scale = load_vae_for(data_info, vae, device)
        reference = reference or cfg.eval.reference
        folder = Path(out_dir) if out_dir is not None else _eval_dir(path) / (
            f"{protocol}-{weights}-step{step or 0}-cfg{cfg_scale or 1.0:g}-seed{seed}")
        pkw = dict(reference=reference, protocol=protocol, model=model, objective=obj, samples=samples,
                   out_dir=folder, inception_weights=inception_weights or cfg.eval.inception_weights,
                   step=step, weights=weights, progress=progress, num_samples=num_samples,
                   cfg_scale=1.0 if cfg_scale is None else cfg_scale, guidance_channels=guidance_channels,
                   sampler=sampler, steps=steps, batch_size=batch_size or cfg.eval.batch_size, seed=seed,
                   device=device, vae=vae, latent_scale=scale,
                   source={"checkpoint": str(path.resolve()), "weights": weights, "step": step})

        def run(tr):
            return evaluate_protocol(tracker=tr, **pkw)
    else:
        kwargs = dict(num_samples=num_samples, metrics=metrics, reference=reference, sampler=sampler, steps=steps,
                      cfg_scale=cfg_scale, inception_weights=inception_weights, seed=seed, batch_size=batch_size,
                      step=step, weights=weights, data_info=data_info, save_dir=_eval_dir(path),
                      device=device, progress=progress, objective=obj, vae=vae)

        def run(tr):
            return evaluate_model(model, cfg, tracker=tr, **kwargs)
    if tracker is not None or not track or not state.is_main_process:
        return run(tracker if state.is_main_process else None)  # only the main process logs

    pointer = RunPointer.find(path)
    target = None
    if run_id is not None:
        target = attach_run(run_id, uri)
    elif pointer is not None:
        try:
            target = attach_run(pointer.run_id, uri or pointer.tracking_uri)
            uri = uri or pointer.tracking_uri
        except UserError:
            say(f"training run {pointer.run_id} (recorded in {redact(pointer.tracking_uri)}) is not in this store; "
                f"logging to a new evaluation run")
        if target is not None and target.client.get_run(target.run_id).data.tags.get("kind") == "ablation-child":
            # a study's report reads its children's metrics: another evaluation must not replace them
            say(f"run {target.run_id} is a study child; logging to a new evaluation run linked to it "
                f"(pass --run-id to log into it anyway)")
            target = None
    else:
        get_client(uri)  # probe the store before sampling, not after
    if target is not None:
        values = run(target)
        say(f"Logged to run {target.run_id}")
        return values
    tags = {"kind": "evaluation", "fcdm.source_checkpoint": str(path.resolve()),
            "fcdm.source_run": pointer.run_id if pointer else None}
    with tracked_run(f"eval-{cfg.name}", uri=uri, tags=tags) as tr:
        values = run(tr)
    say(f"Logged to new run {tr.run_id}")
    return values


def _log_samples_eval(samples, run, *, track: bool, uri: str | None, say, run_id: str | None = None
                      ) -> Dict[str, float]:
    """Score existing samples (no checkpoint) into `run_id`, else a new evaluation run (or none:
    track=False)."""
    if not track:
        return run(None)

    if run_id is not None:
        target = attach_run(run_id, uri)  # the store and the run must exist: nothing is created
        values = run(target)
        say(f"Logged to run {target.run_id}")
        return values
    tags = {"kind": "evaluation", "fcdm.source_samples": str(Path(samples).resolve())}
    with tracked_run(f"eval-{Path(samples).stem}", uri=uri, tags=tags) as tr:
        values = run(tr)
    say(f"Logged to new run {tr.run_id}")
    return values


def _eval_dir(checkpoint: Path) -> Path:
    """Samples are kept next to the training folder: <out_dir>/eval/."""
    if checkpoint.is_dir():
        return checkpoint / "eval"
    folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return folder / "eval"
