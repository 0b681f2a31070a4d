"""Evaluate a trained model: sample with its EMA weights, compute metrics, log them to its run.

    metrics = evaluate_checkpoint("runs/tiny/checkpoints/step_0001500.pt")     # the CLI's evaluate
    metrics = evaluate_model(model, cfg, tracker=tracker, step=1500)           # in-process (ablate)

Metric names say which features judged them (facts: proxy metrics must never pass for FID-50K):
  fid_digits, kid_digits, is_digits, precision_digits, recall_digits   the digits CNN's features
  class_acc_digits                                                     share of samples the digits
                                                                       classifier labels as their class
  fid_fashion, ..., class_acc_fashion                                  the same with the Fashion-MNIST CNN
  fid_inception, kid_inception, is_inception, precision_inception, recall_inception
                                                                       Inception-v3; the result key
                                                                       carries the sample count
                                                                       (fid_inception_5k)
Short names (fid, kid, is, prc) pick the digits CNN for digits data, the Fashion-MNIST CNN for
fashion-mnist and Inception otherwise.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping

import torch

from ..errors import UserError, choices
from ..urls import redact

FEATURE_METRICS = {"fid": "fid", "kid": "kid", "is": "is", "precision": "prc", "recall": "prc"}
EXTRACTOR_TAGS = ("digits", "inception", "fashion")
CLASS_ACC = "class_acc_digits"
CLASSIFIER_DATA = {"digits": "digits", "fashion": "fashion-mnist"}  # our CNN judges -> the data they judge
CLASS_ACCS = {f"class_acc_{tag}": tag for tag in CLASSIFIER_DATA}
METRIC_NAMES = tuple([f"{m}_{tag}" for tag in EXTRACTOR_TAGS for m in FEATURE_METRICS] + list(CLASS_ACCS))
INCEPTION_METRICS = tuple(f"{m}_inception" for m in FEATURE_METRICS)
GRID_SIZE = 64


def check_metric_names(names: Iterable[str]) -> List[str]:
    names = list(names)
    if not names:
        raise UserError(f"no metrics requested; valid: {choices(METRIC_NAMES)}")
    bad = [n for n in names if n not in METRIC_NAMES]
    if bad:
        raise UserError(f"unknown metric {bad[0]!r}; valid: {choices(METRIC_NAMES)}")
    return names


def expand_metric_names(names: Iterable[str], data_name: str) -> List[str]:
    """Short names as torch-fidelity calls them ("fid", "kid", "is", "prc") -> the judged names:
    the dataset's own CNN for digits / fashion-mnist data, Inception otherwise. Full names pass through."""
    tag = next((t for t, data in CLASSIFIER_DATA.items() if data == data_name), "inception")
    out: List[str] = []
    for name in names:
        short = {"prc": ["precision", "recall"]}.get(name, [name] if name in FEATURE_METRICS else None)
        for n in ([f"{m}_{tag}" for m in short] if short else [name]):
            if n not in out:
                out.append(n)
    return out


def plan_metrics(names: Iterable[str]) -> Dict[str, Any]:
    """{"digits": torch-fidelity metrics for the digits CNN, "fashion": ..., "inception": ...,
    "labels": the CNN judging class consistency ("digits" | "fashion") or False}."""
    plan: Dict[str, Any] = {"digits": [], "fashion": [], "inception": [], "labels": False}
    for name in check_metric_names(names):
        if name in CLASS_ACCS:
            if plan["labels"] and plan["labels"] != CLASS_ACCS[name]:
                raise UserError("class_acc_digits and class_acc_fashion judge different data; ask for one")
            plan["labels"] = CLASS_ACCS[name]
            continue
        metric, tag = name.rsplit("_", 1)
        fid_name = FEATURE_METRICS[metric]
        if fid_name not in plan[tag]:
            plan[tag].append(fid_name)
    return plan


def result_key_matches(requested: str, key: str) -> bool:
    """Does a result key answer a requested metric? 'fid_inception' -> 'fid_inception_5k'
    (the sample count is added to Inception metrics); '_std' companions do not count."""
    if key.endswith("_std"):
        return False
    return key == requested or (requested.endswith("_inception") and key.startswith(requested + "_"))


def metric_key(requested: str, keys: Iterable[str]) -> str | None:
    """The result key among `keys` that answers `requested` (None if absent)."""
    return next((k for k in sorted(keys) if result_key_matches(requested, k)), None)


