"""`fcdm-lab ablate`: every (variant, seed) of a study trained, evaluated and compared with verdicts.

    result = run_ablation("grn-vs-cca")                          # the main job: 2 workers on 2 cores
    result = run_ablation("kernel-size", seeds=3, steps=500, overrides=["train.lr=3e-4"], workers=4)

A study is an Optuna study (storage.py; sqlite:///optuna.db by default, any RDB URL with
`--storage`) whose trials are the (variant, seed) grid, named after the study and a hash of its
resolved settings, and one MLflow parent run (tags study, kind=ablation, settings_hash; its id in
the Optuna study's user attrs) with one child run per variant and seed. `workers` processes run
the trials (engine.py): one single-thread worker per core on CPU, one per GPU on GPU machines.
Variants with the same seed share data order, diffusion noise and evaluation noise, so the
report's paired differences cancel most of the seed noise; the report (report.py, verdicts.py)
gives each variant better / worse / inconclusive per metric.

Running the same command again joins the same study: finished children are kept, interrupted or
failed ones are queued again and resume from their newest checkpoint, reopening their MLflow run.
A second `ablate` of the same study started at the same time (or on another machine with the same
`--storage` and tracking store) works on the same queue: no child is trained twice. A child that
fails (diverged, broken) is marked FAILED and the others go on; at the end the report covers what
finished and the call raises a UserError naming the failures (the parent ends FAILED, and the same
command retries just those). Ctrl+C stops the study (parent and running children KILLED).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..errors import UserError
from ..eval.metrics import lower_is_better, metric_key
from ..urls import without_password
from ..tracking.client import (DEFAULT_EXPERIMENT, experiment_id, get_client, resolve_tracking_uri, STATUS_FAILED, STATUS_FINISHED, STATUS_KILLED, STATUS_RUNNING, tracked_run)
from ..tracking.record import git_state, package_versions
from ..tracking.ui import browse_hint
from .engine import PARENT_ATTR, URI_ATTR, Launcher, check_parent_reachable, claim_waiting, run_workers, work
from .report import STUDY_FILE, Report, build_report
from ..training.preflight import check_config
from ..training.state import find_latest_checkpoint
from .spec import ChildPlan, StudyPlan, StudySpec, list_studies, load_study, plan_study
from .storage import DEFAULT_STORAGE, check_storage_url, open_storage, redact, sqlite_init_lock

PLAN_ATTR = "settings_hash"
ROOT_ATTR = "out_dir"


@dataclass
class ChildOutcome:
    variant: str
    seed: int
    run_id: Optional[str]
    status: str                          # FINISHED | FAILED | KILLED | RUNNING | missing
    skipped: bool                        # finished before this call (not trained by it)
    out_dir: Path
    metrics: Dict[str, float] = field(default_factory=dict)


@dataclass
class StudyResult:
    name: str
    parent_run_id: str
    settings_hash: str
    resumed: bool
    out_dir: Path
    children: List[ChildOutcome]
    report: Report
    report_paths: Dict[str, Path]
    study_name: str = ""
    storage: str = ""
    trained_here: int = 0                # children trained by this call's workers


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------

def print_studies(console=None) -> List[StudySpec]:
    from rich.console import Console

    from ..display import studies_table

    specs = list_studies()
    (console or Console()).print(studies_table(specs))
    return specs


def studies_table(specs: List[StudySpec] | None = None):
    from ..display import studies_table as table

    return table(list_studies() if specs is None else specs)


# ---------------------------------------------------------------------------------------------
# Finding runs
# ---------------------------------------------------------------------------------------------

def find_child(client, exp_id: str, parent_id: str, variant: str, seed: int):
    """The child run of (variant, seed): a FINISHED one if any, else the newest (or None)."""
    runs = client.search_runs([exp_id], filter_string=(f"tags.mlflow.parentRunId = '{parent_id}' and "
                                                       f"tags.variant = '{variant}' and tags.seed = '{seed}'"),
                              order_by=["attributes.start_time DESC"], max_results=50)
    return next((r for r in runs if r.info.status == STATUS_FINISHED), runs[0] if runs else None)


# ---------------------------------------------------------------------------------------------
# The job the engine runs
# ---------------------------------------------------------------------------------------------

def _key(frozen) -> tuple:
    return frozen.user_attrs.get("variant"), frozen.user_attrs.get("seed")


class AblationJob:
    """Trials are (variant, seed) children; each is trained, evaluated and logged by the run
    pipeline into a child run of the study's parent, in <root>/<variant>-seed<seed>/."""

    def __init__(self, plan: StudyPlan, *, parent_id: str, uri: str, root: Path, progress: bool, console,
                 experiment: str = DEFAULT_EXPERIMENT, threads: Optional[int] = None, worker: int = 0):
        self.plan, self.spec = plan, plan.spec
        self.children: Dict[tuple, ChildPlan] = {(c.variant, c.seed): c for c in plan.children}
        self.parent_id, self.uri, self.root = parent_id, uri, Path(root)
        self.progress, self.console, self.threads, self.worker = progress, console, threads, worker
        self.client = get_client(uri, probe=False)
        self.exp_id = experiment_id(self.client, experiment)

    def folder(self, variant: str, seed: int) -> Path:
        return self.root / f"{variant}-seed{seed}"

    def claim(self, study):
        """A queued child that no other trial has finished or is running (a lower-numbered RUNNING
        trial of the same child wins, so a child queued twice by two launchers runs once)."""
        from optuna.trial import TrialState

        while True:
            trial = claim_waiting(study)
            if trial is None:
                return None
            key = _key(trial)
            rivals = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
                      if _key(t) == key and t.number != trial.number]
            twin = next((t for t in rivals if t.state == TrialState.COMPLETE or t.number < trial.number), None)
            if twin is None:
                return trial
            trial.set_user_attr("duplicate_of", twin.number)
            study.tell(trial, state=TrialState.PRUNED)

    def run(self, trial) -> float:
        from ..runner import run_experiment

        variant, seed = _key(trial)
        child = self.children.get((variant, seed))
        if child is None:
            raise UserError(f"trial {trial.number} names {variant}/seed{seed}, which is not in this study's plan")
        trial.suggest_categorical("variant", self.spec.variant_names())  # as Optuna params, for dashboards
        trial.suggest_int("seed", min(k[1] for k in self.children), max(k[1] for k in self.children))
        cfg = child.cfg
        if self.threads is not None and cfg.train.threads is None:
            cfg.train.threads = self.threads
        folder = self.folder(variant, seed)
        existing = find_child(self.client, self.exp_id, self.parent_id, variant, seed)
        resume = "latest" if find_latest_checkpoint(folder) is not None else None
        what = "resuming" if resume else "training"
        self.console.print(f"[bold]{self.spec.name}[/]: {what} {variant} (seed {seed}) in {folder} "
                           f"[dim](worker {self.worker}, trial {trial.number})[/]", highlight=False)
        tags = {"study": self.spec.name, "variant": variant, "seed": seed, "seed_index": child.seed_index,
                "kind": "ablation-child", "optuna.trial": trial.number}
        with tracked_run(f"{variant}-seed{seed}", uri=self.uri, parent_run_id=self.parent_id, tags=tags,
                         run_id=existing.info.run_id if existing is not None else None) as tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            out = run_experiment(tracker, cfg, folder, resume=resume, evaluate=True, eval_seed=seed,
                               progress=self.progress, study=self.spec.name, variant=variant, seed=seed)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in out.metrics.items() if not k.endswith("_std"))
        self.console.print(f"  {variant} seed {seed}: {shown}", highlight=False)
        key = metric_key(self.spec.primary, out.metrics)
        value = out.metrics.get(key) if key else None
        return float(value) if value is not None else float("nan")

    def finished(self, study) -> bool:
        """Nothing to claim and nothing running (a dead worker's trial is failed and retried first)."""
        from optuna.trial import TrialState

        return not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))


