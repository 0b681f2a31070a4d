"""The one run pipeline: check -> train -> evaluate -> log, for every kind of run.

    checked = preflight(cfg, out_dir, resume=None)             # raises UserError; writes nothing
    out = run_pipeline(tracker, cfg, out_dir, resume=checked.resume, evaluate=True)

`fcdm-lab train` (`train_tracked`), a study child, `fcdm-lab rerun` and a sweep trial all call
`run_pipeline`, so they log the same things: the resolved config (params + config.toml), tags
(code, data, study/variant/seed), the trainer's step metrics and sample grids, model size and
compute, the final EMA weights, and, when evaluating, the metrics of the *in-memory* EMA network
(no reload from disk) on the device it trained on, with the evaluation noise seeded by the
training seed (so variants trained with the same seed are paired in evaluation too).

`preflight` validates everything that can be checked before anything is written (the output
folder, the checkpoint to resume, the data and the model build on the meta device): a refused run
leaves no MLflow run, no folder and no pointer file behind (issue 9, items 4 and 5).
(Not to be confused with diffusers_pipeline.py, the diffusers-style sampling pipeline.)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import UserError


@dataclass
class Preflight:
    resume: Optional[str]           # what to hand the trainer: None, "latest" or a checkpoint path
    model_info: Dict[str, Any]      # meta-device build (params, GMACs, compute matching)


@dataclass
class PipelineResult:
    train: Any                      # TrainResult
    metrics: Dict[str, float] = field(default_factory=dict)   # evaluation metrics ({} when not evaluated)


def _writable_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder {str(out_dir)!r} is an existing file; choose a folder (--out DIR)")
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"output folder {str(out_dir)!r} is not writable ({probe} is read-only for this user); "
                        f"choose another --out")


def preflight(cfg, out_dir, *, resume: Optional[str] = None) -> Preflight:
    """Everything a run can check before it creates anything; UserError on the first problem."""
    from .studies.spec import model_info_for
    from .train import checkpoint as ckpt_io

    out_dir = Path(out_dir)
    _writable_folder(out_dir)
    if resume is None:
        existing = ckpt_io.list_checkpoints(out_dir)
        if existing:
            raise UserError(f"{out_dir} already has checkpoints (newest: step {existing[-1][0]}); resume them "
                            f"with --resume latest or choose another output folder")
    elif resume == "latest":
        if ckpt_io.find_latest_checkpoint(out_dir) is None:
            raise UserError(f"nothing to resume: no valid checkpoint in {ckpt_io.checkpoint_dir(out_dir)}; "
                            f"start without --resume, or pass a checkpoint path")
    else:
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"checkpoint {str(path)!r} does not exist; pass --resume latest or a "
                            f"checkpoints/step_*.pt file")
        try:
            ckpt = ckpt_io.read_checkpoint(path)
        except UserError:
            raise
        except Exception as e:  # truncated, a text file, a foreign pickle
            raise UserError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}); pass an intact "
                            f"checkpoints/step_*.pt file or --resume latest") from None
        if not ckpt_io.is_training_checkpoint(ckpt):
            raise UserError(f"{path} is not an fcdm-lab training checkpoint; only those can be resumed")
    info = model_info_for(cfg)  # the data and a meta-device model build: bad blocks, shapes, data fail here
    return Preflight(resume, info)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_pipeline(tracker, cfg, out_dir, *, resume: Optional[str] = None, evaluate: bool = False,
                 eval_seed: Optional[int] = None, progress: bool = True, study: Optional[str] = None,
                 variant: Optional[str] = None, seed: Optional[int] = None, max_steps: Optional[int] = None,
                 eval_metrics=None) -> PipelineResult:
    """Train `cfg` into `out_dir` logging into an open run, then (evaluate=True) evaluate the
    in-memory EMA model. eval_seed defaults to train.seed (paired evaluation noise); eval_metrics
    defaults to cfg.eval.metrics. Call `preflight` first: this function writes the run pointer."""
    from .eval.evaluate import evaluate_model
    from .tracking import RunPointer, _drop_none, log_run_config, model_params, run_environment, standard_tags
    from .train.trainer import train

    tracker.set_tags(standard_tags(cfg, study=study, variant=variant, seed=seed))
    log_run_config(tracker, cfg)
    if tracker.active:
        RunPointer(tracker.run_id, tracker.tracking_uri).save(out_dir)
    result = train(cfg, out_dir, resume=resume, tracker=tracker, progress=progress, max_steps=max_steps)
    tracker.set_tags(standard_tags(cfg, result.model_info, result.data_info, study=study, variant=variant, seed=seed))
    tracker.log_params({**model_params(result.model_info), **run_environment()})  # + world_size, device
    tracker.log_dict(_drop_none(dict(result.model_info)), "model_info.json")
    tracker.log_dict(_drop_none(dict(result.data_info)), "data_info.json")
    summary = {"train.wall_time_s": result.wall_time_s, "train.images_per_s": result.images_per_s,
               "train.final_loss": result.final_loss}
    tracker.log_metrics({k: v for k, v in summary.items() if _finite(v)}, step=result.step)
    if result.ema_path and Path(result.ema_path).is_file():
        tracker.log_artifact(result.ema_path, "weights")
    metrics: Dict[str, float] = {}
    if evaluate and result.ema_model is not None:
        model = result.ema_model
        device = next(model.parameters()).device  # chosen once, by the trainer
        metrics = evaluate_model(model, cfg, metrics=eval_metrics, tracker=tracker, step=result.step, weights="ema",
                                 data_info=result.data_info,
                                 seed=cfg.train.seed if eval_seed is None else eval_seed,
                                 save_dir=Path(out_dir) / "eval", device=device, progress=progress)
    return PipelineResult(result, metrics)


__all__ = ["PipelineResult", "Preflight", "preflight", "run_pipeline"]