def default_reference(cfg) -> str:
    """The real images to compare with when none is given: the training split for digits / fashion-mnist."""
    if cfg.data.name == "digits":
        return "digits-train"
    if cfg.data.name == "fashion-mnist":
        return "fashion-train"
    raise UserError(f"give a reference set for data {cfg.data.name!r} (--reference / eval.reference): a folder "
                    f"of PNGs or an ADM .npz of real images; 'digits-train' and 'digits-test' serve digits data")


def reference_for(cfg):
    """The reference set an evaluation of `cfg` scores against: eval.reference, else the default."""
    return cfg.eval.reference or default_reference(cfg)


def compute_sample_metrics(images: torch.Tensor, labels: torch.Tensor | None, *, metrics: Iterable[str],
                           reference, data_name: str, inception_weights=None) -> Dict[str, float]:
    """Metrics of a uint8 sample set (N, C, H, W) by the names above; `labels` are the classes the
    samples were conditioned on (needed for class_acc_*)."""
    from . import compute_metrics

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
        from .classifier import get_classifier

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


def check_metrics_for(metrics: Iterable[str], data_name: str) -> List[str]:
    """The metric names an evaluation of `data_name` data will compute (short names expanded), or a
    one-line UserError: an unknown name, or a dataset CNN's metric on other data."""
    names = check_metric_names(expand_metric_names(metrics, data_name))
    plan = plan_metrics(names)
    for tag, data in CLASSIFIER_DATA.items():
        if (plan[tag] or plan["labels"] == tag) and data_name != data:
            raise UserError(f"*_{tag} metrics judge with the {tag} classifier and need data.name = {data!r} "
                            f"(got {data_name!r}); use the *_inception metrics ({choices(INCEPTION_METRICS)})")
    return names


def check_inputs(*, samples=None, reference=None, inception_weights=None, min_samples: int = 1) -> None:
    """Refuse bad evaluation input before anything is created or sampled: the samples and the
    reference (a named reference set, or a folder / .npz checked from its headers; an .npz of
    precomputed FID statistics counts), and the Inception weights file."""
    from .fidelity import REFERENCES, check_inception_weights
    from .samples_io import check_sample_source

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
    from ..inference import grid_array

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
    from ..inference import IMAGE_CHANNELS, generate, load_vae_for, objective_for

    ev = cfg.eval
    metrics = check_metric_names(expand_metric_names(ev.metrics if metrics is None else metrics, cfg.data.name))
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
        from .samples_io import save_npz

        save_npz(Path(save_dir) / f"samples_{weights}_step{step or 0}_n{num}.npz", images)
    values = compute_sample_metrics(images, labels, metrics=metrics, reference=reference, data_name=cfg.data.name,
                                    inception_weights=inception_weights)
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
    from ..accel import configure_tf32
    from ..tracking import RunPointer, attach_run, get_client, tracked_run
    from ..inference import load_checkpoint, objective_for

    say = console.print if console is not None else (print if progress else (lambda *a, **k: None))
    if protocol is not None or samples is not None:
        from .protocol import get_protocol

        protocol = get_protocol(protocol or "adm").name
    from .fidelity import ISC_SPLITS  # torch-fidelity: seconds to import, only when evaluating

    check_inputs(samples=samples, reference=reference, inception_weights=inception_weights,
                 min_samples=ISC_SPLITS if samples is not None else 1)
    if checkpoint is None:
        if samples is None:
            raise UserError("give a checkpoint to evaluate (--checkpoint) or existing samples to score (--samples)")
        from .protocol import evaluate_protocol, require_reference

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
        from ..config import ExperimentConfig

        cfg = ExperimentConfig(name=path.stem)
        cfg.data.name = data_info.get("name", "latents" if int(model.config.in_channels) == 4 else "unknown")
    weights = "ema" if info.get("weights", "ema" if use_ema else "model") == "ema" else "raw"
    step = info.get("step")
    check_inputs(reference=reference or cfg.eval.reference, inception_weights=inception_weights or cfg.eval.inception_weights)
    if protocol is None:  # every refusal before a run is opened or a sample drawn
        check_metrics_for(cfg.eval.metrics if metrics is None else metrics, cfg.data.name)
    else:
        from .protocol import require_reference

        require_reference(reference or cfg.eval.reference)
    say(f"Evaluating the {'EMA' if weights == 'ema' else 'raw (non-EMA)'} weights of {path}"
        + (f" (step {step})" if step is not None else "") + f" ({obj.name}"
        + (f", time scale {obj.time_scale:g}" if obj.name == "flow" else "")
        + f", from {'the command line' if objective or time_scale else (info.get('diffusion') or {}).get('source', 'config')})")
    if protocol is not None:
        from ..inference import IMAGE_CHANNELS, load_vae_for
        from .protocol import evaluate_protocol

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
    from ..tracking import attach_run, tracked_run

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