# ---------------------------------------------------------------------------------------------
# Creating or joining the study
# ---------------------------------------------------------------------------------------------

def _study_info(plan: StudyPlan) -> Dict[str, Any]:
    """What the report needs besides the children: logged as the parent's study.json."""
    spec = plan.spec.to_dict()
    return {"spec": spec, "seeds_used": sorted({c.seed for c in plan.children}), "steps": plan.steps,
            "overrides": plan.overrides, "baseline_gmacs": plan.baseline_gmacs, "settings_hash": plan.settings_hash}


def _check_variants(plan: StudyPlan) -> None:
    """Build every variant's model on the meta device (and load the data, and check the memory) before
    anything trains or is created: a bad block option in the last variant fails now, not after the
    first ones trained."""
    seen = set()
    for child in plan.children:
        if child.variant in seen:
            continue
        seen.add(child.variant)
        try:
            check_config(child.cfg)
        except UserError as e:
            raise UserError(f"study {plan.spec.name!r}, variant {child.variant!r}: {e}") from None


def _create_parent(client, exp_id: str, plan: StudyPlan, study_name: str, storage_text: str) -> str:
    from mlflow.tracking.context.registry import resolve_tags

    commit, dirty = git_state()
    tags = {"study": plan.spec.name, "kind": "ablation", "settings_hash": plan.settings_hash,
            "optuna.study": study_name, "optuna.storage": storage_text, "git_commit": commit,
            "git_dirty": None if dirty is None else str(dirty).lower(),
            **{f"version.{k}": v for k, v in package_versions().items()}}
    run = client.create_run(exp_id, run_name=plan.spec.name,
                            tags=resolve_tags({k: str(v) for k, v in tags.items() if v is not None}))
    return run.info.run_id


