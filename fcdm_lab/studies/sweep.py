"""Optuna sweeps: how does sample quality scale with FCDM's depth L and width C at a fixed budget?

A sweep file in studies/ (`kind = "sweep"`) names a base experiment, a search space over
experiment keys, one objective (optionally pruned on intermediate evaluations) or two (a metric and
GMACs: a Pareto front), a sampler and a training budget (steps, or compute = GMACs x steps):

    kind = "sweep"
    base = "tiny-digits"
    trials = 8
    objectives = [ { metric = "fid_digits", direction = "minimize" }, { metric = "gmacs", direction = "minimize" } ]
    sampler = "nsga2"
    budget = { steps = 800 }
    [space]
    L = { type = "int", low = 1, high = 2 }
    C = { type = "int", low = 16, high = 48, step = 8 }

Many workers: `fcdm-lab sweep NAME --storage URL` started on each process or machine joins one
Optuna study. `trials` is the study's target (finished + running trials), not a per-worker count,
so N workers share it and a rerun tops up failed or missing trials. The study's user attrs hold the
MLflow parent run id: every worker attaches its trials (child runs, logged from the objective, not
Optuna's deprecated MLflowCallback) to that one parent. Several workers on one machine should
use one torch thread each (`--set train.threads=1`).

Training is deterministic given `train.seed`, so a point proposed a second time (samplers do that
in small discrete spaces) reuses the finished trial's values instead of training again. A trial
whose worker died (SIGKILL, a lost node) is failed by the next worker's heartbeat check and retried
as a copy that resumes the dead trial's folder and MLflow run from its last checkpoint.

Split by job: sweep_file.py (reading sweep files), storage.py (Optuna storages), engine.py (the
worker processes and their loop, shared with ablations), sweep_results.py (tables and the Pareto
plot), display.py (the rich table); this module holds the trial objective and the sweep itself.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional


from ..config import ExperimentConfig, load_experiment
from ..display import output_console
from ..errors import UserError, choices
from ..eval.metrics import finite_number, metric_key
from ..models.info import model_info_for
from ..runner import run_experiment
from ..schema import check_name
from ..tracking.client import get_client, resolve_tracking_uri, tracked_run
from ..tracking.record import log_run_config, standard_tags
from ..tracking.ui import browse_hint
from ..training.preflight import check_config
from ..training.state import find_latest_checkpoint
from .engine import WorkerSlots, claim_waiting, nothing_left, work
from .launchers import Launcher, run_workers
from ..bundled import STUDIES_DIR
from ..schema import resolve_named_file
from .ablate import run_ablation
from .spec import normalize_overrides, study_kind, study_names
from .storage import check_storage_url, open_storage, pasteable, redact, sqlite_init_lock
from .study import PARENT_ATTR, new_parent_run, open_study
from .sweep_file import (MODEL_METRICS, SPEC_ATTR, TRAIN_METRICS, Budget, SweepSpec, load_sweep, spec_fingerprint,
                         sweep_names)
from .sweep_results import SweepResult, _fmt, plot_pareto, print_trials, trial_rows, write_tables


# ---------------------------------------------------------------------------------------------
# Optuna storage, sampler, pruner, study
# ---------------------------------------------------------------------------------------------

def make_sampler(spec: SweepSpec, seed: Optional[int]):
    import optuna

    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({p.name: p.grid() for p in spec.space}, seed=seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        # The default population (50) would make a 10-trial sweep one random generation.
        population = spec.population or min(50, max(2, spec.trials // 2))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    # TPE: constant_liar keeps parallel workers from proposing the same point; fewer random
    # start-up trials than the default 10 so that small sweeps still get model-based proposals.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.trials // 2)),
                                      constant_liar=True, multivariate=True)


def make_pruner(spec: SweepSpec, steps: Optional[int]):
    import optuna

    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.eval_every, max_resource=steps or "auto",
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------

def _trial_dir(out_dir: Path, number: int) -> Path:
    """out_dir/trial-0003; a leftover folder of an older study with the same name gets a suffix
    (the trainer refuses to start fresh over existing checkpoints)."""
    base = out_dir / f"trial-{number:04d}"
    candidate, i = base, 0
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate


class SweepObjective:
    """Optuna objective: one trial = suggest -> config -> train (in chunks when evaluating on the
    way) -> evaluate -> objective values, logged as a child MLflow run of the sweep's parent."""

    def __init__(self, spec: SweepSpec, *, target: int, overrides: Mapping[str, Any], study_name: str,
                 parent_run_id: str, uri: str, out_dir: Path, progress: bool, console):
        self.spec, self.target, self.overrides, self.study_name = spec, target, dict(overrides), study_name
        self.parent_run_id, self.uri, self.out_dir = parent_run_id, uri, out_dir
        self.progress, self.console = progress, console
        self.eval_metrics = [m for m in spec.metrics if m not in (*MODEL_METRICS, *TRAIN_METRICS)]
        self.ran: List[int] = []
        self.user_errors: List[str] = []

    def config(self, params: Mapping[str, Any]) -> tuple[ExperimentConfig, Dict[str, Any], int]:
        """The trial's experiment (base < sweep `set` < --set < the trial's parameters), its model
        info (meta-device build) and its step budget."""
        values = {p.key: params[p.name] for p in self.spec.space}
        cfg = load_experiment(self.spec.base_path(), {**self.spec.set, **self.overrides, **values})
        info = model_info_for(cfg)
        steps = int(self.overrides.get("train.steps") or self.spec.budget.steps_for(info["gmacs"]))
        cfg.train.steps = steps
        return cfg, info, steps

    def __call__(self, trial) -> float | tuple:
        import optuna

        # Workers decide "one more trial?" independently; trial numbers are handed out atomically by
        # the storage, so the trials numbered before this one decide whether it is one too many.
        earlier = [t for t in counted_trials(trial.study) if t.number < trial.number]
        if len(earlier) >= self.target:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned(f"the study already has its {self.target} trials")
        self.ran.append(trial.number)
        params = {p.name: p.suggest(trial) for p in self.spec.space}
        try:
            return self._run(trial, params)
        except optuna.TrialPruned:
            raise
        except UserError as e:
            self.user_errors.append(str(e))
            trial.set_user_attr("error", str(e))
            self.console.print(f"[red]trial {trial.number} ({_params_text(params)}) failed:[/] {e}", highlight=False)
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            self.console.print(f"[red]trial {trial.number} ({_params_text(params)}) failed:[/] "
                               f"{type(e).__name__}: {e}", highlight=False)
            raise

    def _run(self, trial, params: Dict[str, Any]) -> float | tuple:
        import optuna


        n, single = trial.number, not self.spec.multi
        tags = {"kind": "sweep-trial", "trial": n, "optuna.study": self.study_name, "study": self.study_name,
                "variant": f"trial-{n:04d}"}
        short = {p.name: params[p.name] for p in self.spec.space if p.name != p.key}  # "L", "C"
        pruned_at = None
        # A retry of a trial whose worker died (the copy Optuna's heartbeat callback queued, with the
        # dead trial's user attrs) continues in the dead trial's folder and MLflow run, from its last
        # checkpoint: no progress is lost, as for the children of an ablation.
        retried = _retried_from(trial, self.uri)
        if retried is not None:
            tags["optuna.retry_of"] = retried.number
        # The child run opens first, so that a trial whose config is invalid is in MLflow too (FAILED).
        with tracked_run(f"{self.study_name}/trial-{n:04d}", uri=self.uri, tags=tags, params=short,
                         parent_run_id=self.parent_run_id,
                         run_id=retried.run_id if retried is not None else None) as tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            try:
                cfg, info, steps = self.config(params)
                for k, v in (("gmacs", float(info["gmacs"])), ("params", int(info["params"])), ("steps", steps)):
                    trial.set_user_attr(k, v)
                tracker.set_tags(standard_tags(cfg, info, study=self.study_name, variant=f"trial-{n:04d}",
                                               seed=cfg.train.seed))
                log_run_config(tracker, cfg, info)
                trial_dir = retried.folder if retried is not None else _trial_dir(self.out_dir, n)
                trial.set_user_attr("trial_dir", str(trial_dir))
                twin = _finished_twin(trial, params, steps)
                if twin is not None:  # training is deterministic given train.seed: the result is known
                    values = list(twin.values)
                    trial.set_user_attr("duplicate_of", twin.number)
                    trial.set_user_attr("metrics", twin.user_attrs.get("metrics", {}))
                    tracker.log_metrics({**{f"sweep.{m}": v for m, v in zip(self.spec.metrics, values)},
                                         **twin.user_attrs.get("metrics", {})}, step=steps)
                    tracker.set_tags({"optuna.state": "COMPLETE", "duplicate_of": twin.number})
                    self.console.print(f"trial {n}: {_params_text(params)} = trial {twin.number} (same config and "
                                       f"seed): its values are reused, nothing trained", highlight=False)
                    return values[0] if single else tuple(values)
                done = retried.step if retried is not None else 0
                again = f", resuming trial {retried.number} at step {done}" if retried is not None and done else ""
                self.console.print(f"[bold]trial {n}[/]: {_params_text(params)} ({info['params']:,} params, "
                                   f"{info['gmacs']:.4g} GMACs, {steps} steps{again}) -> {trial_dir}", highlight=False)

                # Train in chunks that end at each intermediate evaluation (resume="latest" continues
                # exactly where the previous chunk stopped), then at the budget. A resumed retry skips
                # the evaluations its checkpoint is past (the dead trial reported them already).
                points = list(range(self.spec.eval_every, steps, self.spec.eval_every)) if self.spec.eval_every else []
                points = [k for k in points if k > done] + [steps]
                base = {"gmacs": float(info["gmacs"]), "params": float(info["params"])}
                resume, measured = ("latest" if done else None), {}
                wanted = list(dict.fromkeys([*cfg.eval.metrics, *self.eval_metrics]))
                for k in points:  # the one run pipeline; evaluation of the in-memory EMA model
                    out = run_experiment(tracker, cfg, trial_dir, resume=resume, progress=self.progress, max_steps=k,
                                       evaluate=bool(self.eval_metrics), eval_metrics=wanted,
                                       study=self.study_name, variant=f"trial-{n:04d}", seed=cfg.train.seed)
                    result, got = out.train, out.metrics
                    resume = "latest"
                    measured = {**base, "final_loss": result.final_loss, "images_per_s": result.images_per_s,
                                "wall_time_s": result.wall_time_s}
                    if self.eval_metrics:
                        for m in self.eval_metrics:
                            key = metric_key(m, got)
                            if key is None:
                                raise RuntimeError(f"evaluation returned no {m!r} (got {choices(sorted(got))})")
                            measured[m] = float(got[key])
                        measured.update({k2: float(v) for k2, v in got.items() if k2 not in measured})
                    tracker.log_metrics({f"sweep.{m}": measured[m] for m in self.spec.metrics
                                         if finite_number(measured.get(m))}, step=k)
                    if single and k < steps:
                        trial.report(measured[self.spec.metrics[0]], k)
                        if trial.should_prune():
                            pruned_at = k
                            tracker.set_tags({"optuna.state": "PRUNED", "optuna.pruned_at": k})
                            break
                if pruned_at is None:
                    values = [measured[m] for m in self.spec.metrics]
                    bad = [m for m, v in zip(self.spec.metrics, values) if not finite_number(v)]
                    if bad:
                        raise RuntimeError(f"objective {bad[0]} is {measured[bad[0]]} (not a finite number)")
                    trial.set_user_attr("metrics", {m: v for m, v in measured.items() if finite_number(v)})
                    tracker.log_metrics(base, step=steps)
                    tracker.set_tags({"optuna.state": "COMPLETE"})
            except Exception as e:
                tracker.set_tags({"optuna.state": "FAIL", "error": f"{type(e).__name__}: {e}"[:4000]})
                raise
        if pruned_at is not None:  # the block ended cleanly (FINISHED); KILLED says it stopped before its end
            tracker.client.set_terminated(tracker.run_id, "KILLED")
            raise optuna.TrialPruned(f"pruned at step {pruned_at} ({self.spec.metrics[0]} = "
                                     f"{measured[self.spec.metrics[0]]:.4g})")
        return values[0] if single else tuple(values)


