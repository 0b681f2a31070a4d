"""The one run pipeline: check -> train -> evaluate -> log, for every kind of run.

    checked = check_run(cfg, out_dir, resume=None)             # raises UserError; writes nothing
    out = run_pipeline(tracker, cfg, out_dir, resume=checked.resume, evaluate=True)

`fcdm-lab train` (`train_tracked`), a study child, `fcdm-lab rerun` and a sweep trial all call
`run_pipeline`, so they log the same things: the resolved config (params + config.toml), tags
(code, data, study/variant/seed), the trainer's step metrics and sample grids, model size and
compute, the datasets as MLflow inputs (the training set; the reference set when evaluating), the
final EMA weights, and, when evaluating, the metrics of the *in-memory* EMA network
(no reload from disk) on the device it trained on, with the evaluation noise seeded by the
training seed (so variants trained with the same seed are paired in evaluation too).

`train_tracked` is `fcdm-lab train`: `check_run` (train/preflight.py), the folder lock, then a run (the folder's own run when resuming, found
through its pointer file `mlflow_run.json`), then the pipeline.

`check_run` validates everything that can be checked before anything is written (the output
folder, the checkpoint to resume, the data and the model build on the meta device): a refused run
leaves no MLflow run, no folder and no pointer file behind (issue 9, items 4 and 5).
(Not to be confused with diffusers_pipeline.py, the diffusers-style sampling pipeline.)
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .errors import UserError
from .train.preflight import check_run, run_folder_lock
from .urls import without_password
from .tracking import DEFAULT_EXPERIMENT, _client, get_client, is_main_process, resolve_tracking_uri, tracked_run

RUN_FILE = "mlflow_run.json"            # written into a training out dir: which run holds its logs


@dataclass
class PipelineResult:
    train: Any                      # TrainResult
    metrics: Dict[str, float] = field(default_factory=dict)   # evaluation metrics ({} when not evaluated)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def run_pipeline(tracker, cfg, out_dir, *, resume: Optional[str] = None, evaluate: bool = False,
                 eval_seed: Optional[int] = None, progress: bool = True, study: Optional[str] = None,
                 variant: Optional[str] = None, seed: Optional[int] = None, max_steps: Optional[int] = None,
                 eval_metrics=None) -> PipelineResult:
    """Train `cfg` into `out_dir` logging into an open run, then (evaluate=True) evaluate the
    in-memory EMA model. eval_seed defaults to train.seed (paired evaluation noise); eval_metrics
    defaults to cfg.eval.metrics. Call `check_run` first: this function writes the run pointer."""
    from .eval.evaluate import evaluate_model
    from .run_record import log_datasets
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
    log_datasets(tracker, cfg, result.data_info, evaluation=evaluate)
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


# ---------------------------------------------------------------------------------------------
# Training inside a run (`fcdm-lab train`)
# ---------------------------------------------------------------------------------------------

@dataclass
class RunPointer:
    """Contents of `<out_dir>/mlflow_run.json`: which run a training folder logged into. The URI is
    stored without its password (the environment supplies it when the run is reopened)."""

    run_id: str
    tracking_uri: str
    experiment: str = DEFAULT_EXPERIMENT

    def save(self, out_dir) -> Path:
        path = Path(out_dir) / RUN_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**self.__dict__, "tracking_uri": without_password(self.tracking_uri)}
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    @classmethod
    def find(cls, path) -> Optional["RunPointer"]:
        """The pointer of the training folder holding `path` (a checkpoint file or the folder)."""
        p = Path(path).resolve()
        for folder in [p, *p.parents][:4]:
            f = folder / RUN_FILE
            if f.is_file():
                try:
                    return cls(**json.loads(f.read_text()))
                except (ValueError, TypeError):
                    return None
        return None


def train_in_run(tracker, cfg, out_dir, *, resume=None, progress: bool = True, study: str | None = None,
                 variant: str | None = None, seed: int | None = None, max_steps: int | None = None):
    """Train `cfg` into `out_dir` logging into an open run (the pipeline without evaluation);
    returns the TrainResult. See `fcdm_lab.pipeline.run_pipeline`."""
    return run_pipeline(tracker, cfg, out_dir, resume=resume, progress=progress, study=study, variant=variant,
                        seed=seed, max_steps=max_steps).train


def _resumable_run_id(out_dir, uri: str, resume) -> str | None:
    """The MLflow run a resumed training folder logged into (its pointer file), if this store has it:
    resuming continues that run instead of splitting one training over two runs."""
    if resume is None:
        return None
    pointer = RunPointer.find(out_dir if resume == "latest" else resume)
    if pointer is None or without_password(pointer.tracking_uri) != without_password(uri):
        return None
    try:
        _client(uri).get_run(pointer.run_id)
    except Exception:
        return None
    return pointer.run_id


def train_tracked(cfg, out_dir, *, uri: str | None = None, resume=None, run_name: str | None = None,
                  parent_run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                  progress: bool = True, experiment: str = DEFAULT_EXPERIMENT, max_steps: int | None = None,
                  evaluate: bool = False):
    """The `fcdm-lab train` library function: check everything (config, model, data, output folder,
    checkpoint, store) before creating anything, then open a run (or reopen the folder's run when
    resuming), train, evaluate (evaluate=True) and log. Returns (TrainResult, run_id); run_id is
    None in non-main processes."""
    checked = check_run(cfg, out_dir, resume=resume)  # a refused run leaves no run, folder or pointer
    uri = resolve_tracking_uri(uri)
    main = is_main_process()  # under `accelerate launch` only the main process touches the store: two
    if main:                  # processes creating a fresh SQLite store at once would collide
        get_client(uri)  # probe the store before training
    # The folder's lock before any run is opened or file written: a second training into a folder in
    # use is refused without touching the first one's run or pointer (train() re-enters the same lock).
    with run_folder_lock(out_dir) if main else contextlib.nullcontext():
        with tracked_run(run_name or cfg.name, uri=uri, experiment=experiment, tags=tags,
                         parent_run_id=parent_run_id,
                         run_id=_resumable_run_id(out_dir, uri, checked.resume) if main else None) as tracker:
            out = run_pipeline(tracker, cfg, out_dir, resume=checked.resume, progress=progress,
                               max_steps=max_steps, evaluate=evaluate)
    return out.train, tracker.run_id


__all__ = ["PipelineResult", "RUN_FILE", "RunPointer", "run_pipeline", "train_in_run", "train_tracked"]