def _log_parent_inputs(client, parent_id: str, plan: StudyPlan, root: Path, uri: str) -> None:
    from ..tracking.client import Tracker

    spec = plan.spec
    parent = Tracker(client, parent_id)
    parent.log_dict(_study_info(plan), STUDY_FILE)
    parent.log_artifact(spec.path, "study")
    parent.log_params({"study.name": spec.name, "study.base": spec.base, "study.seeds": plan.seeds,
                       "study.steps": plan.steps, "study.primary": spec.primary, "study.baseline": spec.baseline,
                       "study.metrics": spec.metrics, "study.compute_matched": spec.compute_matched,
                       "study.baseline_gmacs": plan.baseline_gmacs,
                       "study.overrides": json.dumps(plan.overrides, sort_keys=True),
                       "study.out_dir": str(root.resolve())})


def _create_or_join(plan: StudyPlan, storage, study_name: str, *, client, exp_id: str, uri: str,
                    storage_text: str, out_dir) -> tuple:
    """(study, parent_run_id, root folder, created). The creator makes the parent run, the Optuna
    study and its queue; a racing creator loses on the storage's unique study name, deletes its
    parent and joins."""
    import optuna
    from optuna.exceptions import DuplicatedStudyError

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        study = None
    if study is None:
        parent = _create_parent(client, exp_id, plan, study_name, storage_text)
        try:
            study = optuna.create_study(study_name=study_name, storage=storage, direction=(
                "minimize" if _lower(plan) else "maximize"))
        except DuplicatedStudyError:
            client.delete_run(parent)
            study = optuna.load_study(study_name=study_name, storage=storage)
        else:
            root = Path(out_dir) if out_dir is not None else Path("runs") / "studies" / f"{plan.spec.name}-{parent[:8]}"
            _log_parent_inputs(client, parent, plan, root, uri)
            study.set_user_attr(PLAN_ATTR, plan.settings_hash)
            study.set_user_attr(URI_ATTR, without_password(uri))
            study.set_user_attr(ROOT_ATTR, str(root.resolve()))
            for child in plan.children:  # seed-major: whole pairs finish first
                _enqueue(study, child)
            study.set_user_attr(PARENT_ATTR, parent)  # last: joiners wait for it, then find everything
            return study, parent, root, True
    parent = _wait_for(study, PARENT_ATTR)
    if parent is None:
        raise UserError(f"Optuna study {study_name!r} in {storage_text} has no MLflow parent run id (its creator "
                        f"died while setting it up); delete it (`optuna delete-study --study-name {study_name} "
                        f"--storage URL`) and run again")
    check_parent_reachable(client, study, parent, uri, "study")
    return study, parent, Path(study.user_attrs[ROOT_ATTR]), False


def _lower(plan: StudyPlan) -> bool:
    return lower_is_better(plan.spec.primary)


def _wait_for(study, attr: str, timeout_s: float = 30.0):
    deadline = time.time() + timeout_s
    while True:
        value = study.user_attrs.get(attr)  # read from the storage on every access
        if value or time.time() > deadline:
            return value
        time.sleep(0.5)


def _enqueue(study, child: ChildPlan) -> None:
    """Queue one child: its (variant, seed) as fixed Optuna params and as user attrs (which the retry
    copy of a dead worker's trial inherits)."""
    study.enqueue_trial({"variant": child.variant, "seed": child.seed},
                        user_attrs={"variant": child.variant, "seed": child.seed})


def _requeue_missing(study, plan: StudyPlan) -> int:
    """Queue again every child with no COMPLETE, WAITING or RUNNING trial (interrupted, failed, or
    out of retries): how the same command resumes a study. Returns how many were queued."""
    from optuna.trial import TrialState

    live = {_key(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.WAITING,
                                                                      TrialState.RUNNING))}
    missing = [c for c in plan.children if (c.variant, c.seed) not in live]
    for child in missing:
        _enqueue(study, child)
    return len(missing)


