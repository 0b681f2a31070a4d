"""The public Python API (`fcdm_lab.train`, ...; imported by `fcdm_lab/__init__.py`): train, load, sample, ablate.

    import fcdm_lab
    result = fcdm_lab.train("tiny-digits")                        # a run folder, logged to MLflow
    model = fcdm_lab.load_model(result.out_dir)                   # or a checkpoint, or an MLflow run id
    images = fcdm_lab.sample(model, class_labels=range(10), sampler="ddim", steps=50)

Each function is a thin door to the library function the CLI command of the same name uses. The
imports of the library are inside the functions, so that `import fcdm_lab` loads no torch, MLflow or
Optuna (the CLI starts in a fraction of a second).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UserError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # MLflow's run ids


def train(experiment: str = "tiny-digits", *, steps: int | None = None, seed: int | None = None,
          out: str | os.PathLike | None = None, overrides: Mapping[str, Any] | Sequence[str] | None = None,
          resume: str | None = None, track: bool = True, tracking_uri: str | None = None):
    """Train an experiment (a name in experiments/ or a .toml path) like `fcdm-lab train`.

    overrides: {"train.lr": 1e-3} or ["train.lr=1e-3"] (`--set`). out: the run folder (default
    runs/<experiment>). Returns the TrainResult (out_dir, step, checkpoint, final_loss, ...); with
    track=True the run is logged to MLflow (its id is in `<out_dir>/mlflow_run.json`).
    """
    from .config import load_experiment
    from .schema import parse_override

    items = dict(parse_override(o) for o in overrides) if isinstance(overrides, (list, tuple)) else dict(overrides or {})
    if steps is not None:
        items["train.steps"] = steps
    if seed is not None:
        items["train.seed"] = seed
    cfg = load_experiment(experiment, items)
    out_dir = Path(out) if out is not None else Path("runs") / cfg.name
    if not track:
        from .training.trainer import train as train_untracked

        return train_untracked(cfg, out_dir, resume=resume)
    from .runner import train_tracked

    result, _run_id = train_tracked(cfg, out_dir, uri=tracking_uri, resume=resume)
    return result


def _download_run_model(run_id: str, tracking_uri: str | None) -> Path:
    """The model of an MLflow run, downloaded: its `pipeline/` artifact, else `weights/ema.safetensors`."""
    from .tracking.client import get_client, get_run

    client = get_client(tracking_uri)
    get_run(run_id, client=client)  # a UserError naming the store when there is no such run
    dest = Path(tempfile.mkdtemp(prefix=f"fcdm-lab-{run_id[:8]}-"))
    names = {a.path for a in client.list_artifacts(run_id)}
    if "pipeline" in names:
        return Path(client.download_artifacts(run_id, "pipeline", str(dest)))
    if "weights" in names:
        return Path(client.download_artifacts(run_id, "weights/ema.safetensors", str(dest)))
    raise UserError(f"MLflow run {run_id} has no model artifact (pipeline/ or weights/); only training runs do")


def _load(source, device, use_ema: bool, tracking_uri: str | None):
    """(model, config or None, info) from anything `load_model` takes."""
    from .inference.checkpoints import load_checkpoint

    path = Path(os.fspath(source))
    if not path.exists():
        if not RUN_ID.match(str(source)):
            raise UserError(f"{str(source)!r} is neither a file or folder nor an MLflow run id (32 hex digits)")
        path = _download_run_model(str(source), tracking_uri)
    return load_checkpoint(path, use_ema=use_ema, device=device)  # every artefact a run writes


def load_model(source: str | os.PathLike, *, device: str = "cpu", use_ema: bool = True,
               tracking_uri: str | None = None):
    """A trained model in eval mode: `source` is a run folder, a diffusers model/pipeline folder (or
    its weights file), a checkpoint file (ours or a reference FCDM one), an older run's
    `ema.safetensors`, or an MLflow run id."""
    return _load(source, device, use_ema, tracking_uri)[0]


def sample(model: Any, *, num: int | None = None, class_labels: Any = None, sampler: str | None = None,
           steps: int | str | None = None, cfg_scale: float = 1.0, seed: int = 0, device: str | None = None,
           objective: str | None = None, batch_size: int = 64, vae: Any = None, tracking_uri: str | None = None):
    """Class-conditional samples as a uint8 tensor (N, C, H, W), like `fcdm-lab sample` (same seed,
    same images). model: a model or anything `load_model` takes (then its recorded objective is used;
    a bare model samples with DDPM unless objective="flow"). num: default one per class label (or one
    per class). sampler/steps: ddpm | ddim (250 steps) or euler | heun for flow models."""
    import torch

    from .inference.checkpoints import objective_for
    from .inference.generation import generate, load_vae_for

    cfg, info = None, None
    if not isinstance(model, torch.nn.Module):
        model, cfg, info = _load(model, device or "cpu", True, tracking_uri)
    labels = list(class_labels) if class_labels is not None and not isinstance(class_labels, (int, str)) \
        else class_labels
    if num is None:
        num = len(labels) if isinstance(labels, list) and labels else (1 if isinstance(labels, int)
                                                                       else int(model.config.num_classes))
    latent_scale = None
    if vae is not None:
        vae, latent_scale = load_vae_for(None, vae, device or "cpu")
    images, _labels = generate(model, objective_for(cfg, model, info, objective=objective), num=num,
                               class_labels=labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                               device=device, batch_size=batch_size, vae=vae, latent_scale=latent_scale,
                               progress=False)
    return images


def run_ablation(name: str, **kwargs):
    """Run (or join, or resume) an ablation study from studies/ like `fcdm-lab ablate NAME`; keyword
    arguments are the study runner's (seeds, steps, overrides, workers, storage, ...)."""
    from .studies.ablate import run_ablation as run

    return run(name, **kwargs)


__all__ = ["load_model", "run_ablation", "sample", "train"]