def counted_trials(study) -> list:
    """Trials that count toward the study's target: finished or running, not failed (a rerun tops
    failures up) and not a surplus trial of a worker that came one too late."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return [t for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("surplus")]


@dataclasses.dataclass
class _Retried:
    """The dead trial a retry continues: its number, MLflow run (None if gone), folder, checkpoint step."""

    number: int
    run_id: Optional[str]
    folder: Path
    step: int


def _retried_from(trial, uri: str) -> Optional[_Retried]:
    """What a retry copy of a dead worker's trial continues (None for a trial that is no retry, or
    whose folder was never chosen: then it starts afresh)."""
    frozen = trial.study._storage.get_trial(trial._trial_id)  # optuna.Trial does not expose system attrs
    number, folder = frozen.system_attrs.get("failed_trial"), frozen.user_attrs.get("trial_dir")
    if number is None or not folder:
        return None
    run_id = frozen.user_attrs.get("mlflow_run_id")
    if run_id:
        try:
            get_client(uri).get_run(run_id)
        except Exception:  # deleted since: the retry logs into a new run
            run_id = None
    found = find_latest_checkpoint(folder) if Path(folder).is_dir() else None
    return _Retried(int(number), run_id, Path(folder), int(found[1]["step"]) if found else 0)


def _finished_twin(trial, params: Mapping[str, Any], steps: int):
    """A complete trial of this study with the same parameters and budget, if any (samplers do
    propose a point twice in small discrete spaces)."""
    from optuna.trial import TrialState

    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == dict(params) and t.user_attrs.get("steps") == steps and t.values:
            return t
    return None


def _params_text(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

def _check_space_against_base(spec: SweepSpec, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """Resolve the base experiment and the two corners of the space before any trial: a bad key,
    a bad value type or an invalid model (odd C) fails now, not in every trial."""
    base = {**spec.set, **overrides}
    cfg = load_experiment(spec.base_path(), base)
    for corner in (0, 1):
        values = {p.key: p.extremes()[corner] for p in spec.space}
        corner_cfg = load_experiment(spec.base_path(), {**base, **values})
        try:
            check_config(corner_cfg)
        except UserError as e:
            raise UserError(f"sweep {spec.name!r}: the search space corner {values} is not a valid model: "
                            f"{e}") from None
    return cfg


def _create_or_join(spec: SweepSpec, storage, study_name: str, *, uri: str, fingerprint: Dict[str, Any],
                    base_cfg: ExperimentConfig, storage_text: str):
    """Create the study (and its MLflow parent run) or join an existing one (study.open_study):
    (study, parent_run_id, created). A stored study made from another sweep definition or with other
    directions is refused; one without a parent run gets one."""
    import optuna  # ~0.4 s: loaded when a sweep runs

    with sqlite_init_lock(uri):
        client = get_client(uri)
    directions = [o.direction for o in spec.objectives]

    def on_join(study) -> None:
        if study.user_attrs.get(SPEC_ATTR, {}).get("sha") not in (None, fingerprint["sha"]):
            raise UserError(f"study {study_name!r} in {storage_text} was created from another sweep definition "
                            f"(space, objectives, budget or --set differ); use another --study-name or the same file")
        have = [d.name.lower() for d in study.directions]
        if have != directions:
            raise UserError(f"study {study_name!r} in {storage_text} has directions {have}, the sweep file asks "
                            f"{directions}; use another --study-name")

    def on_create(study, parent: str) -> None:
        study.set_user_attr(SPEC_ATTR, fingerprint)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(spec.metrics)  # labels for optuna-dashboard

    tags = {"kind": "sweep", "study": study_name, "sweep": spec.name, "optuna.study": study_name,
            "optuna.storage": storage_text, **standard_tags(base_cfg, study=study_name)}
    return open_study(storage, study_name, client=client, uri=uri, storage_text=storage_text, what="sweep",
                      make_parent=lambda: new_parent_run(client, f"sweep:{study_name}", tags),
                      create={"directions": directions, "sampler": make_sampler(spec, spec.seed),
                              "pruner": make_pruner(spec, spec.budget.steps)},
                      on_create=on_create, on_join=on_join, adopt=True)


class SweepJob:
    """The engine's job for a sweep: retry copies first, then new trials from the sampler while the
    study is below its target and this worker below its budget."""

    def __init__(self, objective: "SweepObjective", *, budget: int):
        self.objective, self.budget, self.asked = objective, budget, 0

    def claim(self, study):
        trial = claim_waiting(study)
        if trial is not None:
            return trial
        if self.asked >= self.budget or len(counted_trials(study)) >= self.objective.target:
            return None
        self.asked += 1
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": engine.py beats
            warnings.simplefilter("ignore", UserWarning)
            return study.ask()

    def run(self, trial):
        return self.objective(trial)

    def finished(self, study) -> bool:
        return nothing_left(study)

    def after(self, study, number: int) -> None:
        frozen = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        if frozen.user_attrs.get("surplus"):
            return
        values = ", ".join(f"{m} {_fmt(v)}" for m, v in zip(self.objective.spec.metrics, frozen.values or []))
        took = (frozen.datetime_complete - frozen.datetime_start).total_seconds() if frozen.datetime_complete else 0
        self.objective.console.print(f"trial {frozen.number} {frozen.state.name} in {took:.0f} s"
                                     + (f": {values}" if values else ""), highlight=False)


@dataclasses.dataclass
class SweepWorker:
    """A worker of a sweep that exists already (engine WorkerJob: picklable, rebuilt in the worker)."""

    name_or_path: str
    trials: int
    storage: str
    study_name: str
    uri: str
    overrides: Dict[str, Any]
    out_dir: str
    progress: bool = False

    def run(self, *, console, worker: int, threads: int, shared: bool) -> None:
        import optuna  # ~0.4 s: loaded by the processes that run trials only

        spec = load_sweep(self.name_or_path)
        overrides = dict(self.overrides)
        if "train.steps" in overrides:
            spec.budget = Budget(steps=overrides["train.steps"])
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage),
                                  sampler=make_sampler(spec, None), pruner=make_pruner(spec, spec.budget.steps))
        objective = SweepObjective(spec, target=self.trials, overrides=overrides, study_name=self.study_name,
                                   parent_run_id=study.user_attrs[PARENT_ATTR], uri=self.uri,
                                   out_dir=Path(self.out_dir), progress=self.progress, console=console)
        job = SweepJob(objective, budget=max(0, self.trials - len(counted_trials(study))))
        if shared and overrides.get("train.threads") is None:
            with WorkerSlots(threads) as slots:
                work(study, job, console=console, slots=slots)
        else:
            work(study, job, console=console)


def run_sweep(name_or_path: str | Path, *, trials: Optional[int] = None, storage: Optional[str] = None,
              study_name: Optional[str] = None, uri: Optional[str] = None,
              overrides: Mapping[str, Any] | List[str] | None = None, out_dir: str | Path | None = None,
              progress: bool = True, threads: Optional[int] = None, console=None,
              workers: int = 1, launcher: Optional[Launcher] = None) -> SweepResult:
    """Run (or join, or resume) an Optuna sweep; see the module docstring.

    trials: the study's target number of trials (default: the file's); storage: an Optuna RDB URL
    (default sqlite:///optuna.db), the same URL on several workers joins one study; study_name:
    default the sweep file's name; uri: MLflow tracking URI; overrides: `--set` items (they apply to
    every trial; `train.steps` replaces the file's budget); out_dir: trial folders (default
    runs/<study>); threads: torch threads in this process (default train.threads); 1 when several
    workers share a machine; workers: processes on this machine running trials (engine.py; each
    gets cores / workers threads unless train.threads is set); launcher: where the workers run
    (launchers.Launcher: local processes by default, submitit-local or Slurm jobs).
    """
    import optuna
    import torch

    console = console or output_console()
    launcher = launcher or Launcher()
    storage_url, uri = launcher.shared_stores(check_storage_url(storage), resolve_tracking_uri(uri))
    spec = load_sweep(name_or_path)
    check_name("study name", study_name or spec.name)  # it names the trials' folder: runs/<study>
    overrides = normalize_overrides(overrides)
    if threads is not None:
        if threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        overrides["train.threads"] = threads
    clash = sorted(set(overrides) & {p.key for p in spec.space})
    if clash:
        raise UserError(f"--set {clash[0]} is searched by sweep {spec.name!r}; drop it or narrow the file's "
                        f"space table")
    if "train.steps" in overrides:
        if not isinstance(overrides["train.steps"], int) or overrides["train.steps"] < 1:
            raise UserError(f"train.steps must be an integer >= 1, got {overrides['train.steps']!r}")
        spec.budget = Budget(steps=overrides["train.steps"])
    target = spec.trials if trials is None else trials
    if target < 1:
        raise UserError(f"trials must be >= 1, got {target}")
    base_cfg = _check_space_against_base(spec, overrides)
    if base_cfg.train.threads is not None:
        torch.set_num_threads(base_cfg.train.threads)

    uri = resolve_tracking_uri(uri)
    storage_obj = open_storage(storage_url)
    storage_text = redact(storage_url)
    study_name = study_name or spec.name
    out_dir = Path(out_dir) if out_dir is not None else Path("runs") / study_name
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead
    fingerprint = spec_fingerprint(spec, overrides)
    study, parent_id, created = _create_or_join(spec, storage_obj, study_name, uri=uri, fingerprint=fingerprint,
                                                base_cfg=base_cfg, storage_text=storage_text)
    if not created:  # joiners bring their own sampler (a fresh seed: the same one would repeat the creator's points)
        study = optuna.load_study(study_name=study_name, storage=storage_obj, sampler=make_sampler(spec, None),
                                  pruner=make_pruner(spec, spec.budget.steps))

    have = len(counted_trials(study))
    remaining = max(0, target - have)
    console.print(f"[bold]sweep {study_name}[/] ({'created' if created else 'joined'}) in {storage_text}: "
                  f"{have}/{target} trials finished or running; this worker runs up to {remaining}. "
                  f"Objectives: {', '.join(f'{o.direction} {o.metric}' for o in spec.objectives)}; "
                  f"sampler {spec.sampler}, pruner {spec.pruner}, budget {spec.budget.describe()}. "
                  f"MLflow parent run {parent_id}.", highlight=False)

    objective = SweepObjective(spec, target=target, overrides=overrides, study_name=study_name,
                               parent_run_id=parent_id, uri=uri, out_dir=out_dir, progress=progress, console=console)
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    n = max(1, min(workers, remaining))
    worker_job = SweepWorker(str(name_or_path), target, storage_url, study_name, uri, overrides, str(out_dir))

    try:
        with tracked_run(run_id=parent_id, uri=uri, tags={"optuna.trials_target": target}) as parent:
            if created:
                parent.log_params(_parent_params(spec, overrides))
                parent.log_text(Path(spec.path).read_text(), "sweep/sweep.toml")
            if remaining and n == 1 and not launcher.submits:
                work(study, SweepJob(objective, budget=remaining), console=console)
            elif remaining:
                run_workers(worker_job, n, launcher, console)
            rows, best, title, outputs = _summarize(study, spec, parent, out_dir, study_name, uri)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: study {study_name!r} is saved in {storage_text}; run the same command "
                      f"again to continue it", highlight=False)
        raise
    print_trials(console, rows, spec, title)
    console.print(browse_hint(parent_id, uri), highlight=False, soft_wrap=True)
    dashboard_url, password_var = pasteable(storage_url)  # usable, yet no password printed
    console.print(f"Optuna: `optuna-dashboard {dashboard_url}` (pip install optuna-dashboard"
                  f"{f'; password from ${password_var}' if password_var else ''}); table and plot in {out_dir}",
                  highlight=False, soft_wrap=True)
    if objective.ran and len(objective.user_errors) == len(objective.ran):
        raise UserError(f"every trial of this worker failed ({len(objective.ran)}); first error: "
                        f"{objective.user_errors[0]}")
    csv_path, md_path, plot = outputs
    return SweepResult(study_name=study_name, storage=storage_text, parent_run_id=parent_id, tracking_uri=uri,
                       metrics=spec.metrics, rows=rows, best_trials=best, out_dir=out_dir, plot=plot,
                       table_csv=csv_path, table_md=md_path, ran_here=list(objective.ran))


def _parent_params(spec: SweepSpec, overrides: Mapping[str, Any]) -> Dict[str, Any]:
    space = {p.name: {k: v for k, v in dataclasses.asdict(p).items() if v is not None and k != "name"}
             for p in spec.space}
    return {"sweep.file": spec.path, "sweep.base": spec.base, "sweep.sampler": spec.sampler,
            "sweep.pruner": spec.pruner, "sweep.budget": spec.budget.describe(), "sweep.eval_every": spec.eval_every,
            "sweep.objectives": [dataclasses.asdict(o) for o in spec.objectives], "sweep.space": space,
            "sweep.set": {**spec.set, **overrides}}


def _summarize(study, spec: SweepSpec, parent, out_dir: Path, study_name: str, uri: str):
    """The trials table (CSV + markdown) and the Pareto plot, written to out_dir and logged on the
    parent run with summary metrics; the children get their pareto tag."""
    rows, best = trial_rows(study, spec)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    title = f"{study_name}: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} failed"
    csv_path, md_path = write_tables(rows, out_dir)
    what = "Pareto front" if spec.multi else "best trial"
    plot = plot_pareto(rows, spec, out_dir / "pareto.png",
                       f"{study_name}: {what} ({counts['COMPLETE']} trials, {spec.budget.describe()})")
    for path in (csv_path, md_path, plot):
        if path is not None:
            parent.log_artifact(str(path), "sweep")
    summary: Dict[str, float] = {f"trials.{s.lower()}": n for s, n in counts.items()}
    summary["pareto_size"] = len(best)
    if best and not spec.multi:
        summary[f"best.{spec.metrics[0]}"] = study.best_value
    parent.log_metrics(summary, step=len(rows))
    parent.set_tags({"best_trials": ",".join(map(str, best))})
    _tag_children(rows, uri)
    return rows, best, title, (csv_path, md_path, plot)


def _tag_children(rows: List[Dict[str, Any]], uri: str) -> None:
    """Mark each trial's MLflow run pareto=true/false (filterable in the UI); the latest summary
    of any worker wins, as the front moves while the study grows."""
    client = get_client(uri, probe=False)
    for r in rows:
        if r.get("run_id") and r["state"] == "COMPLETE":
            try:
                client.set_tag(r["run_id"], "pareto", str(bool(r["pareto"])).lower())
            except Exception as e:  # a missing child run must not hide the sweep's results
                warnings.warn(f"could not tag MLflow run {r['run_id']}: {e}", stacklevel=2)


# ---------------------------------------------------------------------------------------------
# `fcdm-lab sweep NAME`: an Optuna search, or a scaling study (a grid of sizes and budgets x seeds)
# ---------------------------------------------------------------------------------------------

def sweep_command(name_or_path: str | Path, *, seeds: Optional[int] = None, trials: Optional[int] = None,
                  steps: Optional[int] = None, study_name: Optional[str] = None, storage: Optional[str] = None,
                  uri: Optional[str] = None, overrides: Mapping[str, Any] | None = None, out_dir=None,
                  workers: Optional[int] = None, launcher: Optional[Launcher] = None, console=None):
    """Run the named file: a scaling study (kind = "scaling": every point of its grid at every budget,
    each with `seeds` paired seeds, on the study engine with a fitted scaling law in its report) or an
    Optuna search (kind = "sweep"). Options that do not apply to the file's kind are refused."""
    launcher = launcher or Launcher()
    path = resolve_named_file(name_or_path, STUDIES_DIR, "sweep", sorted({*sweep_names(), *study_names("scaling")}),
                              accept=lambda p: study_kind(p) in ("sweep", "scaling"))
    if study_kind(path) == "scaling":
        for option, value in (("--trials", trials), ("--study-name", study_name)):
            if value is not None:
                raise UserError(f"{option} is for Optuna searches (kind = \"sweep\"); {path.stem!r} is a scaling "
                                f"study: its points are its grid, each trained with --seeds paired seeds")
        return run_ablation(str(name_or_path), seeds=seeds, steps=steps, overrides=overrides, uri=uri,
                            out_dir=out_dir, console=console, workers=workers, storage=storage, launcher=launcher)
    if seeds is not None:
        raise UserError(f"--seeds applies to scaling studies (kind = \"scaling\": a grid of points x paired seeds); "
                        f"{path.stem!r} is an Optuna search, whose sampler proposes one run per point")
    overrides = dict(overrides or {})
    if steps is not None:
        overrides["train.steps"] = steps
    return run_sweep(name_or_path, trials=trials, storage=storage, study_name=study_name, uri=uri,
                     overrides=overrides, out_dir=out_dir, workers=workers or launcher.default_workers(),
                     launcher=launcher, console=console)