# ---------------------------------------------------------------------------------------------
# Launcher and workers
# ---------------------------------------------------------------------------------------------

def _prepare(name: str, *, seeds, steps, overrides, uri, storage, probe: bool = False) -> tuple:
    """Everything checked before anything is created: the study file, every child's config, the
    URLs (the tracking store probed when `probe`), every variant's model and the data."""
    spec = load_study(name)
    plan = plan_study(spec, seeds=seeds, steps=steps, overrides=overrides)  # every config checked first
    storage_url = check_storage_url(storage or DEFAULT_STORAGE)
    uri = resolve_tracking_uri(uri)
    if probe:
        get_client(uri)  # an unreachable store fails here, in seconds
    _check_variants(plan)
    return spec, plan, storage_url, uri


def run_ablation_worker(name: str, *, seeds=None, steps=None, overrides=None, uri=None, storage=None,
                        study_name: str, progress: bool = True, console=None, worker: int = 0,
                        experiment: str = DEFAULT_EXPERIMENT, threads: Optional[int] = None):
    """One worker of a study that exists already (what `run_ablation` spawns per process, and what
    it runs in-process with one worker)."""
    import optuna

    from rich.console import Console

    console = console or Console()
    spec, plan, storage_url, uri = _prepare(name, seeds=seeds, steps=steps, overrides=overrides, uri=uri,
                                            storage=storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
    if study.user_attrs.get(PLAN_ATTR) != plan.settings_hash:
        raise UserError(f"Optuna study {study_name!r} was created from other study settings; use the same study "
                        f"file, --seeds, --steps and --set as its creator")
    job = AblationJob(plan, parent_id=study.user_attrs[PARENT_ATTR], uri=uri, root=Path(study.user_attrs[ROOT_ATTR]),
                      progress=progress, console=console, experiment=experiment, threads=threads, worker=worker)
    return work(study, job, console=console)


def run_ablation(name: str, *, seeds: int | None = None, steps: int | None = None,
                 overrides: Mapping[str, Any] | List[str] | None = None, uri: str | None = None,
                 out_dir=None, progress: bool = True, console=None, experiment: str = DEFAULT_EXPERIMENT,
                 workers: Optional[int] = None, storage: Optional[str] = None,
                 launcher: Optional[Launcher] = None) -> StudyResult:
    """Run, join or resume a study; see the module docstring. overrides: `--set` items ("k=v"
    strings or a {dotted key: value} dict) applied to every variant. out_dir: the study's folder
    (default runs/studies/<study>-<parent run id>/), one sub-folder per child. workers: processes on
    this machine (default: one per core on CPU, one per GPU; one job under Slurm); storage: Optuna
    RDB URL; launcher: where the workers run (engine.Launcher; default local processes)."""
    import optuna
    from optuna.trial import TrialState
    from rich.console import Console

    console = console or Console()
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    launcher = launcher or Launcher()
    storage, uri = launcher.shared_stores(check_storage_url(storage), resolve_tracking_uri(uri))
    spec, plan, storage_url, uri = _prepare(name, seeds=seeds, steps=steps, overrides=overrides, uri=uri,
                                            storage=storage, probe=True)
    client = get_client(uri, probe=False)
    exp_id = experiment_id(client, experiment)
    storage_text = redact(storage_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage_obj = open_storage(storage_url)
    study_name = f"ablate-{spec.name}-{plan.settings_hash}"
    with sqlite_init_lock(storage_url):  # one launcher at a time creates or re-queues on one machine
        study, parent_id, root, created = _create_or_join(plan, storage_obj, study_name, client=client,
                                                          exp_id=exp_id, uri=uri, storage_text=storage_text,
                                                          out_dir=out_dir)
        requeued = 0 if created else _requeue_missing(study, plan)
    done_before = {_key(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    todo = len(plan.children) - len(done_before)
    n = min(launcher.default_workers() if workers is None else workers, max(1, todo))
    if created:
        console.print(f"Study [bold]{spec.name}[/]: {len(plan.children)} runs ({len(spec.variants)} variants x "
                      f"{plan.seeds} seed(s)) on {n} worker(s); parent run {parent_id}; Optuna study {study_name} "
                      f"in {storage_text}", highlight=False)
    else:
        console.print(f"Study [bold]{spec.name}[/]: joining parent run {parent_id} ({len(done_before)} of "
                      f"{len(plan.children)} runs finished, {requeued} queued again) with {n} worker(s)",
                      highlight=False)

    start = time.time()
    client.update_run(parent_id, status=STATUS_RUNNING)
    kwargs = dict(name=name, seeds=seeds, steps=steps, overrides=plan.overrides, uri=uri, storage=storage_url,
                  study_name=study_name, progress=progress and n == 1 and not launcher.submits, experiment=experiment)
    try:
        if todo == 0:
            console.print(f"[dim]{spec.name}: every run has finished; rebuilding the report[/]")
        elif n == 1 and not launcher.submits:
            from .engine import threads_per_worker

            run_ablation_worker(console=console, threads=threads_per_worker(1), **kwargs)
        else:
            codes = run_workers("ablation", kwargs, n, launcher, console)
            if any(c in (130, 143) for c in codes):  # the workers were stopped by a signal
                raise KeyboardInterrupt(f"a worker was stopped (exit codes {codes})")
    except BaseException as e:
        _close_children(client, exp_id, parent_id, study, STATUS_KILLED)
        client.set_terminated(parent_id, STATUS_KILLED if isinstance(e, KeyboardInterrupt) else STATUS_FAILED)
        if isinstance(e, KeyboardInterrupt):
            console.print(f"[yellow]interrupted[/]: run the same command again to resume study {spec.name!r}",
                          highlight=False)
        raise
    _close_children(client, exp_id, parent_id, study, STATUS_FAILED)
    return _finish(plan, study, client=client, exp_id=exp_id, parent_id=parent_id, uri=uri, root=root,
                   created=created, done_before=done_before, start=start, console=console,
                   study_name=study_name, storage_text=storage_text)


def _close_children(client, exp_id: str, parent_id: str, study, status: str) -> None:
    """Child runs left RUNNING by a worker that died without a retry (out of retries, or the study
    was stopped) end with `status`: nothing stays RUNNING in MLflow once the study ends."""
    from optuna.trial import TrialState

    running = {t.user_attrs.get("mlflow_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    for run in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = "
                                            f"'{STATUS_RUNNING}'"):
        if run.info.run_id not in running:
            client.set_terminated(run.info.run_id, status)


def _finish(plan: StudyPlan, study, *, client, exp_id, parent_id, uri, root, created, done_before, start, console,
            study_name, storage_text) -> StudyResult:
    from optuna.trial import TrialState

    from ..tracking.client import Tracker

    spec = plan.spec
    complete = {_key(t): t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    failed = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if _key(t) not in complete]
    outcomes: List[ChildOutcome] = []
    for child in plan.children:
        key = (child.variant, child.seed)
        run = find_child(client, exp_id, parent_id, child.variant, child.seed)
        status = run.info.status if run is not None else "missing"
        outcomes.append(ChildOutcome(child.variant, child.seed, run.info.run_id if run else None, status,
                                     key in done_before, root / f"{child.variant}-seed{child.seed}",
                                     dict(run.data.metrics) if run else {}))
    parent = Tracker(client, parent_id, resumed=True)
    trained = sum(o.status == STATUS_FINISHED and not o.skipped for o in outcomes)
    parent.log_metrics({"study.wall_time_s": time.time() - start, "study.children_trained": trained})
    missing = [o for o in outcomes if o.status != STATUS_FINISHED]
    report = build_report(parent_id, uri)
    report.status = STATUS_FAILED if missing else STATUS_FINISHED  # what the parent ends as, just below
    paths = report.write(root / "report")
    report.log(parent, paths)  # the files just written, not rendered again
    report.print(console)
    console.print(f"Report: {paths['markdown']}, plot {paths['plot']}, page {paths['html']}", highlight=False)
    console.print(browse_hint(parent_id, uri, report=True), highlight=False)
    client.set_terminated(parent_id, report.status)
    if missing:  # the parent ends FAILED, so the same command resumes it and retries these
        errors = {_key(t): t.user_attrs.get("error", "failed") for t in failed}
        first = missing[0]
        raise UserError(f"{len(missing)} of {len(plan.children)} runs of study {spec.name!r} failed (first: "
                        f"{first.variant} seed {first.seed}: {errors.get((first.variant, first.seed), first.status)}); "
                        f"the report covers the rest; run the same command again to retry the failed ones")
    return StudyResult(spec.name, parent_id, plan.settings_hash, not created, root, outcomes, report, paths,
                       study_name=study_name, storage=storage_text, trained_here=trained)


__all__ = ["AblationJob", "ChildOutcome", "StudyResult", "find_child", "print_studies", "run_ablation",
           "run_ablation_worker", "studies_table"]
