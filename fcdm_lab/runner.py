"""The run pipeline: check -> train -> evaluate -> log, for every kind of run.

    checked = check_run(cfg, out_dir, resume=None)                # raises UserError; writes nothing
    out = run_experiment(tracker, cfg, out_dir, resume=checked.resume, evaluate=True)

`fcdm-lab train` (`train_tracked`), a study child, `fcdm-lab rerun` and a sweep trial all call
`run_experiment`, so they log the same things: the resolved config (params + config.toml), tags
(code, data, study/variant/seed), the trainer's step metrics and sample grids, model size and
compute, the datasets as MLflow inputs (the training set; the reference set when evaluating), the
final EMA model (the `pipeline/` artifact), the held-out loss (val_loss, ... of eval/heldout.py: at
the end of training and every eval.heldout_every steps, whatever metrics are asked for), and, when
evaluating, the metrics of the *in-memory* EMA network (no reload from disk) on the device it trained
on, with the evaluation noise seeded by the training seed (so variants trained with the same seed are
paired in evaluation too); the held-out metrics are among them, and only the others are sampled.

Tracking is a hook on the training loop (`TrackingHook`); what every run records is
tracking/record.py. `train_tracked` checks everything first (training/preflight.check_run), takes
the run folder's lock, and only then opens a run (the folder's own run when resuming, found through
its pointer file `mlflow_run.json`): a refused run leaves no MLflow run, folder or pointer behind.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from .config import drop_none
from .eval.evaluate import evaluate_model
from .eval.heldout import HeldoutLoss, check_heldout_request, split_metric_names
from .eval.metrics import finite_number
from .tracking.client import (DEFAULT_EXPERIMENT, RunPointer, get_client, is_main_process, logged_steps,
                              resolve_tracking_uri, resumable_run_id, tracked_run)
from .tracking.record import log_datasets, log_run_config, model_params, run_environment, standard_tags
from .training.hooks import RunFiles, SampleGrids, TrainHook, TrainingRun
from .training.preflight import check_run, run_folder_lock
from .training.trainer import TrainResult, train


class TrackingHook(TrainHook):
    """A training's step metrics, sample grids, config.toml and final model, logged into an open run.

    A run resumed after a hard kill (SIGKILL, a lost node) has already logged the steps between its
    last checkpoint and the kill; the resumed training recomputes them (bit-identically on CPU), and
    they are not logged a second time: everything up to the run's last logged step is skipped."""

    def __init__(self, tracker, logged_through: int = 0):
        self.tracker, self.logged_through = tracker, logged_through

    def log_image(self, image, key: str, step: int) -> None:
        if step > self.logged_through:
            self.tracker.log_image(image, key, step)

    def on_start(self, run: TrainingRun) -> None:
        if run.main:
            self.tracker.log_artifact(run.out_dir / "config.toml")  # the file RunFiles wrote: one serializer

    def on_log(self, run: TrainingRun, metrics: dict) -> None:
        if run.main and run.step > self.logged_through:
            self.tracker.log_metrics(metrics, run.step)

    def on_end(self, run: TrainingRun) -> None:
        if run.main:
            for path in run.exported:  # artifact pipeline/: model_index.json, model/, scheduler/
                self.tracker.log_artifact(path, "pipeline" if path.is_file() else f"pipeline/{path.name}")


@dataclass
class RunResult:
    train: TrainResult
    metrics: Dict[str, float] = field(default_factory=dict)   # evaluation metrics ({} when not evaluated)


def tracked_hooks(tracker, extra: tuple = ()) -> list:
    """The default hooks with the tracker attached: the run folder's files, sample grids, the held-out
    loss (`HeldoutLoss`, logging into the run), `extra` hooks, tracking."""
    tracking = TrackingHook(tracker, logged_steps(tracker, "loss"))
    heldout = HeldoutLoss(log_metrics=tracker.log_metrics, logged_through=logged_steps(tracker, "val_loss"))
    return [RunFiles(), SampleGrids(log_image=tracking.log_image), heldout, *extra, tracking]


def run_experiment(tracker, cfg, out_dir, *, resume: Optional[str] = None, evaluate: bool = False,
                   eval_seed: Optional[int] = None, progress: bool = True, study: Optional[str] = None,
                   variant: Optional[str] = None, seed: Optional[int] = None, max_steps: Optional[int] = None,
                   eval_metrics=None, hooks: tuple = ()) -> RunResult:
    """Train `cfg` into `out_dir` logging into an open run, then (evaluate=True) evaluate the
    in-memory EMA model. eval_seed defaults to train.seed (paired evaluation noise); eval_metrics
    defaults to cfg.eval.metrics (held-out ones, val_loss ..., come from the HeldoutLoss hook, and
    every held-out value is in the result whether asked for or not); hooks: more training hooks.
    Call `check_run` first: this function writes the run pointer."""
    wanted = list(cfg.eval.metrics if eval_metrics is None else eval_metrics)
    heldout_wanted, sample_metrics = split_metric_names(wanted) if evaluate else ([], [])
    check_heldout_request(cfg, heldout_wanted)  # no held-out split for a requested val_loss: before training
    tracker.set_tags(standard_tags(cfg, study=study, variant=variant, seed=seed))
    log_run_config(tracker, cfg)
    if tracker.active:
        RunPointer(tracker.run_id, tracker.tracking_uri).save(out_dir)
    run_hooks = tracked_hooks(tracker, tuple(hooks))
    heldout = next(h for h in run_hooks if isinstance(h, HeldoutLoss))
    heldout.required = bool(heldout_wanted)
    result = train(cfg, out_dir, resume=resume, hooks=run_hooks, progress=progress, max_steps=max_steps)
    tracker.set_tags(standard_tags(cfg, result.model_info, result.data_info, study=study, variant=variant, seed=seed))
    tracker.log_params({**model_params(result.model_info), **run_environment()})  # + world_size, device
    tracker.log_dict(drop_none(dict(result.model_info)), "model_info.json")
    tracker.log_dict(drop_none(dict(result.data_info)), "data_info.json")
    log_datasets(tracker, cfg, result.data_info, evaluation=evaluate)
    summary = {"train.wall_time_s": result.wall_time_s, "train.images_per_s": result.images_per_s,
               "train.final_loss": result.final_loss}
    tracker.log_metrics({k: v for k, v in summary.items() if finite_number(v)}, step=result.step)
    metrics: Dict[str, float] = {}
    if evaluate and result.ema_model is not None:
        model = result.ema_model
        device = next(model.parameters()).device  # chosen once, by the trainer
        if sample_metrics:
            metrics = evaluate_model(model, cfg, metrics=sample_metrics, tracker=tracker, step=result.step,
                                     weights="ema", data_info=result.data_info,
                                     seed=cfg.train.seed if eval_seed is None else eval_seed,
                                     save_dir=Path(out_dir) / "eval", device=device, progress=progress)
        else:  # held-out metrics only: nothing sampled, but the run is an evaluated one (rerun reads this tag)
            tracker.set_tags({"eval.weights": "ema"})
        metrics.update(heldout.final)  # already logged at result.step by the hook
    return RunResult(result, metrics)


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
                         run_id=resumable_run_id(out_dir, uri, checked.resume) if main else None) as tracker:
            out = run_experiment(tracker, cfg, out_dir, resume=checked.resume, progress=progress,
                                 max_steps=max_steps, evaluate=evaluate)
    return out.train, tracker.run_id


__all__ = ["RunResult", "TrackingHook", "run_experiment", "train_tracked", "tracked_hooks"]
